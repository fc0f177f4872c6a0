"""Watching for gradient instabilities: a robust spike detector, fault injection for tests, and the event log.

The detector keeps the last `window` accepted values of the step loss and the pre-clip gradient norm and
flags a value above `level + max(zscore * sigma, min_jump * |level|)`, where `level` is the median of
the last few accepted values and `sigma = 1.4826 * MAD(step-to-step differences) / sqrt(2)`. Medians and
the MAD (median absolute deviation) ignore the occasional outlier that would inflate a mean/stddev
threshold; taking the spread of differences rather than of the values keeps the steady fall of the loss
early in training from counting as noise; the relative floor keeps a near-constant history (MAD ~ 0)
from flagging tiny wiggles. Only upward moves count: a loss that falls faster than usual is fine.

Verdicts, in the order the engine acts on them:
  ok        the step's update is applied and its values join the history
  skip      a spike: the update is dropped (the optimizer does not step), the data window is consumed
  rollback  a NaN/Inf, or `patience` spikes in a row: reload the last good checkpoint and skip the
            offending data windows
"""

from __future__ import annotations

import json
import math
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

# grad_spike multiplies one step's gradients (not its loss) by GRAD_SPIKE_FACTOR: a grad-norm spike, or an
# fp16 overflow that DeepSpeed's loss scaling absorbs
FAULT_KINDS = ("nan", "corrupt_batch", "lr_spike", "grad_spike")
GRAD_SPIKE_FACTOR = 1e6
METRICS = ("loss", "grad_norm")
LEVEL_SPAN = 5  # recent accepted values whose median is the reference level


@dataclass
class StabilityConfig:
    enabled: bool = True
    window: int = 50  # accepted steps the running MAD looks back over
    min_history: int = 20  # no verdict other than NaN/Inf until this many steps were accepted
    zscore: float = 6.0  # robust z-score above the recent level that counts as a spike
    loss_min_jump: float = 0.3  # ... and at least this fraction above the recent level (loss)
    grad_norm_min_jump: float = 1.0  # the same for the grad norm, which drifts up and down more in healthy runs
    patience: int = 3  # this many spikes in a row roll back instead of skipping
    max_rollbacks: int = 3  # one more rollback than this stops the run with TrainingDiverged
    lr_spike_factor: float = 100.0  # what an injected lr_spike multiplies the rate by
    inject_fault: str = ""  # tests only: "kind@step[,kind@step...]", kind in nan|corrupt_batch|lr_spike|grad_spike

    def validate(self) -> None:
        for key in ("window", "min_history", "patience"):
            if getattr(self, key) < 1:
                raise ValueError(f"train.stability.{key}={getattr(self, key)} must be >= 1")
        if self.min_history > self.window:
            raise ValueError(f"train.stability.min_history={self.min_history} must be <= train.stability.window={self.window}")
        if self.max_rollbacks < 0 or self.zscore <= 0 or min(self.loss_min_jump, self.grad_norm_min_jump) < 0:
            raise ValueError(f"train.stability: max_rollbacks={self.max_rollbacks} must be >= 0, zscore={self.zscore} > 0, "
                             f"loss_min_jump={self.loss_min_jump} and grad_norm_min_jump={self.grad_norm_min_jump} >= 0")
        self.faults()  # parse errors surface at config time

    def faults(self) -> dict[int, list[str]]:
        """{step: [fault kinds]} from inject_fault."""
        out: dict[int, list[str]] = {}
        for item in filter(None, (s.strip() for s in self.inject_fault.split(","))):
            kind, _, step = item.partition("@")
            if kind not in FAULT_KINDS or not step.isdigit():
                raise ValueError(f"train.stability.inject_fault has '{item}'; write kind@step with kind one of "
                                 f"{', '.join(FAULT_KINDS)}, e.g. 'nan@25,corrupt_batch@40'")
            out.setdefault(int(step), []).append(kind)
        return out


class TrainingDiverged(RuntimeError):
    """Raised when the run keeps spiking after train.stability.max_rollbacks rollbacks (or cannot roll back)."""


