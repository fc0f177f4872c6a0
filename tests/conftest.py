"""Shared test setup: an isolated, quiet environment for Prefect and MLflow, and the tiny config.

The environment is set at import time, before any test module imports prefect or mlflow: both read
these variables once, when they are first imported.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile

# PREFECT_HOME holds Prefect's SQLite DB and cached task results; a fresh one per test session keeps
# results of one session (or of a developer's own runs) from turning into cache hits in another.
_PREFECT_HOME = tempfile.mkdtemp(prefix="lmforge-test-prefect-")
atexit.register(shutil.rmtree, _PREFECT_HOME, True)
os.environ["PREFECT_HOME"] = _PREFECT_HOME

for _name, _value in {
    # the temporary API server needs longer than the default 20 s to start on 2 loaded cores
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    # MLflow ignores DO_NOT_TRACK=1; it needs "true" or its own switch
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DO_NOT_TRACK": "true",
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
    # 2 shared cores: one thread per process is faster and steadier than two
    "OMP_NUM_THREADS": "1",
}.items():
    os.environ.setdefault(_name, _value)

import pytest  # noqa: E402
from prefect.logging.configuration import ensure_logging_setup  # noqa: E402  (after the environment above)

# Prefect's console log handler keeps whatever sys.stderr is when Prefect first sets up its logging (when
# prefect.main is first imported, lazily). Set up here, that is pytest's session-wide capture; set up first
# inside a test that captures its own output, it would be that test's stream, closed when the test ends, and
# every later flow run in the same process would fail with "I/O operation on closed file" (seen with
# pytest-xdist, where the order of test files per process varies).
ensure_logging_setup()


@pytest.fixture(scope="session")
def prefect_harness():
    """A temporary Prefect API server and database for the whole session (~10 s to start).

    Not autouse: only tests that run flows ask for it, so unit tests never pay for the server.
    """
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="session")
def tiny_cli_run(tmp_path_factory):
    """`lmforge run -c tiny --no-prefect` once per session, as a user runs it: (root, workspace, the
    completed process). Tests that share it only read the workspace or add to it."""
    from process_fixtures import lmforge

    root = tmp_path_factory.mktemp("cli")
    ws = root / "ws"
    done = lmforge("run", "-c", "tiny", "--no-prefect", "--workspace", ws, cwd=root, timeout=600)
    assert done.returncode == 0, f"lmforge run failed ({done.returncode}):\n{done.stderr[-5000:]}"
    return root, ws, done


@pytest.fixture
def tiny_cfg(tmp_path):
    """The tiny pipeline config with its workspace in this test's temp dir."""
    from pipelines.config import load_config

    return load_config("tiny", [f"workspace={tmp_path / 'ws'}"])


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    """An in-process training run (lm_core.engine.init_distributed) sets RANK/WORLD_SIZE/MASTER_PORT in this
    process; a later test's subprocess that inherited them would try to bind the same rendezvous port.
    Drop them before every test's fixtures are set up (module-scoped ones included); an in-process run
    after that sets its own again, and torch.distributed, already initialised here, is simply reused."""
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        os.environ.pop(name, None)
