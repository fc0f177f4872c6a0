"""Watching for gradient instabilities: a robust spike gate that judges every step on the device, fault
injection for tests, and the event log.

The gate keeps the last `window` accepted values of the step loss and the pre-clip gradient norm and
flags a value above `level + max(zscore * sigma, min_jump * |level|)`, where `level` is the median of
the last few accepted values and `sigma = 1.4826 * MAD(step-to-step differences) / sqrt(2)`. Medians and
the MAD (median absolute deviation) ignore the occasional outlier that would inflate a mean/stddev
threshold; taking the spread of differences rather than of the values keeps the steady fall of the loss
early in training from counting as noise; the relative floor keeps a near-constant history (MAD ~ 0)
from flagging tiny wiggles. Only upward moves count: a loss that falls faster than usual is fine.

Everything lives in fixed-shape device tensors (a ring buffer of history, a per-step verdict log), so
judging a step reads nothing back to the host: the verdict vetoes the optimizer's update through a
device-side 0/1 (`found_inf` of the fused AdamW kernel, lm_core.gated_adamw). The host reads the verdict
log on log and checkpoint steps only, writes the events and acts on rollbacks there.

Verdicts:
  ok          the step's update is applied and its values join the history
  spike       a value above its threshold: the update is vetoed, the data window consumed
  nonfinite   a NaN/Inf loss or grad norm: vetoed like a spike (the weights never see it)
  persistent  `patience` vetoed steps in a row: the damage got in before the gate saw it (an lr
              spike, bad weights), so the host reloads the last good checkpoint and skips the
              offending data windows
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

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
    min_history: int = 20  # no verdict other than NaN/Inf until this many steps were accepted (nor during lr warmup)
    zscore: float = 6.0  # robust z-score above the recent level that counts as a spike
    loss_min_jump: float = 0.3  # ... and at least this fraction above the recent level (loss)
    # the same for the grad norm, which swings far more in healthy runs (2-3x its recent median is common);
    # a bad batch or a blown-up step moves it by orders of magnitude
    grad_norm_min_jump: float = 3.0
    judge_warmup: bool = False  # judge spikes during the lr warmup too (by default only NaN/Inf are vetoed there)
    patience: int = 3  # this many spikes in a row roll back instead of skipping
    max_rollbacks: int = 3  # one more rollback than this stops the run with TrainingDiverged
    lr_spike_factor: float = 1000.0  # what an injected lr_spike multiplies the rate by (a step that does damage)
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


REASONS = ("ok", "spike", "nonfinite", "persistent_spike")  # verdict codes 0..3 on the device
UNJUDGED = -1  # a step the gate did not see (fp16: DeepSpeed skipped it as a loss-scale overflow)


@dataclass
class Verdict:
    """One step's verdict as the host reads it back."""

    reason: str  # one of REASONS, or "unjudged"
    metric: str = ""  # the metric that triggered it
    value: float = float("nan")
    threshold: float = float("nan")
    loss: float = float("nan")  # the step's mean loss and pre-clip grad norm, whatever the verdict
    grad_norm: float = float("nan")

    @property
    def vetoed(self) -> bool:
        return self.reason not in ("ok", "unjudged")


