"""Where a training run stands besides its weights and optimizer: the step, the data cursor, the windows a
rollback excluded, the counters. A checkpoint carries it (`client_state`); resuming and rolling back
restore it (`restore`)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from lm_core.checkpoints import rng_state, set_rng_state
from lm_core.loader import TokenLoader
from lm_core.stability import SpikeGate


@dataclass
class RunState:
    step: int = 0
    loss: float = float("nan")  # the last accepted step's mean loss
    cursor: int = 0  # optimizer-step windows drawn from the loader so far (skipped ones included)
    skipped_windows: set[int] = field(default_factory=set)  # windows a rollback excluded for good
    spike_windows: list[int] = field(default_factory=list)  # windows of the current run of vetoed steps
    skipped_steps: int = 0
    rollbacks: int = 0

    def next_window(self, loader: TokenLoader, accum: int) -> int:
        """Advance past excluded windows (drawing and dropping their micro-batches); return this step's window."""
        while self.cursor in self.skipped_windows:
            for _ in range(accum):
                next(loader)
            self.cursor += 1
        self.cursor += 1
        return self.cursor - 1

    def client_state(self, step: int, tokens_per_step: int, loader: TokenLoader, gate: SpikeGate, config_hash: str) -> dict:
        return {"step": step, "tokens": step * tokens_per_step, "loss": _finite_or_nan(self.loss), "cursor": self.cursor,
                "skipped_windows": sorted(self.skipped_windows), "skipped_steps": self.skipped_steps,
                "rollbacks": self.rollbacks, "loader": loader.state_dict(), "detector": gate.state_dict(),
                "rng": rng_state(), "config_hash": config_hash}

    def restore(self, state: dict, loader: TokenLoader, gate: SpikeGate) -> None:
        self.step = int(state["step"])
        self.loss = float(state.get("loss", float("nan")))
        self.cursor = int(state.get("cursor", self.step))
        self.skipped_windows |= set(state.get("skipped_windows", []))
        self.skipped_steps = int(state.get("skipped_steps", 0))
        self.rollbacks = max(self.rollbacks, int(state.get("rollbacks", 0)))
        self.spike_windows.clear()
        if "loader" in state:
            loader.load_state_dict(state["loader"])
        if "detector" in state:
            gate.load_state_dict(state["detector"])
        if "rng" in state:
            set_rng_state(state["rng"])


def _finite_or_nan(x: float) -> float:
    return x if math.isfinite(x) else float("nan")
