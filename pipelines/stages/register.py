"""Stage 9, register: the trained model's MLflow run (the one the pretrain stage streamed its metrics
into) gets the params, the evaluation, artifacts, lineage tags and a nested run per stage, and a new
registered model version with alias `candidate` and tags that lead back to the data. Then the promotion
gate: the version becomes `champion` only when its gate metric beats the current champion's (the first
version of a model always does); the decision, both numbers and the reason are written to the version's
tags and to registration.json.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable
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
from pipelines.stages import tokenizer as tokenizer_stage
from pipelines.stages.lineage import lineage
from pipelines.workspace import StageResult, Workspace, run_stage, stage_key

# 3: the pyfunc model is logged with its code (self-contained), and the gate compares champion and candidate on
# identical validation windows
STAGE, VERSION = "register", "3"
EVAL_WINDOWS_TAG = "lmforge.eval_windows_sha256"


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
                with _quiet_mlflow():  # its signature and dependency notes are not for the console
                    info = pyfunc_model.log_model(model_dir, registered_model_name=cfg.register.model_name)
        version = str(info.registered_model_version)
        client.set_registered_model_alias(cfg.register.model_name, cfg.register.alias, version)
        windows = str(evaluate.metrics.get("val_windows_sha256", ""))
        for tag, value in {**run_tags, "lmforge.mlflow_run_id": run.info.run_id, EVAL_WINDOWS_TAG: windows}.items():
            client.set_model_version_tag(cfg.register.model_name, version, tag, value)
        started_from = (run_tags.get(INIT_VERSION_TAG), evaluate.metrics.get(f"init_{cfg.register.gate_metric}"))
        decision = promotion_gate(client, cfg, version, gate_value, windows, started_from=started_from,
                                  rescore=ChampionRescorer(ws, cfg, results))
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


def promotion_gate(client, cfg: PipelineConfig, version: str, value: float, eval_windows: str = "",
                   started_from: tuple[str | None, float | None] = (None, None),
                   rescore: Callable[[str], float | None] | None = None) -> dict:
    """Give `version` the champion alias if its gate metric beats the current champion's on the same data.

    Like is compared with like: the champion's recorded number counts only when it was measured on the
    identical validation windows (`eval_windows`, the evaluate stage's val_windows_sha256). Otherwise the
    champion is scored again on the candidate's windows: by `started_from` (a continued run measured the
    model it started from, when that is the champion) or by `rescore(version)`; when neither can (another
    tokenizer or block size, a metric that is not a validation score), the candidate is not promoted and
    the reason says so. A champion without a recorded number is never replaced automatically. Ties keep
    the champion. The first version of a model is promoted.
    """
    reg, name = cfg.register, cfg.register.model_name
    metric, higher = reg.gate_metric, reg.gate_higher_is_better
    champion_version = client.get_registered_model(name).aliases.get(reg.champion_alias)
    champion_version = None if champion_version is None else str(champion_version)  # MLflow gives an int
    decision = {"metric": metric, "higher_is_better": higher, "value": value, "version": version,
                "champion_version": champion_version, "champion_value": None, "same_eval_data": None,
                "champion_rescored": False}
    if champion_version is None:
        promoted, reason = True, f"first version with a {metric}: no '{reg.champion_alias}' yet"
    else:
        champion = client.get_model_version(name, champion_version)
        champion_value, same, rescored = _champion_on_these_windows(client, champion, metric, eval_windows, started_from,
                                                                    rescore)
        decision.update(champion_value=champion_value, same_eval_data=same, champion_rescored=rescored)
        if champion_value is None and not same:
            promoted, reason = False, (f"champion v{champion_version} was scored on other validation windows and could "
                                       f"not be scored on this run's (another tokenizer or block size, or {metric} is "
                                       f"not a validation score); compare by hand and run `lmforge models promote "
                                       f"{name} {version}`")
        elif champion_value is None:
            promoted, reason = False, (f"champion v{champion_version} has no recorded {metric}; "
                                       f"compare by hand and run `lmforge models promote {name} {version}`")
        else:
            better = value > champion_value if higher else value < champion_value
            sign = (">" if better else "<=") if higher else ("<" if better else ">=")
            promoted = bool(better)
            reason = (f"{metric} {value:.6g} {sign} champion v{champion_version}'s {champion_value:.6g}"
                      f"{' (re-scored on these windows)' if rescored else ''} ({'higher' if higher else 'lower'} is better)")
    if promoted:
        client.set_registered_model_alias(name, reg.champion_alias, version)
    decision.update(promoted=promoted, decision="promoted" if promoted else "refused", reason=reason,
                    champion_after=version if promoted else champion_version)
    for tag in GATE_TAGS:
        client.set_model_version_tag(name, version, f"lmforge.gate.{tag}", str(decision[tag]))
    return decision


def _champion_on_these_windows(client, champion, metric: str, eval_windows: str, started_from, rescore):
    """(champion's number on the candidate's windows or None, whether it is on the same windows, re-scored)."""
    if eval_windows and champion.tags.get(EVAL_WINDOWS_TAG) == eval_windows:
        return recorded_value(client, champion, metric), True, False
    if started_from[0] == str(champion.version) and started_from[1] is not None:
        return float(started_from[1]), True, True  # a continued run measured it on these windows
    score = rescore(str(champion.version)) if rescore is not None else None
    return score, score is not None, score is not None


class ChampionRescorer:
    """Scores a registered version on this run's validation windows (the evaluate stage's own scoring), when
    it uses this run's tokenizer and block size; None otherwise."""

    METRICS = {"val_bpb": "bpb", "val_loss": "loss", "val_perplexity": "perplexity"}

    def __init__(self, ws: Workspace, cfg: PipelineConfig, results: dict[str, StageResult]):
        self.ws, self.cfg, self.results = ws, cfg, results

    def __call__(self, version: str) -> float | None:
        from lm_core.evaluation import bits_per_byte
        from lm_core.shards import open_split
        from lm_core.tokenizer import Tokenizer
        from lm_core.weights import load_model_dir

        cfg, name = self.cfg, self.cfg.register.model_name
        if cfg.register.gate_metric not in self.METRICS or "shard" not in self.results:
            return None
        model_dir = mlflow_store.download_model(self.ws, f"models:/{name}/{version}",
                                                self.ws.root / "registry" / f"{name}-v{version}")
        model, _ = load_model_dir(model_dir)
        tok = Tokenizer(tokenizer_stage.model_path(self.results["tokenizer"]))
        if Tokenizer(model_dir / "tokenizer.model").sha256 != tok.sha256 or model.cfg.block_size != cfg.model.block_size:
            return None
        val = open_split(self.results["shard"].dir, "val", tok.sha256)
        scores = bits_per_byte(model, val, tok.token_bytes(), block_size=cfg.model.block_size,
                               max_windows=cfg.eval.max_windows, batch_size=cfg.eval.batch_size)
        if scores["windows_sha256"] != self.results["evaluate"].metrics.get("val_windows_sha256"):
            return None
        return float(scores[self.METRICS[cfg.register.gate_metric]])


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


@contextlib.contextmanager
def _quiet_mlflow():
    logger = logging.getLogger("mlflow")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


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
