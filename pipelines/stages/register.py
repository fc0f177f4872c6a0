"""Stage 9, register: the trained model's MLflow run (the one the pretrain stage streamed its metrics
into) gets the params, the evaluation, artifacts, lineage tags and a nested run per stage, and a new
registered model version with alias `candidate` and tags that lead back to the data. Then the promotion
gate: the version becomes `champion` only when its gate metric beats the current champion's (the first
version of a model always does); the decision, both numbers and the reason are written to the version's
tags and to registration.json.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path

import yaml

from lm_core.tracking import read_history
from lm_core.typed_config import ConfigError, flatten
from pipelines import mlflow_store
from pipelines.config import PipelineConfig
from pipelines.data import data_report
from pipelines.mlflow_store import GATE_TAGS, INIT_VERSION_TAG
from pipelines.stages import evaluate as evaluate_stage
from pipelines.stages import export as export_stage
from pipelines.stages import pretrain as pretrain_stage
from pipelines.stages.lineage import lineage
from pipelines.workspace import StageResult, Workspace, run_stage, stage_key

STAGE, VERSION = "register", "3"  # 3: the pyfunc model is logged with its code (self-contained)


def key(cfg: PipelineConfig, results: dict[str, StageResult], tags: dict[str, str] | None = None) -> str:
    return stage_key(STAGE, VERSION, cfg.register, [results["export"], results["evaluate"]])


def run(cfg: PipelineConfig, ws: Workspace, results: dict[str, StageResult], tags: dict[str, str] | None = None,
        force: bool = False) -> StageResult:
    """`tags` are extra run/version tags, e.g. the Prefect flow-run id; they are not part of the key."""
    export, evaluate = results["export"], results["evaluate"]
    gate_value = _gate_value_of(cfg, evaluate)  # a misnamed gate metric stops before anything is logged

    def build(out: Path) -> dict:
        import mlflow

        from pipelines.stages import pyfunc_model

        mlflow_store.configure(ws)
        client = mlflow_store.client(ws)
        experiment = mlflow_store.experiment(client, ws, cfg.register.experiment)
        run_tags = {**lineage(cfg, results), **(tags or {})}
        run_id = _training_run_id(client, results["pretrain"])
        with mlflow.start_run(run_id=run_id, experiment_id=None if run_id else experiment.experiment_id,
                              run_name=f"{cfg.name}-{export.key[:8]}", tags=run_tags) as run:
            if run_id is None:  # no live run to continue (its store was replaced): replay the training history
                _log_history(client, run.info.run_id, results["pretrain"])
            params = {k: str(v)[:500] for k, v in flatten({k: v for k, v in cfg.to_dict().items() if k != "workspace"}).items()}
            mlflow.log_params(params)
            stage_metrics = {f"{stage}.{k}": float(v) for stage in ("ingest", "dedup", "split", "tokenizer", "shard", "pretrain")
                             if stage in results for k, v in results[stage].metrics.items() if _is_number(v)}
            mlflow.log_metrics({**stage_metrics, **{f"eval.{k}": float(v) for k, v in evaluate.metrics.items() if _is_number(v)}})
            _log_stage_runs(results, experiment.experiment_id)
            with tempfile.TemporaryDirectory() as tmp:
                (Path(tmp) / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
                mlflow.log_artifact(str(Path(tmp) / "config.yaml"))
            mlflow.log_artifact(str(evaluate.dir / evaluate_stage.SAMPLES_FILE))
            _log_tables(evaluate)
            mlflow.log_artifact(str(export.dir / "tokenizer.model"), "tokenizer")
            tb_dir = Path(results["pretrain"].metrics.get("tensorboard_dir", ""))
            if tb_dir.is_dir():
                mlflow.log_artifacts(str(tb_dir), "tensorboard")
            with tempfile.TemporaryDirectory() as tmp:
                # the pyfunc needs the lmforge weights only; the Hugging Face copy stays in the export
                model_dir = Path(tmp) / "model_dir"
                shutil.copytree(export.dir, model_dir, ignore=shutil.ignore_patterns(export_stage.HF_DIR))
                info = pyfunc_model.log_model(model_dir, registered_model_name=cfg.register.model_name)
        version = str(info.registered_model_version)
        client.set_registered_model_alias(cfg.register.model_name, cfg.register.alias, version)
        for tag, value in {**run_tags, "lmforge.mlflow_run_id": run.info.run_id}.items():
            client.set_model_version_tag(cfg.register.model_name, version, tag, value)
        decision = promotion_gate(client, cfg, version, gate_value, run_tags.get("lmforge.shard_manifest_key", ""),
                                  started_from=(run_tags.get(INIT_VERSION_TAG), evaluate.metrics.get(f"init_{cfg.register.gate_metric}")))
        registration = {
            "experiment_id": experiment.experiment_id,
            "run_id": run.info.run_id,
            "model_name": cfg.register.model_name,
            "version": version,
            "alias": cfg.register.alias,
            "model_uri": f"models:/{cfg.register.model_name}/{version}",
            "champion": decision["champion_after"],
            "promoted": decision["promoted"],
            "gate": decision,
        }
        (out / "registration.json").write_text(json.dumps(registration, indent=2))
        return registration

    # one registration at a time per workspace: the SQLite store's first migration, version numbers and
    # the champion alias (read, compare, set) must not interleave with another run's
    with ws.lock("registry"):
        return run_stage(ws, STAGE, key(cfg, results), build, force)


def promotion_gate(client, cfg: PipelineConfig, version: str, value: float, eval_data_key: str = "",
                   started_from: tuple[str | None, float | None] = (None, None)) -> dict:
    """Give `version` the champion alias if its gate metric beats the current champion's.

    The champion's number is its own gate tag when it was gated on the same metric, else its run's
    `eval.<metric>`. A champion without that number is never replaced automatically (say so, and let
    a person decide with `lmforge models promote`). Ties keep the champion. `started_from` = (version the
    candidate was initialised from, that model's metric on the candidate's validation data): when that
    version is the champion (a continued run), the two are compared on the same data.
    """
    reg, name = cfg.register, cfg.register.model_name
    metric, higher = reg.gate_metric, reg.gate_higher_is_better
    champion_version = client.get_registered_model(name).aliases.get(reg.champion_alias)
    champion_version = None if champion_version is None else str(champion_version)  # MLflow gives an int
    decision = {"metric": metric, "higher_is_better": higher, "value": value, "version": version,
                "champion_version": champion_version, "champion_value": None, "same_eval_data": None}
    if champion_version is None:
        promoted, reason = True, f"first version with a {metric}: no '{reg.champion_alias}' yet"
    else:
        champion = client.get_model_version(name, champion_version)
        champion_value = recorded_value(client, champion, metric)
        decision["same_eval_data"] = champion.tags.get("lmforge.shard_manifest_key") == eval_data_key
        if started_from[0] == champion_version and started_from[1] is not None:
            champion_value, decision["same_eval_data"] = float(started_from[1]), True  # re-measured on this data
        decision["champion_value"] = champion_value
        if champion_value is None:
            promoted, reason = False, (f"champion v{champion_version} has no recorded {metric}; "
                                       f"compare by hand and run `lmforge models promote {name} {version}`")
        else:
            better = value > champion_value if higher else value < champion_value
            sign = (">" if better else "<=") if higher else ("<" if better else ">=")
            promoted = bool(better)
            reason = (f"{metric} {value:.6g} {sign} champion v{champion_version}'s {champion_value:.6g}"
                      f" ({'higher' if higher else 'lower'} is better)")
    if promoted:
        client.set_registered_model_alias(name, reg.champion_alias, version)
    decision.update(promoted=promoted, decision="promoted" if promoted else "refused", reason=reason,
                    champion_after=version if promoted else champion_version)
    for tag in GATE_TAGS:
        client.set_model_version_tag(name, version, f"lmforge.gate.{tag}", str(decision[tag]))
    return decision


def recorded_value(client, model_version, metric: str) -> float | None:
    """The version's gate number for `metric`: its gate tag, or its run's eval.<metric>; None if neither."""
    tags = model_version.tags
    if tags.get("lmforge.gate.metric") == metric and tags.get("lmforge.gate.value") not in (None, "None"):
        return float(tags["lmforge.gate.value"])
    if model_version.run_id:
        value = client.get_run(model_version.run_id).data.metrics.get(f"eval.{metric}")
        return None if value is None else float(value)
    return None


def _gate_value_of(cfg: PipelineConfig, evaluate: StageResult) -> float:
    metric = cfg.register.gate_metric
    value = evaluate.metrics.get(metric)
    if not _is_number(value) or value != value:  # missing, not a number, or NaN
        known = ", ".join(sorted(k for k, v in evaluate.metrics.items() if _is_number(v)))
        raise ConfigError(f"register.gate_metric={metric!r} is not a number the evaluate stage reported "
                          f"({value!r}); set register.gate_metric to one of: {known}")
    return float(value)


def _log_tables(evaluate: StageResult) -> None:
    """The samples and the multiple-choice results as MLflow tables (the UI's evaluation view reads these)."""
    import mlflow
    import pandas as pd

    mlflow.log_table(pd.DataFrame(evaluate_stage.samples(evaluate)), artifact_file="eval/samples.json")
    rows = evaluate_stage.task_rows(evaluate)
    if rows:
        mlflow.log_table(pd.DataFrame(rows), artifact_file="eval/tasks.json")


def _log_stage_runs(results: dict[str, StageResult], experiment_id: str) -> None:
    """One nested run per stage under the model's run: its key, whether it was reused, its numbers."""
    import mlflow

    for stage, result in results.items():
        if stage == STAGE:
            continue
        with mlflow.start_run(experiment_id=experiment_id, run_name=stage, nested=True, tags={"lmforge.stage": stage}):
            mlflow.log_params({"stage": stage, "key": result.key, "reused": str(result.reused)})
            numbers = {k: float(v) for k, v in result.metrics.items() if _is_number(v)}
            if numbers:
                mlflow.log_metrics(numbers)
            data_report.log_to_mlflow(result)  # dedup: accounting tables + plot; nothing for other stages


def _training_run_id(client, pretrain: StageResult) -> str | None:
    """The MLflow run the pretrain stage trained into, when it is in this store."""
    from mlflow.exceptions import MlflowException

    run_id = pretrain.metrics.get("mlflow_run_id")
    if not run_id:
        return None
    try:
        client.get_run(run_id)
    except MlflowException:
        return None
    return run_id


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
