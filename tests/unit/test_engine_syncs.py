"""An ordinary training step reads nothing back to the host (issue: GPU speed).

On a GPU every host read (`.item()`, `float(t)`, `bool(t)`, `.tolist()`, a tensor built from host values)
waits for the device to finish everything queued, so the host cannot run ahead. On this CPU the same
reads are visible as dispatcher ops: `aten::_local_scalar_dense` (and friends) for reads, `aten::lift_fresh`
for tensors built from host data. This counts them per optimizer step with a TorchDispatchMode through
the real engine (DeepSpeed ZeRO 0-3, fp32 and bf16, spike gate on) and asserts none on non-log steps. The
one upload allowed is the batch itself (`lm_core.loader.batch_to_device`: pinned and non-blocking on CUDA).
"""

from __future__ import annotations

import collections
import traceback
from pathlib import Path

import pytest
import torch
from shard_fixtures import write_counting_shards
from torch.utils._python_dispatch import TorchDispatchMode

from lm_core.engine import train
from lm_core.model import GPTConfig
from lm_core.run_state import RunState
from lm_core.shards import open_split
from lm_core.tracking import JsonlTracker
from lm_core.train_config import TrainConfig

HOST_READS = {"_local_scalar_dense", "item", "is_nonzero", "equal", "allclose", "nonzero", "masked_select", "unique",
              "lift_fresh", "lift_fresh_copy"}
MODEL = GPTConfig(vocab_size=64, block_size=32, n_layer=2, n_head=2, n_embd=32)


class HostReads(TorchDispatchMode):
    """Host reads per training step (the step is set from outside)."""

    def __init__(self):
        super().__init__()
        self.step = 0
        self.reads: dict[int, collections.Counter] = collections.defaultdict(collections.Counter)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in HOST_READS:
            frames = [f for f in traceback.extract_stack()[:-1] if "/torch/" not in f.filename]
            if not any(f.name == "batch_to_device" for f in frames):
                where = " <- ".join(f"{Path(f.filename).name}:{f.lineno}" for f in frames[-3:][::-1])
                self.reads[self.step][f"{name} at {where}"] += 1
        return func(*args, **(kwargs or {}))


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return open_split(write_counting_shards(tmp_path_factory.mktemp("shards"), MODEL.vocab_size), "train")


@pytest.fixture(autouse=True)
def restore_torch_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_no_host_read_in_a_non_log_step(shards, tmp_path, monkeypatch, stage, precision):
    counter = HostReads()
    next_window = RunState.next_window

    def start_of_step(self, loader, accum):  # everything until the next step's start is this step's
        counter.step = self.step + 1
        return next_window(self, loader, accum)

    monkeypatch.setattr(RunState, "next_window", start_of_step)
    cfg = TrainConfig(micro_batch_size=4, global_batch_size=8, max_steps=12, warmup_steps=2, log_every=6, eval_every=0,
                      checkpoint_every=0, num_threads=1, precision=precision, zero_stage=stage)
    assert cfg.stability.enabled
    tracker = JsonlTracker(tmp_path / "history.jsonl")
    try:
        with counter:
            result = train(MODEL, cfg, shards, None, tmp_path / "ckpt", tracker)
    finally:
        tracker.close()
    assert result.steps == 12
    log_steps = {6, 12}
    assert any(counter.reads[s] for s in log_steps)  # the counter does see reads: log steps make them
    # ZeRO-3 records the order its modules run in during its first step and checks that every rank agrees
    # (a one-time broadcast and read, DeepSpeed's); from then on its steps read nothing either
    start_up = {1} if stage == 3 else set()
    ordinary = {s: dict(counter.reads[s]) for s in range(1, 13) if s not in log_steps | start_up and counter.reads[s]}
    assert not ordinary, f"host reads in non-log steps: {ordinary}"
