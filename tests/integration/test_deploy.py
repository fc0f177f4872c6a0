"""Deployments of the pipeline flow under Prefect's test harness: `lmforge deploy`'s deployment reads
back with its cron schedule and parameters, and a run triggered on a deployment that
`lmforge deploy --serve` serves (in a subprocess, as a user would run it) executes the pipeline."""

from __future__ import annotations

import subprocess
import sys
import time
from argparse import Namespace
from pathlib import Path

import pytest
from process_fixtures import child_env

from lm_core.typed_config import ConfigError

pytestmark = [pytest.mark.integration, pytest.mark.slow]

LMFORGE = str(Path(sys.executable).parent / "lmforge")


def _read_deployment(name: str):
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return client.read_deployment_by_name(name)


def test_deployment_reads_back_with_cron_and_parameters(prefect_harness, tmp_path, capsys):
    from flows import deploy

    args = Namespace(config="tiny", overrides=["train.max_steps=7"], workspace=str(tmp_path / "ws"), name="test-nightly",
                     cron="30 2 * * 1-5", only=None, start="pretrain", force=True, paused=False, serve=False,
                     inbox=None, tokens=None)
    assert deploy.main(args) == 0
    assert "lmforge-pipeline/test-nightly" in capsys.readouterr().out

    deployment = _read_deployment("lmforge-pipeline/test-nightly")
    assert [s.schedule.cron for s in deployment.schedules] == ["30 2 * * 1-5"]
    assert all(s.active for s in deployment.schedules)
    assert deployment.entrypoint == "flows.pipeline.pipeline_flow"
    assert deployment.parameters == {
        "config_name": "tiny", "overrides": ["train.max_steps=7", f"workspace={(tmp_path / 'ws').resolve()}"],
        "only": None, "start": "pretrain", "force": True,
    }
    # the UI's run form edits these: they must be parameters of the flow itself
    schema = deployment.parameter_openapi_schema["properties"]
    assert {"config_name", "overrides", "only", "start", "force", "config"} <= set(schema)

    # re-deploying with another schedule updates the same deployment
    args.cron, args.paused = "0 4 * * *", True
    deploy.main(args)
    again = _read_deployment("lmforge-pipeline/test-nightly")
    assert again.id == deployment.id
    assert [s.schedule.cron for s in again.schedules] == ["0 4 * * *"]
    assert again.paused and not deployment.paused


def test_continue_deployment_reads_back_with_its_inbox_and_budget(prefect_harness, tmp_path):
    from flows import deploy

    (tmp_path / "inbox").mkdir()
    args = Namespace(config="tiny", overrides=[], workspace=str(tmp_path / "ws"), name="test-continue", cron="0 * * * *",
                     only=None, start=None, force=False, paused=False, serve=False, inbox=str(tmp_path / "inbox"),
                     tokens=50_000)
    assert deploy.main(args) == 0
    deployment = _read_deployment("lmforge-continue/test-continue")
    assert deployment.entrypoint == "flows.continue_flow.continue_flow"
    assert [s.schedule.cron for s in deployment.schedules] == ["0 * * * *"]
    assert deployment.parameters == {"config_name": "tiny", "overrides": [f"workspace={(tmp_path / 'ws').resolve()}"],
                                     "inbox": str((tmp_path / "inbox").resolve()), "tokens": 50_000}
    with pytest.raises(ConfigError, match="needs --tokens"):
        deploy.main(Namespace(**{**vars(args), "tokens": None}))
    with pytest.raises(ConfigError, match="takes none of them"):
        deploy.main(Namespace(**{**vars(args), "only": "pretrain"}))


def test_bad_deploy_arguments_fail_before_anything_is_created(prefect_harness, tmp_path):
    from flows import deploy

    with pytest.raises(ConfigError, match="--cron"):
        deploy.build_deployment("x", "every night", {"config_name": "tiny"})
    with pytest.raises(ConfigError, match="train.max_step"):
        deploy.deployment_parameters("tiny", ["train.max_step=3"], str(tmp_path / "ws"))


