"""MLflow as a live tracker: the pretrain stage streams into the model's MLflow run while it trains, the run's
duration is the training's, a training stopped by SIGTERM and resumed continues the same run with one
continuous history (MLflow and history.jsonl), and the register stage adds to that run."""

from __future__ import annotations

import json
import os
import signal
import time

import pytest

from lm_core.engine import TrainingInterrupted
from lm_core.tracking import read_history
from pipelines import mlflow_store
from pipelines.config import load_config
from pipelines.stages import pretrain
from pipelines.stages.runner import run_pipeline
from pipelines.workspace import Workspace

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """The tiny config's data stages (ingest .. shard), once for the module."""
    cfg = load_config("tiny", [f"workspace={tmp_path_factory.mktemp('live') / 'ws'}", "train.max_steps=20",
                               "train.log_every=2", "train.checkpoint_every=6", "train.eval_every=0"])
    return cfg, run_pipeline(cfg, only="shard")


def run_id_of(cfg, results) -> str:
    key = pretrain.key(cfg, results["shard"], results["tokenizer"])
    return (Workspace(cfg.workspace).checkpoints / key / mlflow_store.RUN_ID_FILE).read_text().strip()


def test_metrics_stream_in_while_training(data):
    cfg, results = data
    client = mlflow_store.client(Workspace(cfg.workspace))
    seen = {}

    def progress(m: dict) -> None:  # on each log step, after the trackers were written
        history = client.get_metric_history(run_id_of(cfg, results), "train/loss")
        seen[m["step"]] = sorted(p.step for p in history)

    started = time.time()
    result = pretrain.run(cfg, Workspace(cfg.workspace), results["shard"], results["tokenizer"], progress=progress)
    wall = time.time() - started
    assert seen and all(step in steps for step, steps in seen.items()), seen  # live: no later than its log step
    run = client.get_run(result.metrics["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    duration = (run.info.end_time - run.info.start_time) / 1000
    assert result.metrics["wall_seconds"] <= duration <= wall + 1
    assert [p.step for p in client.get_metric_history(run.info.run_id, "train/loss")] == list(range(2, 21, 2))


def test_a_resumed_training_continues_the_same_run_and_history(data, monkeypatch):
    cfg = load_config("tiny", [f"workspace={cfg_ws(data)}", "train.max_steps=20", "train.log_every=2",
                               "train.checkpoint_every=6", "train.eval_every=0", "train.seed=7"])
    _, results = data
    ws = Workspace(cfg.workspace)

    def stop_at_step_8(m: dict) -> None:
        if m["step"] == 8:
            os.kill(os.getpid(), signal.SIGTERM)  # the engine checkpoints at the next sync step and stops

    with pytest.raises(TrainingInterrupted):
        pretrain.run(cfg, ws, results["shard"], results["tokenizer"], progress=stop_at_step_8)
    run_id = run_id_of(cfg, results)
    client = mlflow_store.client(ws)
    assert client.get_run(run_id).info.status == "FAILED"
    result = pretrain.run(cfg, ws, results["shard"], results["tokenizer"])
    assert result.metrics["resumed_from_step"] == 8 and result.metrics["mlflow_run_id"] == run_id
    assert client.get_run(run_id).info.status == "FINISHED"
    steps = [p.step for p in client.get_metric_history(run_id, "train/loss")]
    assert sorted(set(steps)) == list(range(2, 21, 2))  # one run, every logged step
    history = [h["step"] for h in read_history(result.dir / pretrain.HISTORY_FILE) if "train/loss" in h.get("metrics", {})]
    assert history == list(range(2, 21, 2))  # each step once, in order, across the resume
    events = [json.loads(line)["kind"] for line in (result.dir / pretrain.EVENTS_FILE).read_text().splitlines()]
    assert events == ["interrupted"]


def cfg_ws(data) -> str:
    return str(data[0].workspace)


KILL_SCRIPT = """
import sys
from pipelines.config import load_config
from pipelines.stages import pretrain
from pipelines.stages.runner import run_pipeline
from pipelines.workspace import Workspace
cfg = load_config("tiny", sys.argv[1:])
results = run_pipeline(cfg, only="shard")  # cached: the module's data stages
pretrain.run(cfg, Workspace(cfg.workspace), results["shard"], results["tokenizer"])
"""


def test_kill_9_then_resume_loses_no_history_row(data, tmp_path):
    """A pretrain stage killed with SIGKILL after a checkpoint and resumed leaves the same history (rows, in
    order, with the same losses) and the same MLflow steps as the uninterrupted run of the same config."""
    import shutil
    import subprocess
    import sys

    overrides = [f"workspace={cfg_ws(data)}", "train.max_steps=24", "train.log_every=2", "train.checkpoint_every=6",
                 "train.eval_every=0", "train.seed=13", "train.num_threads=1"]
    cfg, (_, results) = load_config("tiny", overrides), data
    ws = Workspace(cfg.workspace)
    straight = pretrain.run(cfg, ws, results["shard"], results["tokenizer"])
    expected = losses(read_history(straight.dir / pretrain.HISTORY_FILE))
    key = pretrain.key(cfg, results["shard"], results["tokenizer"])
    shutil.rmtree(straight.dir)
    shutil.rmtree(ws.checkpoints / key)  # the same run again from scratch: a new MLflow run too

    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    proc = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT, *overrides], env={**env, "OMP_NUM_THREADS": "1"},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # a fresh rank 0 of 1
    latest, history = ws.checkpoints / key / "latest", ws.checkpoints / key / pretrain.HISTORY_FILE
    deadline = time.time() + 240
    while True:  # a checkpoint, then history rows after it: those the resume must not duplicate
        at = int(latest.read_text().strip().removeprefix("step")) if latest.is_file() else None
        if at is not None and history.is_file() and max(losses(read_history(history)), default=0) > at:
            break
        assert proc.poll() is None, f"training ended before it could be killed: {proc.communicate()[1][-2000:]}"
        assert time.time() < deadline, "no checkpoint within the timeout"
        time.sleep(0.005)
    proc.kill()
    proc.communicate()
    checkpoint = int(latest.read_text().strip().removeprefix("step"))
    assert max(losses(read_history(history))) > checkpoint and not straight.dir.exists()

    resumed = pretrain.run(cfg, ws, results["shard"], results["tokenizer"])
    assert resumed.metrics["resumed_from_step"] == checkpoint
    got = losses(read_history(resumed.dir / pretrain.HISTORY_FILE))
    assert list(got) == list(expected) == list(range(2, 25, 2))  # every row once, in order
    assert got == pytest.approx(expected, rel=1e-5)  # the same numbers as the uninterrupted run
    client = mlflow_store.client(ws)
    steps = [p.step for p in client.get_metric_history(resumed.metrics["mlflow_run_id"], "train/loss")]
    assert sorted(set(steps)) == list(range(2, 25, 2))


def losses(history: list[dict]) -> dict[int, float]:
    """step -> train/loss of the rows that log it, in file order (a step twice would show as a shorter dict)."""
    rows = [(h["step"], h["metrics"]["train/loss"]) for h in history if "train/loss" in h.get("metrics", {})]
    assert len({s for s, _ in rows}) == len(rows), f"a step logged twice: {[s for s, _ in rows]}"
    return dict(rows)
