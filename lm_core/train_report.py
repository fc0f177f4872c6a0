"""What training tells the world, from rank 0: metrics on log steps (tracker + progress callback) and
events (the event log, the tracker, a warning line). Called on sync steps only."""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable

import torch

from lm_core.loader import TokenLoader
from lm_core.shards import ShardDocuments
from lm_core.stability import EventLog
from lm_core.tracking import Tracker
from lm_core.train_metrics import memory_metrics

log = logging.getLogger("lm_core.engine")


class StepReport:
    def __init__(self, tracker: Tracker, progress: Callable[[dict], None] | None, events: EventLog, rank: int,
                 device: torch.device, tokens_per_step: int, flops_per_token: int, peak_tflops: float, max_steps: int):
        self.tracker, self.progress, self.events, self.rank, self.device = tracker, progress, events, rank, device
        self.tokens_per_step, self.flops_per_token, self.peak_tflops = tokens_per_step, flops_per_token, peak_tflops
        self.max_steps = max_steps
        self._window_start, self._window_steps = time.perf_counter(), 0
        self._started = self._window_start

    def count_step(self) -> None:
        self._window_steps += 1

    def log(self, step: int, metrics: dict[str, float]) -> None:
        """A log step's metrics, with throughput over the steps since the last log (timed after the host read
        that ended them, so on a GPU this is the device's time, not the time it took to queue the steps)."""
        elapsed = time.perf_counter() - self._window_start
        tokens_per_s = self._window_steps * self.tokens_per_step / max(elapsed, 1e-9)
        metrics = {**metrics, "train/tokens_per_s": tokens_per_s, "train/step_s": elapsed / max(1, self._window_steps),
                   **memory_metrics(self.device)}
        if self.peak_tflops > 0:
            metrics["train/mfu"] = tokens_per_s * self.flops_per_token / (self.peak_tflops * 1e12)
        if self.rank == 0:
            self.tracker.log_metrics(metrics, step)
            if self.progress:
                elapsed = time.perf_counter() - self._started
                eta = (self.max_steps - step) * metrics["train/step_s"]
                self.progress({"step": step, "max_steps": self.max_steps, "elapsed_s": elapsed, "eta_s": eta, **metrics})
        self._window_start, self._window_steps = time.perf_counter(), 0

    def log_final(self, metrics: dict[str, float], step: int) -> None:
        if self.rank == 0:
            self.tracker.log_metrics(metrics, step)

    def event(self, step: int, kind: str, action: str, **kw) -> None:
        if self.rank != 0:
            return
        record = self.events.write(step, kind, action, **kw)
        measured = f"{kw['metric']} {kw['value']:.4g} > {kw['threshold']:.4g} " if kw.get("metric") else ""
        log.warning("training event at step %d: %s -> %s %s%s", step, kind, action, measured, kw.get("detail", ""))
        self.tracker.log_text("stability/events", json.dumps(record), step)
        value = kw.get("value")
        self.tracker.log_metrics({f"stability/{kind}": value if isinstance(value, float) and math.isfinite(value) else 1.0}, step)

    @staticmethod
    def doc_ids(documents: ShardDocuments | None, loader: TokenLoader, window_ids: list[int], world_size: int) -> list[str]:
        """Ids of the documents every rank's samples of a step came from (sorted, unique); [] without tables.

        Every rank reaches this together (the verdicts are the same on all ranks), so the gather cannot hang."""
        if documents is None:
            return []
        ids: set[str] = set()
        for w in window_ids:
            shard, start = loader.locate(w)
            ids.update(documents.doc_ids(shard, start, start + loader.block_size + 1))
        if world_size > 1:
            gathered: list = [None] * world_size
            torch.distributed.all_gather_object(gathered, sorted(ids))
            ids = {d for part in gathered for d in part}
        return sorted(ids)