@dataclass
class Verdict:
    action: Literal["ok", "skip", "rollback"]
    reason: str = ""  # "nonfinite" | "spike" | "persistent_spike"
    metric: str = ""
    value: float = float("nan")
    threshold: float = float("nan")


class SpikeDetector:
    def __init__(self, cfg: StabilityConfig):
        self.cfg = cfg
        self.history = {m: deque(maxlen=cfg.window) for m in METRICS}
        self.consecutive = 0  # spikes in a row so far

    def threshold(self, metric: str) -> float:
        """The value above which `metric` is a spike; inf until min_history values were accepted."""
        values = self.history[metric]
        if len(values) < self.cfg.min_history:
            return math.inf
        arr = np.fromiter(values, dtype=np.float64)
        level = float(np.median(arr[-LEVEL_SPAN:]))  # (n,) -> where the series is now
        diffs = np.diff(arr)
        sigma = 1.4826 * float(np.median(np.abs(diffs - np.median(diffs)))) / math.sqrt(2)
        min_jump = self.cfg.loss_min_jump if metric == "loss" else self.cfg.grad_norm_min_jump
        return level + max(self.cfg.zscore * sigma, min_jump * abs(level))

    def check(self, loss: float, grad_norm: float | None) -> Verdict:
        """Judge one optimizer step from its mean loss and pre-clip grad norm (None: not measured)."""
        values = {"loss": loss, "grad_norm": grad_norm}
        for metric, value in values.items():
            if value is not None and not math.isfinite(value):
                self.consecutive = 0
                return Verdict("rollback", "nonfinite", metric, value, math.inf)
        for metric, value in values.items():
            if value is None:
                continue
            limit = self.threshold(metric)
            if value > limit:
                self.consecutive += 1
                if self.consecutive >= self.cfg.patience:
                    self.consecutive = 0
                    return Verdict("rollback", "persistent_spike", metric, value, limit)
                return Verdict("skip", "spike", metric, value, limit)
        self.consecutive = 0
        for metric, value in values.items():
            if value is not None:
                self.history[metric].append(float(value))
        return Verdict("ok")

    def rebaseline(self) -> None:
        """Forget the history: the values now are the new normal (a persistent shift with nothing to roll back to)."""
        for metric in METRICS:
            self.history[metric].clear()
        self.consecutive = 0

    def state_dict(self) -> dict:
        return {"history": {m: list(v) for m, v in self.history.items()}, "consecutive": self.consecutive}

    def load_state_dict(self, state: dict) -> None:
        for metric in METRICS:
            self.history[metric] = deque(state["history"].get(metric, []), maxlen=self.cfg.window)
        self.consecutive = int(state.get("consecutive", 0))


class FaultInjector:
    """Fires each configured fault once, at its step (a replay after a rollback does not re-fire it)."""

    def __init__(self, cfg: StabilityConfig):
        self.pending = cfg.faults()
        self.lr_factor = cfg.lr_spike_factor

    def take(self, step: int) -> list[str]:
        return self.pending.pop(step, [])

    @staticmethod
    def corrupt(window: np.ndarray, vocab_size: int, seed: int) -> np.ndarray:
        """Uniformly random tokens in place of real text: a batch the model cannot predict."""
        return np.random.default_rng(seed).integers(0, vocab_size, size=window.shape, dtype=np.int64)


@dataclass
class EventLog:
    """Training events as JSON lines (rank 0 only); kept next to the checkpoints so a resume appends."""

    path: Path
    events: list[dict] = field(default_factory=list)

    def write(self, step: int, kind: str, action: str, *, metric: str = "", value: float = float("nan"),
              threshold: float = float("nan"), window: int | None = None, doc_ids: list | None = None,
              detail: str = "") -> dict:
        event = {"time": time.time(), "step": step, "kind": kind, "action": action, "metric": metric,
                 "value": _json_float(value), "threshold": _json_float(threshold), "window": window,
                 "doc_ids": list(doc_ids or []), "detail": detail}
        self.events.append(event)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(event) + "\n")
        return event


def read_events(path: Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        return []
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _json_float(x: float) -> float | str | None:
    """JSON has no NaN/Inf: keep them readable as strings."""
    if x is None:
        return None
    return float(x) if math.isfinite(x) else str(float(x))
