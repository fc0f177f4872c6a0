"""Per-rank memory of lmforge's pretrain engine with 2 and 4 ranks under ZeRO 0/1/2/3, on a ~50M-parameter
model where parameters, gradients and optimizer state dominate.

    python -m bench zero_memory [--precision bf16|fp32] [--ranks 2,4] [--steps 4] [--layers 8] [--width 704]

For each rank count and stage the benchmark starts the ranks through torchrun on `python -m bench.zero_memory
--worker`, which trains through `lm_core.engine.train` (micro batch 1, T=64, so activations stay small).
Rank 0 measures:
- `peak_tensor_mb`: the most tensor memory it held at any moment of steps 2..N, like
  torch.cuda.max_memory_allocated on a GPU: the tensors alive after step 1 (found through the garbage
  collector, each storage once) plus the highest running sum of every CPU allocation and free the torch
  profiler records over the following steps (gradients, ZeRO buckets, all-gathers, activations);
- `tensor_mb`: the tensor storage it holds between steps (parameters, optimizer state, ZeRO's flat buffers);
- `training_peak_rss_mb` / `steady_rss_mb`: its resident set (the allocator's view: freed heap is kept).
Each stage's measured megabytes stand beside the ZeRO paper's accounting of model state (bytes per parameter
x parameters / ranks): `ratio` = ZeRO-3 `peak_tensor_mb` / the paper's ZeRO-3 megabytes with the first rank
count (what a rank holds beyond the model state it must), `ratio_vs_zero0` = ZeRO-3 / ZeRO-0 `peak_tensor_mb`
(the relative saving, against ZeRO-0 in the same run). Expected model state per rank, N ranks, P parameters
(the ZeRO paper's accounting):
bf16 (bf16 parameters and gradients, fp32 master weights and Adam moments, 12 bytes): stage 0 16P,
stage 1 4P + 12P/N, stage 2 2P + 14P/N, stage 3 16P/N bytes; fp32 (DeepSpeed also keeps an fp32 master
copy of each rank's partition): 16P, 8P + 12P/N, 4P + 16P/N, 20P/N.
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

from lm_core.train_config import TrainConfig


def run(argv: list[str]) -> dict:
    p = argparse.ArgumentParser(prog="python -m bench zero_memory")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--width", type=int, default=704)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--ranks", default="2,4", help="rank counts to run, comma-separated")
    p.add_argument("--stages", default="0,1,2,3")
    p.add_argument("--precision", choices=("bf16", "fp32"), default="bf16")
    p.add_argument("--bucket", type=int, default=TrainConfig.zero_bucket_elements, help="train.zero_bucket_elements")
    args = p.parse_args(argv)
    from lm_core.model import GPTConfig

    params = GPTConfig(vocab_size=args.vocab, block_size=64, n_layer=args.layers, n_head=args.width // 64,
                       n_embd=args.width).num_params()
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        for ranks in [int(r) for r in str(args.ranks).split(",")]:
            per_stage = {}
            for stage in [int(s) for s in args.stages.split(",")]:
                per_stage[f"zero{stage}"] = _launch(stage, ranks, args, Path(tmp) / f"r{ranks}z{stage}")
                print(f"{ranks} ranks, zero{stage}: {per_stage[f'zero{stage}']}", file=sys.stderr, flush=True)
            runs[str(ranks)] = _compare(per_stage, ranks, params, args.precision)
    first = next(iter(runs.values()))
    return {
        "ratio": first.get("zero3", {}).get("measured_vs_paper"),  # the first rank count's (2 by default)
        "ratio_means": f"ZeRO-3 peak tensor MB per rank / the ZeRO paper's model-state MB, {next(iter(runs))} ranks",
        "ratio_vs_zero0": first.get("zero3", {}).get("peak_vs_zero0"),
        "ratio_zero2_vs_zero0": first.get("zero2", {}).get("peak_vs_zero0"),
        "stages_by_ranks": runs,
        "params": params,
        "zero_bucket_elements": args.bucket,
        "model": {"n_layer": args.layers, "n_embd": args.width, "vocab_size": args.vocab, "block_size": 64},
        "precision": args.precision,
        "note": "per rank, CPU (gloo). peak_tensor_mb: rank 0's most tensor memory at any moment of steps 2..N (live "
                "tensors after step 1 plus the torch profiler's running sum of allocations and frees); tensor_mb: "
                "every tensor storage it holds between steps, counted once; training_peak_rss_mb: its peak RSS "
                "over steps 2..N; steady_rss_mb: its RSS between steps after malloc_trim; peak_rss_mb_per_rank: "
                "whole run, including building the full model before ZeRO partitions it",
    }


def _compare(per_stage: dict, n: int, params: int, precision: str) -> dict:
    """Each stage against ZeRO-0 of the same rank count, and against the ZeRO paper's accounting."""
    mb = params / 2**20
    if precision == "bf16":  # bf16 params 2 + bf16 grads 2 + fp32 master 4 + Adam moments 8 bytes per parameter
        bytes_per_param = {"zero0": (16, 0), "zero1": (4, 12), "zero2": (2, 14), "zero3": (0, 16)}
    else:  # params 4 + grads 4 + moments 8; ZeRO also keeps an fp32 master copy of each rank's partition (4/N)
        bytes_per_param = {"zero0": (16, 0), "zero1": (8, 12), "zero2": (4, 16), "zero3": (0, 20)}
    # (replicated, partitioned) bytes per parameter: replicated * P + partitioned * P / N
    expected = {k: whole * mb + split * mb / n for k, (whole, split) in bytes_per_param.items()}
    zero0 = per_stage.get("zero0")
    for name, row in per_stage.items():
        whole, split = bytes_per_param[name]
        row["paper_bytes_per_param"] = round(whole + split / n, 3)
        row["expected_state_mb"] = round(expected[name], 1)
        row["measured_vs_paper"] = round(row["peak_tensor_mb"] / expected[name], 3)
        if zero0:
            row["peak_vs_zero0"] = round(row["peak_tensor_mb"] / zero0["peak_tensor_mb"], 3)
            row["expected_vs_zero0"] = round(expected[name] / expected["zero0"], 3)
            row["tensor_vs_zero0"] = round(row["tensor_mb"] / zero0["tensor_mb"], 3)
            row["peak_rss_vs_zero0"] = round(row["training_peak_rss_mb"] / zero0["training_peak_rss_mb"], 3)
    return per_stage


