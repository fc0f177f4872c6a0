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
