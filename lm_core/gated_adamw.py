"""The optimizer DeepSpeed steps: torch's fused AdamW, clipped and gated on the device.

DeepSpeed (ZeRO 0-3) calls `step()` on the fp32 master weights (or this rank's partitions of them) once
the gradients are reduced. Before that call the training loop `arm`s the optimizer with a function that
returns (grad_scale, found_inf) for this step: the fused kernel divides every gradient by `grad_scale`
(gradient clipping: max(1, ||g|| / clip)) and leaves weights, Adam moments and the step counter untouched
when `found_inf` is 1 (the spike gate's veto), both as device tensors. Neither the clip coefficient nor
the verdict is read back to the host, where DeepSpeed's own clipping and overflow checks read the norm
every step. ZeRO-1/2 call `step()` once per parameter group and ZeRO-3 once per sub-group: the armed
function runs on the first call of an optimizer step only.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

Gate = Callable[[], "tuple[torch.Tensor | None, torch.Tensor | None]"]


class GatedAdamW(torch.optim.AdamW):
    def __init__(self, params, **kwargs):
        super().__init__(params, fused=True, **kwargs)  # the fused kernel is what takes grad_scale and found_inf
        self._armed: Gate | None = None

    def arm(self, gate: Gate) -> None:
        """`gate()` gives this step's (grad_scale, found_inf); it runs inside the next step() call."""
        self._armed = gate

    def disarm(self) -> None:
        """After the step: a later step() (or one DeepSpeed skipped) must not reuse this step's values."""
        self._armed = None
        self.grad_scale = self.found_inf = None

    def step(self, closure=None):
        if self._armed is not None:
            self.grad_scale, self.found_inf = self._armed()
            self._armed = None
        return super().step(closure)

    def applied_steps(self) -> float:
        """The step counter of the first parameter's state: it moves only when an update was applied (host read)."""
        for state in self.state.values():
            return float(state["step"])
        return 0.0


def clip_scale(grad_norm: torch.Tensor, clip: float) -> torch.Tensor | None:
    """The divisor that clips gradients of norm `grad_norm` to `clip` (1 when already inside), as DeepSpeed
    computes it; None when clipping is off."""
    if clip <= 0:
        return None
    return torch.clamp((grad_norm.float() + 1e-6) / clip, min=1.0)
