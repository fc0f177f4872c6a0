"""Per-rank memory of lmforge's pretrain engine with 2 ranks under ZeRO 0/1/2/3, on a ~50M-parameter
model where parameters, gradients and Adam moments (16 bytes per parameter in fp32) dominate.

    python -m bench zero_memory [--steps 4] [--layers 8] [--width 704] [--ranks 2]

For each stage the benchmark starts `--ranks` ranks through torchrun on `python -m bench.zero_memory
--worker`, which trains through `lm_core.engine.train` (micro batch 1, T=64, so activations stay small).
Rank 0 measures three things: `tensor_mb`, every tensor storage it holds between steps (parameters,
gradients, optimizer state, ZeRO's flat buffers; found through the garbage collector, each storage
counted once): the model state ZeRO partitions; `training_peak_rss_mb`, its peak resident set over steps
2..N (Linux clear_refs resets the high-water mark after step 1), transient buffers and activations
included; `steady_rss_mb`, its resident set between steps after malloc_trim. Every rank's whole-run peak
(which includes building the full model before ZeRO partitions it) is listed too. The baseline is
ZeRO-0 in the same run; `ratio` = ZeRO-3 / ZeRO-0 `tensor_mb`. Expected model state per rank during a
step (fp32, N ranks, P parameters; ZeRO-1/2 also keep an fp32 master copy of the rank's partition):
stage 0 16P, stage 1 8P + 12P/N, stage 2 4P + 16P/N, stage 3 16P/N bytes.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import re
import resource
import subprocess
import sys
import tempfile
from pathlib import Path


def run(argv: list[str]) -> dict:
    p = argparse.ArgumentParser(prog="python -m bench zero_memory")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--width", type=int, default=704)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--stages", default="0,1,2,3")
    args = p.parse_args(argv)
    from lm_core.model import GPTConfig

    params = GPTConfig(vocab_size=args.vocab, block_size=64, n_layer=args.layers, n_head=args.width // 64,
                       n_embd=args.width).num_params()
    per_stage = {}
    with tempfile.TemporaryDirectory() as tmp:
        for stage in [int(s) for s in args.stages.split(",")]:
            per_stage[f"zero{stage}"] = _launch(stage, args, Path(tmp) / f"z{stage}")
            print(f"zero{stage}: {per_stage[f'zero{stage}']}", file=sys.stderr, flush=True)
    n, mb = args.ranks, params / 2**20
    # fp32: params 4 + grads 4 + Adam moments 8 bytes per parameter; ZeRO-1/2 also keep an fp32 master copy
    # of each rank's partition (4/N) even when the parameters are fp32
    expected = {"zero0": 16 * mb, "zero1": 8 * mb + 12 * mb / n, "zero2": 4 * mb + 16 * mb / n, "zero3": 16 * mb / n}
    zero0 = per_stage.get("zero0")
    for name, row in per_stage.items():
        row["expected_state_mb"] = round(expected[name], 1)
        if zero0:
            row["tensor_vs_zero0"] = round(row["tensor_mb"] / zero0["tensor_mb"], 3)
            row["peak_vs_zero0"] = round(row["training_peak_rss_mb"] / zero0["training_peak_rss_mb"], 3)
            row["expected_vs_zero0"] = round(expected[name] / expected["zero0"], 3)
    return {
        "ratio": per_stage.get("zero3", {}).get("tensor_vs_zero0"),
        "ratio_zero2": per_stage.get("zero2", {}).get("tensor_vs_zero0"),
        "stages": per_stage,
        "params": params,
        "ranks": args.ranks,
        "model": {"n_layer": args.layers, "n_embd": args.width, "vocab_size": args.vocab, "block_size": 64},
        "precision": "fp32",
        "note": "per rank, CPU (gloo). tensor_mb: every tensor storage rank 0 holds between steps (parameters, "
                "gradients, optimizer state, ZeRO buffers), counted once; training_peak_rss_mb: rank 0's peak RSS "
                "over steps 2..N; steady_rss_mb: its RSS between steps after malloc_trim; peak_rss_mb_per_rank: "
                "whole run, including building the full model before ZeRO partitions it",
    }


def _launch(stage: int, args: argparse.Namespace, work: Path) -> dict:
    work.mkdir(parents=True)
    from lm_core.engine import free_port

    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(args.ranks), "--master_port", str(port),
               "-m", "bench.zero_memory", "--worker", str(stage), str(args.steps), str(args.layers), str(args.width),
               str(args.vocab), str(work)]
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        raise RuntimeError(f"zero{stage} ranks failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    # the two ranks share the pipe: find the tagged numbers anywhere, not only at line starts
    found = re.findall(r"(STEPS_PEAK|STEADY|LIVE|PEAK) (\[[^\]]*\]|[0-9.]+)", proc.stdout)
    peaks = sorted(json.loads(value) for tag, value in found if tag == "PEAK")

    def printed(tag: str) -> float:
        return [json.loads(value) for t, value in found if t == tag][0]

    steps_peak, steady, live = printed("STEPS_PEAK"), printed("STEADY"), printed("LIVE")
    return {"tensor_mb": round(live, 1), "training_peak_rss_mb": round(steps_peak, 1), "steady_rss_mb": round(steady, 1),
            "peak_rss_mb_per_rank": [round(p[1], 1) for p in peaks]}


def _worker(stage: int, steps: int, layers: int, width: int, vocab: int, work: Path) -> None:
    import numpy as np
    import torch

    from lm_core.engine import train
    from lm_core.train_config import TrainConfig
    from lm_core.model import GPTConfig
    from lm_core.stability import StabilityConfig
    from lm_core.tracking import MultiTracker

    torch.set_num_threads(1)
    rank = int(os.environ["RANK"])
    model = GPTConfig(vocab_size=vocab, block_size=64, n_layer=layers, n_head=width // 64, n_embd=width)
    shards = [np.random.default_rng(0).integers(0, vocab, size=50_000, dtype=np.uint16)]
    cfg = TrainConfig(micro_batch_size=1, global_batch_size=2, max_steps=steps, warmup_steps=1, log_every=1,
                      precision="fp32", zero_stage=stage, num_threads=1, keep_checkpoints=1,
                      stability=StabilityConfig(enabled=False))
    tracker = MultiTracker()  # nothing to record: rank 0's progress callback measures
    training_peak: list[float] = []
    steady: list[float] = []
    live: list[float] = []

    def on_step(m: dict) -> None:  # rank 0, after every step
        if m["step"] == 1:  # from here on the high-water mark covers training steps only, not set-up
            Path("/proc/self/clear_refs").write_text("5")
        elif m["step"] == steps:
            training_peak.append(_vm_hwm_mb())
            # glibc keeps freed heap pages (e.g. the full parameters ZeRO-3 partitioned away); returning them
            # first makes this the memory in use between steps rather than the allocator's high-water mark
            ctypes.CDLL("libc.so.6").malloc_trim(0)
            steady.append(_rss_mb())
            live.append(_live_tensor_mb())

    try:
        train(model, cfg, shards, None, work / "ckpt", tracker, progress=on_step)
    finally:
        tracker.close()
    if rank == 0:
        sys.stdout.write(f"STEPS_PEAK {training_peak[0]}\nSTEADY {steady[0]}\nLIVE {live[0]}\n")  # one write
        sys.stdout.flush()
    torch.distributed.barrier()  # rank 0's numbers first, then every rank's peak
    sys.stdout.write("PEAK " + json.dumps([rank, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024]) + "\n")
    sys.stdout.flush()


def _live_tensor_mb() -> float:
    """Bytes of every tensor storage this process holds (found through the garbage collector, gradients
    included), each storage once: parameters, gradients, optimizer state, ZeRO's flat buffers."""
    import gc

    import torch

    storages: dict[int, int] = {}
    for obj in gc.get_objects():
        try:
            tensors = [obj, obj.grad] if isinstance(obj, torch.Tensor) else []
        except Exception:  # noqa: BLE001 - some tensor subclasses refuse .grad
            tensors = [obj]
        for t in tensors:
            if isinstance(t, torch.Tensor) and t.device.type == "cpu" and t.untyped_storage().nbytes():
                storage = t.untyped_storage()
                storages[storage.data_ptr()] = max(storages.get(storage.data_ptr(), 0), storage.nbytes())
    return sum(storages.values()) / 2**20


def _rss_mb() -> float:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _vm_hwm_mb() -> float:
    """Peak resident set since the last clear_refs reset (Linux VmHWM), in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--worker"]:
        stage, steps, layers, width, vocab = (int(a) for a in sys.argv[2:7])
        _worker(stage, steps, layers, width, vocab, Path(sys.argv[7]))
    else:
        print("run it as: python -m bench zero_memory", file=sys.stderr)
        sys.exit(2)
