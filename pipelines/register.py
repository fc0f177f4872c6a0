"""Stage 9, register: one MLflow run per trained model — params, per-step metrics, artifacts — and a
new registered model version with alias `candidate` and tags that lead back to the data.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

import yaml

from lm_core.tracking import read_history
from lm_core.typed_config import flatten
from pipelines import evaluate as evaluate_stage
from pipelines import pretrain as pretrain_stage
from pipelines.config import PipelineConfig
from pipelines.lineage import lineage
from pipelines.workspace import StageResult, Workspace, run_stage, stage_key

STAGE, VERSION = "register", "1"
PIP_REQUIREMENTS = ["torch==2.13.0", "safetensors", "sentencepiece", "numpy"]


def key(cfg: PipelineConfig, results: dict[str, StageResult], tags: dict[str, str] | None = None) -> str:
    return stage_key(STAGE, VERSION, cfg.register, [results["export"], results["evaluate"]])


def configure_mlflow(ws: Workspace) -> None:
    import mlflow

    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    ws.mlflow_dir.mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(ws.mlflow_uri)
    mlflow.set_registry_uri(ws.mlflow_uri)


def run(cfg: PipelineConfig, ws: Workspace, results: dict[str, StageResult], tags: dict[str, str] | None = None,
        force: bool = False) -> StageResult:
    """`tags` are extra run/version tags, e.g. the Prefect flow-run id; they are not part of the key."""
    export, evaluate = results["export"], results["evaluate"]

    def build(out: Path) -> dict:
        import mlflow
        from mlflow import MlflowClient

        from pipelines.mlflow_model import LmforgeTextGenerator

        configure_mlflow(ws)
        client = MlflowClient()
        experiment = _experiment(client, ws, cfg.register.experiment)
        run_tags = {**lineage(cfg, results), **(tags or {})}
        with mlflow.start_run(experiment_id=experiment.experiment_id, run_name=f"{cfg.name}-{export.key[:8]}", tags=run_tags) as run:
            params = {k: str(v)[:500] for k, v in flatten({k: v for k, v in cfg.to_dict().items() if k != "workspace"}).items()}
            mlflow.log_params(params)
            _log_history(client, run.info.run_id, results["pretrain"])
            stage_metrics = {f"{stage}.{k}": float(v) for stage in ("ingest", "dedup", "split", "tokenizer", "shard", "pretrain")
                             if stage in results for k, v in results[stage].metrics.items() if _is_number(v)}
            mlflow.log_metrics({**stage_metrics, **{f"eval.{k}": float(v) for k, v in evaluate.metrics.items()}})
            with tempfile.TemporaryDirectory() as tmp:
                (Path(tmp) / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
                mlflow.log_artifact(str(Path(tmp) / "config.yaml"))
            mlflow.log_artifact(str(evaluate.dir / evaluate_stage.SAMPLES_FILE))
            mlflow.log_artifact(str(export.dir / "tokenizer.model"), "tokenizer")
            tb_dir = Path(results["pretrain"].metrics.get("tensorboard_dir", ""))
            if tb_dir.is_dir():
                mlflow.log_artifacts(str(tb_dir), "tensorboard")
            info = mlflow.pyfunc.log_model(
                name="model",
                python_model=LmforgeTextGenerator(),
                artifacts={"model_dir": str(export.dir)},
                pip_requirements=PIP_REQUIREMENTS,
                registered_model_name=cfg.register.model_name,
            )
        version = str(info.registered_model_version)
        client.set_registered_model_alias(cfg.register.model_name, cfg.register.alias, version)
        for tag, value in {**run_tags, "lmforge.mlflow_run_id": run.info.run_id}.items():
            client.set_model_version_tag(cfg.register.model_name, version, tag, value)
        registration = {
            "experiment_id": experiment.experiment_id,
            "run_id": run.info.run_id,
            "model_name": cfg.register.model_name,
            "version": version,
            "alias": cfg.register.alias,
            "model_uri": f"models:/{cfg.register.model_name}/{version}",
        }
        (out / "registration.json").write_text(json.dumps(registration, indent=2))
        return registration

    return run_stage(ws, STAGE, key(cfg, results), build, force)


def _experiment(client, ws: Workspace, name: str):
    """The experiment, created with its artifacts inside the workspace (MLflow's default is ./mlruns)."""
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        location = (ws.mlflow_dir / "artifacts").resolve().as_uri()
        client.create_experiment(name, artifact_location=location)
        experiment = client.get_experiment_by_name(name)
    return experiment


def _log_history(client, run_id: str, pretrain: StageResult) -> None:
    """Replay the training history (one point per logged step) as MLflow metrics, in batches."""
    from mlflow.entities import Metric

    history_path = pretrain.dir / pretrain_stage.HISTORY_FILE
    now_ms = int(time.time() * 1000)
    if not history_path.is_file():
        return
    points = [
        Metric(name, float(value), now_ms, record["step"])
        for record in read_history(history_path)
        for name, value in record.get("metrics", {}).items()
    ]
    for start in range(0, len(points), 1000):
        client.log_batch(run_id, metrics=points[start : start + 1000])


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
