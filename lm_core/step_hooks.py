"""Step hooks: what the training loop does around a step besides training, each a small named piece.

A hook sees the step through a StepContext and may change a micro-batch (`batch`), the loss that goes into
the backward (`loss`), and the optimizer around the update (`before_update` / `after_update`); on log
steps it may add metrics (`log_metrics`). The loop calls every hook at every point; none of them reads a
device value back except on log steps.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from lm_core.stability import GRAD_SPIKE_FACTOR, FaultInjector, Verdict
from lm_core.train_metrics import update_ratio


@dataclass
class StepContext:
    step: int  # optimizer steps done before this one
    window: int  # this step's data window (the run's cursor): what a rollback skips
    slot: int  # this step's row in the spike gate's verdict log
    is_log: bool
    faults: list[str] = field(default_factory=list)  # faults injected at this step (tests)
    window_ids: list[int] = field(default_factory=list)  # this rank's loader windows, for the events
    lr: float = 0.0  # the scheduled rate of this step
    applied: bool = True  # False when DeepSpeed skipped the step (fp16 overflow); a gate veto is not seen here
    loss_scale: float | None = None  # fp16: the scale this step's backward ran at

    @property
    def done(self) -> int:
        return self.step + 1


class StepHook:
    """No-op defaults; a hook overrides what it needs."""

    def batch(self, ctx: StepContext, micro: int, batch: np.ndarray) -> np.ndarray:
        return batch

    def loss(self, ctx: StepContext, loss: torch.Tensor, backward: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(the loss the step reports, the loss its backward runs on)."""
        return loss, backward

    def before_update(self, ctx: StepContext, optimizer: torch.optim.Optimizer) -> None:
        pass

    def after_update(self, ctx: StepContext, optimizer: torch.optim.Optimizer) -> None:
        pass

    def log_metrics(self, ctx: StepContext, verdict: Verdict) -> dict[str, float]:
        return {}


class FaultHook(StepHook):
    """train.stability.inject_fault: each fault fires once, at its step (a replay after a rollback does not
    fire it again). nan: the loss (and so every gradient) becomes NaN; corrupt_batch: the step's batches
    are random tokens; grad_spike: the gradients (not the reported loss) are GRAD_SPIKE_FACTOR times too
    big; lr_spike: the step runs at train.stability.lr_spike_factor times its rate."""

    def __init__(self, injector: FaultInjector, vocab_size: int, accum: int):
        self.injector, self.vocab_size, self.accum = injector, vocab_size, accum
        self._lr_before: list[float] = []

    def take(self, step: int) -> list[str]:
        return self.injector.take(step)

    def batch(self, ctx, micro, batch):
        if "corrupt_batch" in ctx.faults:
            return FaultInjector.corrupt(batch, self.vocab_size, seed=ctx.step * self.accum + micro)
        return batch

    def loss(self, ctx, loss, backward):
        if "nan" in ctx.faults:
            loss, backward = loss * float("nan"), backward * float("nan")
        return loss, backward * GRAD_SPIKE_FACTOR if "grad_spike" in ctx.faults else backward

    def before_update(self, ctx, optimizer):
        if "lr_spike" in ctx.faults:
            self._lr_before = [g["lr"] for g in optimizer.param_groups]
            for g in optimizer.param_groups:
                g["lr"] *= self.injector.lr_factor

    def after_update(self, ctx, optimizer):
        if "lr_spike" in ctx.faults:  # only where the scheduler did not already reset it (a skipped fp16 step)
            for g, lr in zip(optimizer.param_groups, self._lr_before):
                if g["lr"] == lr * self.injector.lr_factor:
                    g["lr"] = lr


class UpdateRatioHook(StepHook):
    """train/update_ratio on log steps: ||update|| / ||weights|| of the step just applied, 0 when the update
    was vetoed or skipped."""

    def __init__(self, stepped_tensors, partitioned: bool, world_size: int):
        self.stepped_tensors, self.partitioned, self.world_size = stepped_tensors, partitioned, world_size
        self._lrs: list[float] = []
        self._optimizer = None

    def before_update(self, ctx, optimizer):
        if ctx.is_log:  # after any lr fault: the rates the kernel actually uses
            self._lrs, self._optimizer = [g["lr"] for g in optimizer.param_groups], optimizer

    def log_metrics(self, ctx, verdict):
        if not ctx.is_log or self._optimizer is None:
            return {}
        if verdict.vetoed or not ctx.applied:
            return {"train/update_ratio": 0.0}
        return {"train/update_ratio": update_ratio(self._optimizer, self.stepped_tensors(), self._lrs, self.partitioned,
                                                   self.world_size)}