class SpikeGate:
    """The spike detector as fixed-shape device tensors: `judge` costs no host sync."""

    def __init__(self, cfg: StabilityConfig, device: torch.device | str = "cpu", log_size: int = 1):
        self.cfg, self.device = cfg, torch.device(device)
        kw = dict(device=self.device)
        self.history = torch.full((len(METRICS), cfg.window), math.nan, **kw)  # (2, W) ring buffer
        self.head = torch.zeros((), dtype=torch.long, **kw)  # the slot the next accepted step writes
        self.count = torch.zeros((), dtype=torch.long, **kw)  # accepted values held, <= W
        self.consecutive = torch.zeros((), dtype=torch.long, **kw)  # vetoed steps in a row
        self.min_jump = torch.tensor([cfg.loss_min_jump, cfg.grad_norm_min_jump], **kw)
        self._ring = torch.arange(cfg.window, **kw)
        # built once: a tensor made from host values in a step would be a blocking upload on a GPU
        self._measured = {True: torch.tensor([True, True], **kw), False: torch.tensor([True, False], **kw)}
        self._unjudged_row = torch.tensor([UNJUDGED, 0.0] + [math.nan] * 4, **kw)
        self._zero = torch.zeros((), **kw)
        self.resize_log(log_size)

    def resize_log(self, size: int) -> None:
        """The verdict log holds `size` steps between host reads; row = (code, metric, loss, grad_norm, thr_loss, thr_grad)."""
        self.log = torch.zeros((max(1, size), 6), device=self.device)

    def thresholds(self) -> torch.Tensor:
        """(2,) the loss and grad-norm values above which a step is a spike; inf before min_history steps."""
        ordered = self.history[:, (self.head + self._ring) % self.cfg.window]  # (2, W), oldest first, NaN unfilled
        level = ordered[:, -LEVEL_SPAN:].nanmedian(dim=1).values  # (2,)
        diffs = ordered[:, 1:] - ordered[:, :-1]  # (2, W-1)
        centre = diffs.nanmedian(dim=1, keepdim=True).values
        sigma = 1.4826 * (diffs - centre).abs().nanmedian(dim=1).values / math.sqrt(2)
        limit = level + torch.maximum(self.cfg.zscore * sigma.nan_to_num(0.0), self.min_jump * level.abs())
        return torch.where(self.count >= self.cfg.min_history, limit, math.inf)

    def judge(self, slot: int, loss: torch.Tensor, grad_norm: torch.Tensor | None, spikes: bool = True) -> torch.Tensor:
        """Judge one optimizer step from its mean loss and pre-clip grad norm (None: not measured); log the
        verdict at `slot` and return found_inf: 1.0 to veto the update, 0.0 to apply it (device, no sync).
        spikes=False (the lr warmup, where a falling loss and a rising grad norm are normal) judges NaN/Inf
        only; the values still join the history, so the gate is ready when warmup ends."""
        measured = self._measured[grad_norm is not None]
        norm = grad_norm if grad_norm is not None else self._zero
        values = torch.stack([loss.detach().float().reshape(()), norm.detach().float().reshape(())])  # (2,)
        limit = self.thresholds()
        nonfinite_each = ~torch.isfinite(values) & measured
        spike_each = (values > limit) & measured & (self.cfg.enabled and spikes)
        nonfinite, spike = nonfinite_each.any(), spike_each.any()
        vetoed = nonfinite | spike
        consecutive = torch.where(vetoed, self.consecutive + 1, 0)
        persistent = (consecutive >= self.cfg.patience) & bool(self.cfg.enabled)
        self.consecutive.copy_(torch.where(persistent, 0, consecutive))
        code = torch.where(persistent, 3, torch.where(nonfinite, 2, torch.where(spike, 1, 0)))
        metric = torch.where((nonfinite_each | spike_each)[0], 0, 1)  # the loss first, as it is read first
        self.log[slot] = torch.cat([torch.stack([code, metric]).float(), values, limit])
        # an accepted step's values join the history; a vetoed step leaves it as it was
        keep = ~vetoed
        column = torch.where(keep, values, self.history.index_select(1, self.head.view(1)).squeeze(1))
        self.history.index_copy_(1, self.head.view(1), column.view(-1, 1))
        self.head.copy_((self.head + keep.long()) % self.cfg.window)
        self.count.copy_(torch.clamp(self.count + keep.long(), max=self.cfg.window))
        return vetoed.float()

    def begin(self, slot: int, loss: torch.Tensor) -> None:
        """Log the step's loss as not judged yet: a step DeepSpeed skips (fp16 overflow) never reaches `judge`."""
        self.log[slot] = self._unjudged_row
        self.log[slot, 2] = loss.detach().float()

    def read(self, slots: list[int]) -> list[Verdict]:
        """The verdicts logged at `slots` (one host read)."""
        rows = self.log[slots].tolist() if slots else []
        out = []
        for code, metric, loss, grad_norm, thr_loss, thr_grad in rows:
            if code == UNJUDGED:
                out.append(Verdict("unjudged", loss=loss, grad_norm=grad_norm))
                continue
            m = int(metric)
            out.append(Verdict(REASONS[int(code)], METRICS[m], (loss, grad_norm)[m], (thr_loss, thr_grad)[m], loss, grad_norm))
        return out

    def rebaseline(self) -> None:
        """Forget the history: the values now are the new normal (a persistent shift with nothing to roll back to)."""
        self.history.fill_(math.nan)
        self.head.zero_()
        self.count.zero_()
        self.consecutive.zero_()

    def check(self, loss: float, grad_norm: float | None, spikes: bool = True) -> Verdict:
        """Judge one step from host values and read the verdict back (tests and tools; the loop uses judge)."""
        norm = None if grad_norm is None else torch.tensor(float(grad_norm), device=self.device)
        self.judge(0, torch.tensor(float(loss), device=self.device), norm, spikes)
        return self.read([0])[0]

    def state_dict(self) -> dict:
        ordered = self.history[:, (self.head + self._ring) % self.cfg.window]
        return {"history": {m: [v for v in row if math.isfinite(v)] for m, row in zip(METRICS, ordered.tolist())},
                "consecutive": int(self.consecutive)}

    def load_state_dict(self, state: dict) -> None:
        """Also takes the state of the host-side detector that earlier checkpoints carry (the same fields)."""
        self.rebaseline()
        n = min(len(state["history"].get("loss", [])), self.cfg.window)
        for row, metric in enumerate(METRICS):  # newest value at n - 1 in both rows
            values = list(state["history"].get(metric, []))[-n:] if n else []
            if values:
                self.history[row, n - len(values): n] = torch.tensor(values, dtype=torch.float32)
        self.count.fill_(n)
        self.head.fill_(n % self.cfg.window)
        self.consecutive.fill_(int(state.get("consecutive", 0)))


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
