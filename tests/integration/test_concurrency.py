"""Reliability with real processes on the plain runner (`python -m pipelines`):

- two runs with different configs started at the same moment in one workspace both finish; the data
  stages they share are built once (the other run waits on the key's lock, then reuses the output),
  the catalog holds one copy of the data, and the registry gets one version from each run;
- a run SIGKILLed in the middle of pretraining leaves only a temporary directory, never an output
  under its final name; the rerun clears it, resumes from the last checkpoint and completes.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from process_fixtures import child_env

from pipelines.stages.runner import STAGES
from pipelines.workspace import Workspace, load_result

pytestmark = [pytest.mark.integration, pytest.mark.slow]

TINY = ["ingest.sources=[{kind: stdlib, doc_chars: 2000, max_docs: 120}]", "eval.max_windows=4"]


def pipeline(ws: Path, *overrides: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "pipelines", "-c", "tiny", f"workspace={ws}", *TINY, *overrides],
                            cwd=ws.parent, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def finish(proc: subprocess.Popen, timeout: float = 400) -> str:
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-4000:]
    return out


def outputs(ws: Path, stage: str) -> list[Path]:
    return sorted(p for p in (ws / "artifacts" / stage).iterdir() if not p.name.startswith("."))


def leftovers(ws: Path) -> list[Path]:
    """Temporary outputs: a build in progress, or one a killed run left behind."""
    return sorted(p for pattern in (".tmp-*", ".old-*") for p in (ws / "artifacts").rglob(pattern))


def test_two_runs_with_different_configs_at_once_do_not_corrupt_each_other(tmp_path):
    ws = tmp_path / "ws"
    runs = [pipeline(ws, "train.max_steps=6"), pipeline(ws, "train.max_steps=8")]
    finish(runs[0]), finish(runs[1])

    for stage in ("ingest", "dedup", "split", "tokenizer", "shard"):
        assert len(outputs(ws, stage)) == 1, f"the shared {stage} stage was built twice"
    for stage in ("pretrain", "evaluate", "export", "register"):
        assert len(outputs(ws, stage)) == 2, f"each run should have its own {stage} output"
    workspace = Workspace(ws)
    for stage in STAGES:
        for out in outputs(ws, stage):
            assert load_result(workspace, stage, out.name) is not None, f"{out} is incomplete"
    assert not leftovers(ws), leftovers(ws)
    steps = sorted(load_result(workspace, "pretrain", p.name).metrics["steps"] for p in outputs(ws, "pretrain"))
    assert steps == [6, 8]

    (ingest,) = outputs(ws, "ingest")
    documents = load_result(workspace, "ingest", ingest.name).metrics["documents"]
    with workspace.duckdb(read_only=True) as con:
        assert con.execute("SELECT count(*) FROM documents").fetchall() == [(documents,)], "documents ingested twice"
        assert con.execute("SELECT count(*) FROM doc_status").fetchall() == [(documents,)]
    versions = sorted(json.loads((p / "registration.json").read_text())["version"] for p in outputs(ws, "register"))
    assert versions == ["1", "2"], "the two registrations interleaved"


def test_a_run_killed_mid_pretrain_reruns_to_completion_without_partial_outputs(tmp_path):
    ws = tmp_path / "ws"
    overrides = ("train.max_steps=150", "train.checkpoint_every=10")
    killed = pipeline(ws, *overrides)
    deadline = time.monotonic() + 300
    # kill once training has checkpointed at least once and the stage's temporary output exists
    while not (list(ws.glob("checkpoints/*/latest")) and list(ws.glob("artifacts/pretrain/.tmp-*"))):
        assert killed.poll() is None, killed.stdout.read()[-4000:]
        assert time.monotonic() < deadline, "pretraining never started"
        time.sleep(0.1)
    os.killpg(killed.pid, signal.SIGKILL)
    killed.communicate(timeout=60)

    assert not outputs(ws, "pretrain"), "a killed pretrain left an output under its final name"
    partial = leftovers(ws)
    assert partial, "the killed run left no temporary directory: it was not killed mid-stage"
    assert not (ws / "artifacts" / "evaluate").exists()

    out = finish(pipeline(ws, *overrides))
    assert "register" in out and not leftovers(ws), leftovers(ws)
    assert all(not p.exists() for p in partial)
    workspace = Workspace(ws)
    (pretrain,) = outputs(ws, "pretrain")
    metrics = load_result(workspace, "pretrain", pretrain.name).metrics
    assert metrics["steps"] == 150 and metrics["resumed_from_step"] >= 10, metrics
    for stage in STAGES:
        (done,) = outputs(ws, stage)
        assert load_result(workspace, stage, done.name) is not None, f"{stage} output is incomplete"
