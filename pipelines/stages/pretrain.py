"""Stage 6, pretrain: train the GPT on the train shards through lm_core's DeepSpeed engine.

Metrics stream live to the model's MLflow run (created here, with system metrics; the register stage
adds the evaluation and the registered version to the same run) and to TensorBoard (`tensorboard/<key>/`).
DeepSpeed checkpoints go to `checkpoints/<key>/`, with the metric history and the events beside them, so an
interrupted run of the same key resumes from its last checkpoint into the same MLflow run and one
continuous history. The stage output is the final model directory (safetensors), the metric history and
the training events (spikes, vetoed updates, rollbacks, interruptions), which also land in the DuckDB
catalog as table `training_events`.

The stage describes the run as one `lm_core.launch.TrainJob`. World size 1 (the default) runs it in this
process; with `train.nproc_per_node` > 1, or a DeepSpeed `train.hostfile` for several nodes, torchrun or
DeepSpeed's launcher starts the ranks on the same job (`lm_core.launch`) and their output streams into this
stage's log; rank 0 writes the same outputs either way.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from lm_core.checkpoints import checkpoint_tag, latest_tag
from lm_core.engine import EVENTS_FILE, load_init_weights
from lm_core.launch import TrainJob, prepare_history, run_ranks, train_job
from lm_core.stability import read_events
from lm_core.tokenizer import Tokenizer
from lm_core.typed_config import to_dict
from lm_core.zero_adapter import precision_problem
from pipelines import mlflow_store
from pipelines.config import ConfigError, PipelineConfig
from pipelines.stages import tokenizer as tokenizer_stage
from pipelines.workspace import StageResult, Workspace, run_stage, stage_key

# 2: bf16 is DeepSpeed's bf16 mode (fp32 masters in the optimizer), not autocast; 3: the spike gate judges on the
# device (a NaN step is vetoed, not rolled back), clipping happens in the fused AdamW, batched validation loss
STAGE, VERSION = "pretrain", "3"
MODEL_DIR, HISTORY_FILE = "model", "history.jsonl"
EVENTS_SCHEMA = """
CREATE TABLE IF NOT EXISTS training_events (
    pretrain_key VARCHAR, step BIGINT, kind VARCHAR, action VARCHAR, metric VARCHAR, value DOUBLE,
    threshold DOUBLE, data_window BIGINT, doc_ids VARCHAR, detail VARCHAR, logged_at DOUBLE);
