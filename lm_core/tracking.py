"""The Tracker port: how lm_core reports metrics without knowing any tracking service.

lm_core ships a TensorBoard writer and a JSONL history writer; the MLflow implementation lives in
`pipelines.mlflow_store` and satisfies the same protocol.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Protocol


class Tracker(Protocol):
    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...
    def log_text(self, tag: str, text: str, step: int) -> None: ...
    def close(self) -> None: ...


class TensorBoardTracker:
    """Scalars and text for TensorBoard; flushes often so a running job's curves are live."""

    def __init__(self, log_dir: Path, purge_step: int | None = None):
        """purge_step: a resumed run's first new step; TensorBoard hides what an earlier attempt logged from
        there on (steps the interrupted run did after its last checkpoint, done again now)."""
        from torch.utils.tensorboard import SummaryWriter

        self.log_dir = Path(log_dir)
        self._writer = SummaryWriter(log_dir=str(log_dir), flush_secs=10, purge_step=purge_step)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        for name, value in metrics.items():
            self._writer.add_scalar(name, value, step)

    def log_text(self, tag: str, text: str, step: int) -> None:
        self._writer.add_text(tag, text, step)

    def close(self) -> None:
        self._writer.close()


class JsonlTracker:
    """One JSON line per log call: the durable history (resumes append to it; tests and followers read it)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a", encoding="utf-8")

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self._file.write(json.dumps({"step": step, "metrics": metrics}) + "\n")
        self._file.flush()

    def log_text(self, tag: str, text: str, step: int) -> None:
        self._file.write(json.dumps({"step": step, "text": {tag: text}}) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def read_history(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def truncate_history(path: Path, last_step: int) -> None:
    """Keep the rows up to `last_step` (a resumed run's checkpoint): the interrupted attempt's later rows are
    logged again by the resumed one, so the history stays one continuous record."""
    path = Path(path)
    if not path.is_file():
        return
    kept = [line for line in path.read_text(encoding="utf-8").splitlines(keepends=True)
            if line.strip() and line.endswith("\n") and json.loads(line)["step"] <= last_step]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(kept), encoding="utf-8")
    tmp.replace(path)


class MultiTracker:
    def __init__(self, *trackers: Tracker):
        self.trackers = trackers

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        for tracker in self.trackers:
            tracker.log_metrics(metrics, step)

    def log_text(self, tag: str, text: str, step: int) -> None:
        for tracker in self.trackers:
            tracker.log_text(tag, text, step)

    def close(self) -> None:
        for tracker in self.trackers:
            tracker.close()