def test_served_deployment_runs_a_triggered_flow_run(prefect_harness, tmp_path):
    """`lmforge deploy --serve` in a subprocess, a run triggered through the API, the stage's output on disk."""
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL

    workspace = tmp_path / "ws"
    env = child_env(PREFECT_API_URL=PREFECT_API_URL.value(), PREFECT_RUNNER_POLL_FREQUENCY="1")
    served = subprocess.Popen(
        [LMFORGE, "deploy", "-c", "tiny", "--workspace", str(workspace), "--name", "test-served", "--cron", "none",
         "--only", "ingest", "--serve"],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 60
        while True:  # the deployment exists once the serving process has registered it
            try:
                _read_deployment("lmforge-pipeline/test-served")
                break
            except Exception:
                assert served.poll() is None, served.stdout.read()
                assert time.monotonic() < deadline, "the served deployment never appeared"
                time.sleep(1)
        flow_run = run_deployment("lmforge-pipeline/test-served", timeout=120, poll_interval=1)
        assert flow_run.state.is_completed(), flow_run.state
        assert flow_run.parameters["only"] == "ingest"
        manifests = list((workspace / "artifacts" / "ingest").glob("*/manifest.json"))
        assert len(manifests) == 1, "the served run did not produce the ingest stage's output"
        assert not (workspace / "artifacts" / "dedup").exists(), "--only ingest ran more than ingest"
    finally:
        served.terminate()
        try:
            served.wait(timeout=30)
        except subprocess.TimeoutExpired:
            served.kill()
            served.wait()


def test_infra_prefect_yaml_deploys_with_prefect_deploy(prefect_harness):
    """`prefect deploy --prefect-file infra/prefect.yaml --all`, as infra/prefect.yaml says to run it."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.settings import PREFECT_API_URL

    repo = Path(__file__).resolve().parents[2]
    with get_client(sync_client=True) as client:
        client.create_work_pool(WorkPoolCreate(name="lmforge-process", type="process"), overwrite=True)
    done = subprocess.run(
        [str(Path(sys.executable).parent / "prefect"), "--no-prompt", "deploy", "--prefect-file", "infra/prefect.yaml", "--all"],
        cwd=repo, env=child_env(PREFECT_API_URL=PREFECT_API_URL.value(), LMFORGE_ROOT=str(repo)),
        capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    nightly = _read_deployment("lmforge-pipeline/nightly")
    assert [s.schedule.cron for s in nightly.schedules] == ["0 3 * * *"]
    assert nightly.parameters["config_name"] == "default" and nightly.work_pool_name == "lmforge-process"
    assert nightly.pull_steps == [{"prefect.deployments.steps.set_working_directory": {"directory": str(repo)}}]
    rerun = _read_deployment("lmforge-pipeline/rerun")
    assert not rerun.schedules and rerun.parameters["start"] == "evaluate"
    hourly = _read_deployment("lmforge-continue/hourly")
    assert hourly.entrypoint == "flows/continue_flow.py:continue_flow" and hourly.parameters["tokens"] == 2_000_000


def test_infra_docker_compose_is_well_formed():
    """No Docker here: check the structure — services, Postgres databases that exist, localhost-only ports."""
    import yaml

    infra = Path(__file__).resolve().parents[2] / "infra"
    compose = yaml.safe_load((infra / "docker-compose.yml").read_text())
    services = compose["services"]
    assert {"postgres", "prefect", "mlflow", "minio"} <= set(services)
    created = (infra / "postgres-init.sql").read_text()
    assert "CREATE DATABASE prefect" in created and "CREATE DATABASE mlflow" in created
    assert services["prefect"]["environment"]["PREFECT_API_DATABASE_CONNECTION_URL"].endswith("@postgres:5432/prefect")
    assert "@postgres:5432/mlflow" in services["mlflow"]["command"] and "--workers 1" in services["mlflow"]["command"]
    for name, service in services.items():
        for port in service.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), f"{name} publishes {port} beyond this machine"
        for dependency in service.get("depends_on", {}):
            assert dependency in services, f"{name} depends on a missing service {dependency}"


def test_flow_takes_a_config_name_and_overrides_or_a_resolved_config_not_both(tmp_path):
    from flows.pipeline import resolve_config
    from pipelines.config import load_config

    by_name = resolve_config(None, "tiny", ["train.max_steps=7", f"workspace={tmp_path}"])
    assert by_name.to_dict() == load_config("tiny", ["train.max_steps=7", f"workspace={tmp_path}"]).to_dict()
    assert resolve_config(by_name.to_dict(), None, None).to_dict() == by_name.to_dict()
    with pytest.raises(ValueError, match="not both"):
        resolve_config(by_name.to_dict(), "tiny", None)
