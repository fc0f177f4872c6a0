"""The workspace's MLflow store, in one place: set-up, experiments, the live training tracker, the
registry's tag names, and `models:/` resolution. Stages and applications import it; nothing else
configures MLflow.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from pipelines.workspace import Workspace

# the promotion gate's version tags, lmforge.gate.<name> (written by the register stage, read by `lmforge models`)
GATE_TAGS = ("decision", "metric", "value", "higher_is_better", "champion_version", "champion_value", "same_eval_data",
             "champion_rescored", "reason")
INIT_VERSION_TAG = "lmforge.init_from_version"  # set by a continued run: the version it started from
RUN_ID_FILE = "mlflow_run_id"  # beside a pretrain key's checkpoints: a resumed run continues the same MLflow run


_READY: set[str] = set()  # stores this process has opened (created and migrated)


def configure(ws: Workspace) -> None:
    """Point MLflow's tracking and registry at the workspace's SQLite store."""
    import mlflow

    _open_store(ws)
    mlflow.set_tracking_uri(ws.mlflow_uri)
    mlflow.set_registry_uri(ws.mlflow_uri)


def client(ws: Workspace, must_exist: bool = False):
    """An MlflowClient on the workspace's store (importing no stage: `lmforge models list` stays light)."""
    from mlflow import MlflowClient

    if must_exist and not (ws.mlflow_dir / "mlflow.db").is_file():
        raise LookupError(f"no MLflow registry in {ws.root}; run `lmforge run` first or pass --workspace")
    _open_store(ws)
    return MlflowClient(tracking_uri=ws.mlflow_uri, registry_uri=ws.mlflow_uri)


def _open_store(ws: Workspace) -> None:
    """Create and migrate the SQLite store under a workspace lock: two runs that open a new store at once
    would otherwise race through MLflow's schema migrations."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    if ws.mlflow_uri in _READY:
        return
    from mlflow import MlflowClient

    ws.mlflow_dir.mkdir(parents=True, exist_ok=True)
    with ws.lock("mlflow-store"):
        MlflowClient(tracking_uri=ws.mlflow_uri).search_experiments(max_results=1)
    _READY.add(ws.mlflow_uri)


def experiment(mlflow_client, ws: Workspace, name: str):
    """The experiment, created with its artifacts inside the workspace (MLflow's default is ./mlruns)."""
    found = mlflow_client.get_experiment_by_name(name)
    if found is None:
        location = (ws.mlflow_dir / "artifacts").resolve().as_uri()
        mlflow_client.create_experiment(name, artifact_location=location)
        found = mlflow_client.get_experiment_by_name(name)
    return found


class MlflowTracker:
    """lm_core's Tracker protocol on an MLflow run: training metrics stream in as they are logged."""

    def __init__(self, mlflow_client, run_id: str):
        self.client, self.run_id = mlflow_client, run_id

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        points = [Metric(k, float(v), now, step) for k, v in metrics.items()]
        if points:
            self.client.log_batch(self.run_id, metrics=points)

    def log_text(self, tag: str, text: str, step: int) -> None:
        self.client.log_text(self.run_id, text + "\n", f"{tag}/step_{step:08d}.txt")

    def close(self) -> None:
        pass


@contextlib.contextmanager
def training_run(ws: Workspace, experiment_name: str, run_name: str, state_dir: Path,
                 tags: dict[str, str]) -> Iterator[MlflowTracker]:
    """The MLflow run of one trained model, live from the first step: created, or (when `state_dir` holds
    its id, a resumed training) reopened; system metrics sampled while it runs. The run stays the model's
    run: the register stage logs the evaluation and the registered version to it."""
    from mlflow.exceptions import MlflowException
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    mlflow_client = client(ws)
    id_file = Path(state_dir) / RUN_ID_FILE
    run_id = id_file.read_text().strip() if id_file.is_file() else None
    try:
        run = mlflow_client.get_run(run_id) if run_id else None
    except MlflowException:
        run = None
    resumed = run is not None
    if run is None:
        exp = experiment(mlflow_client, ws, experiment_name)
        run = mlflow_client.create_run(exp.experiment_id, run_name=run_name, tags=tags)
        id_file.parent.mkdir(parents=True, exist_ok=True)
        id_file.write_text(run.info.run_id)
    else:
        mlflow_client.update_run(run.info.run_id, status="RUNNING")
    run_id = run.info.run_id
    monitor = SystemMetricsMonitor(run_id, sampling_interval=10, resume_logging=resumed, tracking_uri=ws.mlflow_uri)
    monitor.start()
    status = "FAILED"
    try:
        yield MlflowTracker(mlflow_client, run_id)
        status = "FINISHED"
    finally:
        monitor.finish()
        mlflow_client.set_terminated(run_id, status=status)


class HistoryFollower:
    """Forward the lines rank 0 appends to a JSONL history (lm_core.tracking.JsonlTracker) to a tracker while
    training runs in other processes; `stop()` forwards the rest."""

    def __init__(self, path: Path, tracker, every_s: float = 2.0, start_at_end: bool = False):
        """start_at_end: forward only what is appended from now on (a resumed run's earlier rows are logged)."""
        self.path, self.tracker, self.every_s = Path(path), tracker, every_s
        self._offset = self.path.stat().st_size if start_at_end and self.path.is_file() else 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="history-follower", daemon=True)

    def __enter__(self) -> HistoryFollower:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._forward()

    def _loop(self) -> None:
        while not self._stop.wait(self.every_s):
            self._forward()

    def _forward(self) -> None:
        if not self.path.is_file():
            return
        with open(self.path, encoding="utf-8") as f:
            f.seek(self._offset)
            while (line := f.readline()).endswith("\n"):  # a line still being written waits for the next round
                self._offset = f.tell()
                record = json.loads(line)
                if "metrics" in record:
                    self.tracker.log_metrics(record["metrics"], record["step"])
                for tag, text in record.get("text", {}).items():
                    self.tracker.log_text(tag, text, record["step"])


def resolve_model(ref: str | None, workspace: Path) -> Path:
    """A model directory from `--model`: an export directory, `models:/NAME@ALIAS` or `models:/NAME/VERSION`
    (downloaded from the workspace's registry), or by default the workspace's latest export."""
    if ref and ref.startswith("models:/"):
        return download_model(Workspace(workspace), ref)
    if ref:
        return Path(ref)
    latest = Path(workspace) / "LATEST_EXPORT"
    if not latest.is_file():
        raise FileNotFoundError(f"no export in {workspace}; run `lmforge run` first or pass --model DIR")
    return Path(latest.read_text().strip())


def download_model(ws: Workspace, uri: str, dst: Path | None = None) -> Path:
    """The lmforge model directory inside a registered pyfunc model (`models:/...`), downloaded (to `dst`, or
    MLflow's temporary location)."""
    import mlflow
    from mlflow.exceptions import MlflowException
    from mlflow.models import Model

    configure(ws)
    target = dst if dst is not None and (dst / "MLmodel").is_file() else None
    if target is None:
        try:
            target = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(dst) if dst else None))
        except MlflowException as exc:
            raise FileNotFoundError(f"{uri} not found in the registry at {ws.mlflow_uri} "
                                    f"({exc.message.splitlines()[0]}); check --workspace and the model name") from None
    # the pyfunc keeps the export under artifacts/<its directory name>; MLmodel says where
    artifact = Model.load(str(target)).flavors["python_function"]["artifacts"]["model_dir"]["path"]
    return target / artifact
