"""DeepSpeed checkpoints written so that a kill at any moment leaves a usable one, plus the pieces of
process state a resume needs: RNG states and a SIGTERM/SIGINT flag that stops the loop after a step.

Functions take a DeepSpeed engine object and use only its public save/load API (lm_core.zero_adapter is the one
place that imports deepspeed).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import threading
from pathlib import Path

import torch


class SignalFlag:
    """SIGTERM/SIGINT ask the loop to stop after the current step (main thread only)."""

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum else ""

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.signum = signum

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def requested(self, world_size: int, device: torch.device | str = "cpu") -> bool:
        """Whether to stop now; with several ranks a collective (every rank stops at the same step), so the
        loop asks on its sync steps only."""
        if world_size == 1:
            return self.signum is not None
        flag = torch.tensor([self.signum or 0], dtype=torch.int64, device=device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)  # every rank stops at the same step
        self.signum = int(flag[0]) or None
        return self.signum is not None


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def checkpoint_tag(step: int) -> str:
    return f"step{step:08d}"


def latest_tag(checkpoint_dir: Path) -> str | None:
    latest = Path(checkpoint_dir) / "latest"
    return latest.read_text().strip() if latest.is_file() else None


def load_checkpoint(engine, checkpoint_dir: Path, tag: str) -> dict:
    path, client_state = engine.load_checkpoint(str(checkpoint_dir), tag=tag)
    if path is None or client_state is None:
        raise RuntimeError(f"checkpoint {checkpoint_dir / tag} could not be loaded; delete {checkpoint_dir} to start over")
    return client_state


def save_checkpoint(engine, checkpoint_dir: Path, step: int, client_state: dict, keep: int, rank: int, world_size: int) -> None:
    """Write to `.tmp-<tag>`, rename to `<tag>`, then replace `latest`: a kill at any point leaves the
    previous checkpoint current. Old tags beyond `keep` are removed."""
    tag, tmp = checkpoint_tag(step), f".tmp-{checkpoint_tag(step)}"
    engine.save_checkpoint(str(checkpoint_dir), tag=tmp, client_state=client_state, save_latest=False)
    if world_size > 1:
        torch.distributed.barrier()
    if rank == 0:
        final = checkpoint_dir / tag
        if final.exists():
            shutil.rmtree(final)
        meta = {k: v for k, v in client_state.items() if k not in ("rng", "detector")}
        (checkpoint_dir / tmp / "meta.json").write_text(json.dumps(meta, indent=2))
        os.replace(checkpoint_dir / tmp, final)
        latest_tmp = checkpoint_dir / "latest.tmp"
        latest_tmp.write_text(tag)
        os.replace(latest_tmp, checkpoint_dir / "latest")
        for old in sorted(p for p in checkpoint_dir.glob("step*") if p.is_dir())[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    if world_size > 1:
        torch.distributed.barrier()