"""
log = logging.getLogger("lmforge")


def key(cfg: PipelineConfig, shard: StageResult, tokenizer: StageResult, tags: dict[str, str] | None = None) -> str:
    return stage_key(STAGE, VERSION, {"model": cfg.model, "train": cfg.train}, [shard, tokenizer])


def preflight(cfg: PipelineConfig) -> None:
    """train.init_from must be a model of this run's shape, and this machine must run train.precision
    (checked before any stage runs)."""
    if problem := precision_problem(cfg.train.precision):
        raise ConfigError(problem)
    if cfg.train.init_from:
        try:
            load_init_weights(cfg.train.init_from, cfg.model)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None


def run(cfg: PipelineConfig, ws: Workspace, shard: StageResult, tokenizer: StageResult,
        tags: dict[str, str] | None = None, force: bool = False, progress: Callable[[dict], None] | None = None) -> StageResult:
    """`tags` go on the model's MLflow run (e.g. the Prefect flow-run id); they are not part of the key."""
    pretrain_key = key(cfg, shard, tokenizer)
    checkpoints, tb_dir = ws.checkpoints / pretrain_key, ws.tensorboard / pretrain_key
    progress = progress or _log_progress

    def build(out: Path) -> dict:
        # a forced rerun of a finished run trains again from scratch; an interrupted run (SIGTERM, a kill)
        # resumes from its checkpoint even when forced (`--only pretrain`), as its stop message promised
        if force and latest_tag(checkpoints) == checkpoint_tag(cfg.train.max_steps):
            shutil.rmtree(checkpoints, ignore_errors=True)
            shutil.rmtree(tb_dir, ignore_errors=True)
        tok = Tokenizer(tokenizer_stage.model_path(tokenizer))
        job = TrainJob(model=to_dict(cfg.model), train=to_dict(cfg.train), shard_dir=str(shard.dir),
                       tokenizer_path=str(tokenizer_stage.model_path(tokenizer)), tokenizer_sha256=tok.sha256,
                       bos_id=tok.bos_id, checkpoint_dir=str(checkpoints), tensorboard_dir=str(tb_dir),
                       history_path=str(checkpoints / HISTORY_FILE), model_dir=str(out / MODEL_DIR),
                       result_path=str(out / "ranks_result.json"), model_extra={"tokenizer_sha256": tok.sha256})
        prepare_history(job)
        run_tags = {"lmforge.config_name": cfg.name, "lmforge.pretrain_key": pretrain_key, **(tags or {})}
        try:
            with mlflow_store.training_run(ws, cfg.register.experiment, f"{cfg.name}-{pretrain_key[:8]}", checkpoints,
                                           run_tags) as tracker:
                if cfg.train.world_size() == 1:  # this process is the one rank
                    result = train_job(job, progress=progress, tracker=tracker)
                else:  # the configured launcher starts the ranks, each on the same train_job; rank 0's history
                    with mlflow_store.HistoryFollower(Path(job.history_path), tracker, start_at_end=True):
                        result = SimpleNamespace(**run_ranks(job, out / "train_job.json",
                                                             on_line=lambda line: log.info("[ranks] %s", line)))
        finally:
            # also when training diverged or was interrupted: the table says what happened
            events = read_events(checkpoints / EVENTS_FILE)
            record_events(ws, pretrain_key, events)
        shutil.copyfile(job.history_path, out / HISTORY_FILE)
        (out / EVENTS_FILE).write_text("".join(json.dumps(e) + "\n" for e in events))
        return {
            "world_size": cfg.train.world_size(),
            "init_from": cfg.train.init_from or None,
            "params": cfg.model.num_params(),
            "steps": result.steps,
            "tokens": result.tokens,
            "final_train_loss": result.final_loss,
            "final_val_loss": result.final_val_loss,
            "wall_seconds": round(result.wall_s, 2),
            "tokens_per_s": (result.steps - result.resumed_from_step) * cfg.train.global_batch_size
            * cfg.model.block_size / max(result.wall_s, 1e-9),
            "resumed_from_step": result.resumed_from_step,
            "skipped_updates": result.skipped_steps,
            "rollbacks": result.rollbacks,
            "training_events": len(events),
            "tensorboard_dir": str(tb_dir),
            "checkpoint_dir": str(checkpoints),
            "mlflow_run_id": tracker.run_id,
        }

    return run_stage(ws, STAGE, pretrain_key, build, force)


def record_events(ws: Workspace, pretrain_key: str, events: list[dict[str, Any]]) -> int:
    """Replace this key's rows of `training_events` with `events` (the whole log, resumes included)."""
    with ws.duckdb() as con:
        con.execute(EVENTS_SCHEMA)
        con.execute("DELETE FROM training_events WHERE pretrain_key = ?", [pretrain_key])
        rows = [[pretrain_key, e["step"], e["kind"], e["action"], e.get("metric", ""), _as_float(e.get("value")),
                 _as_float(e.get("threshold")), e.get("window"), json.dumps(e.get("doc_ids", [])), e.get("detail", ""),
                 e.get("time")] for e in events]
        if rows:
            con.executemany("INSERT INTO training_events VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)
    return len(rows)


def _as_float(value: Any) -> float | None:
    """Events write NaN/Inf as strings (JSON has neither); DuckDB DOUBLE takes them as floats."""
    return None if value is None else float(value)


def model_dir(result: StageResult) -> Path:
    return result.dir / MODEL_DIR


def _log_progress(m: dict) -> None:
    log.info("pretrain step %d/%d loss %.4f lr %.2e grad_norm %.3f tokens/s %.0f%s elapsed %s eta %s", m["step"],
             m["max_steps"], m["train/loss"], m["train/lr"], m["train/grad_norm"], m["train/tokens_per_s"],
             f" val_loss {m['val/loss']:.4f}" if "val/loss" in m else "", _clock(m["elapsed_s"]), _clock(m["eta_s"]))


def _clock(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes // 60}:{minutes % 60:02d}:{secs:02d}" if minutes >= 60 else f"{minutes}:{secs:02d}"