def _launch(stage: int, ranks: int, args: argparse.Namespace, work: Path) -> dict:
    work.mkdir(parents=True)
    from lm_core.zero_adapter import free_port

    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks), "--master_port", str(port),
               "-m", "bench.zero_memory", "--worker", str(stage), str(args.steps), str(args.layers), str(args.width),
               str(args.vocab), args.precision, str(args.bucket), str(work)]
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        raise RuntimeError(f"zero{stage} ranks failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    # the ranks share the pipe: find the tagged numbers anywhere, not only at line starts
    found = re.findall(r"(STEPS_PEAK|STEADY|LIVE|TENSOR_PEAK|PEAK) (\[[^\]]*\]|[0-9.]+)", proc.stdout)
    peaks = sorted(json.loads(value) for tag, value in found if tag == "PEAK")

    def printed(tag: str) -> float:
        return [json.loads(value) for t, value in found if t == tag][0]

    steps_peak, steady, live = printed("STEPS_PEAK"), printed("STEADY"), printed("LIVE")
    return {"peak_tensor_mb": round(printed("TENSOR_PEAK"), 1), "tensor_mb": round(live, 1),
            "training_peak_rss_mb": round(steps_peak, 1), "steady_rss_mb": round(steady, 1),
            "peak_rss_mb_per_rank": [round(p[1], 1) for p in peaks]}


def _worker(stage: int, steps: int, layers: int, width: int, vocab: int, precision: str, bucket: int, work: Path) -> None:
    import numpy as np
    import torch

    from lm_core.engine import train
    from lm_core.model import GPTConfig
    from lm_core.stability import StabilityConfig
    from lm_core.tracking import MultiTracker

    torch.set_num_threads(1)
    rank = int(os.environ["RANK"])
    model = GPTConfig(vocab_size=vocab, block_size=64, n_layer=layers, n_head=width // 64, n_embd=width)
    shards = [np.random.default_rng(0).integers(0, vocab, size=50_000, dtype=np.uint16)]
    cfg = TrainConfig(micro_batch_size=1, global_batch_size=int(os.environ["WORLD_SIZE"]), max_steps=steps,
                      warmup_steps=1, log_every=1, precision=precision, zero_stage=stage, zero_bucket_elements=bucket,
                      num_threads=1, keep_checkpoints=1, stability=StabilityConfig(enabled=False))
    tracker = MultiTracker()  # nothing to record: rank 0's progress callback measures
    training_peak: list[float] = []
    steady: list[float] = []
    live: list[float] = []
    tensor_peak: list[float] = []
    profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True)
    start_mb = 0.0

    def on_step(m: dict) -> None:  # rank 0, after every step
        nonlocal start_mb
        if m["step"] == 1:  # from here on the high-water marks cover training steps only, not set-up
            Path("/proc/self/clear_refs").write_text("5")
            start_mb = _live_tensor_mb()
            profiler.start()
        elif m["step"] == steps:
            profiler.stop()
            tensor_peak.append(start_mb + _peak_allocated_mb(profiler))
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
        sys.stdout.write(f"STEPS_PEAK {training_peak[0]}\nSTEADY {steady[0]}\nLIVE {live[0]}\n"
                         f"TENSOR_PEAK {tensor_peak[0]}\n")  # one write
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


def _peak_allocated_mb(profiler) -> float:
    """The highest running sum of the CPU allocations (+) and frees (-) the profiler recorded, in MiB."""
    import torch

    running, peak = 0, 0
    events = sorted((e.start_ns(), e.nbytes()) for e in profiler.profiler.kineto_results.events()
                    if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU)
    for _, nbytes in events:
        running += nbytes
        peak = max(peak, running)
    return peak / 2**20


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
        _worker(stage, steps, layers, width, vocab, sys.argv[7], int(sys.argv[8]), Path(sys.argv[9]))
    else:
        print("run it as: python -m bench zero_memory", file=sys.stderr)
        sys.exit(2)
