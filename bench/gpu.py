"""The CUDA checks, prepared for a session that is lent a GPU: bf16/fp16 matmul peaks, which SDPA kernels
run (flash included), and lmforge's own engine (DeepSpeed on the GPU) training the GPT-2-124M preset in
bf16 for a few hundred steps: tokens/s and MFU, eager and with torch.compile; plus short fp16 (loss
scaling, ZeRO-2) and ZeRO-3 runs.

    python -m bench gpu [--steps 300] [--micro-batch 16] [--out DIR]
    python -m bench gpu --smoke          # the same code paths on CPU with a tiny model (no CUDA needed)

`ratio` is the bf16 124M run's MFU against the measured bf16 matmul peak of this GPU (target >= 0.45);
`mfu_vs_nominal` is the same against the data-sheet dense bf16 peak when the GPU is a known one. Data are
uniform random tokens (no corpus on the device machine): the speed does not depend on them.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

# dense (no sparsity) bf16 tensor-core peaks from the data sheets, TFLOP/s
NOMINAL_BF16_TFLOPS = {"H200": 989.4, "H100 80GB HBM3": 989.4, "H100": 989.4, "A100": 312.0}


def run(argv: list[str]) -> dict:
    p = argparse.ArgumentParser(prog="python -m bench gpu")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--micro-batch", type=int, default=16)
    p.add_argument("--smoke", action="store_true", help="tiny model on CPU: checks the script, measures nothing")
    p.add_argument("--out", default="", help="also write the JSON here (e.g. $OUT on the device machine)")
    args = p.parse_args(argv)
    if not args.smoke and not torch.cuda.is_available():
        raise SystemExit("bench gpu needs a CUDA device (or --smoke for a CPU check of the script itself)")
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    result: dict = {"environment": _environment(device)}
    result["matmul_tflops"] = {prec: round(_matmul_peak(prec, device, args.smoke), 1) for prec in ("bf16", "fp16", "fp32")}
    result["sdpa"] = _sdpa_backends(device, args.smoke)

    from lm_core.model import preset

    vocab = 512 if args.smoke else 50304  # GPT-2's vocabulary padded to a multiple of 64
    model_cfg = preset("tiny" if args.smoke else "gpt2-124m", vocab_size=vocab)
    steps = 6 if args.smoke else args.steps
    micro = 2 if args.smoke else args.micro_batch
    peak = result["matmul_tflops"]["bf16"]
    runs = {}
    for name, overrides in {
        "bf16_zero1_eager": dict(precision="bf16", zero_stage=1),
        "bf16_zero1_compile": dict(precision="bf16", zero_stage=1, compile=True),
        "fp16_zero2": dict(precision="fp16", zero_stage=2, max_steps=max(6, steps // 4)),
        "bf16_zero3": dict(precision="bf16", zero_stage=3, max_steps=max(6, steps // 4)),
    }.items():
        if args.smoke and (name.startswith("fp16") or overrides.get("compile")):
            continue  # DeepSpeed refuses fp16 without fp16 kernels; compiling takes ~30 s on a CPU
        try:
            base = dict(max_steps=steps, micro_batch_size=micro, global_batch_size=micro, peak_tflops=peak)
            runs[name] = _train_run(model_cfg, {**base, **overrides})
        except Exception as exc:  # noqa: BLE001 - one failing variant must not lose the others' numbers
            runs[name] = {"error": f"{type(exc).__name__}: {exc}"[:2000]}
        print(name, json.dumps(runs[name]), flush=True)
    result["train"] = runs
    result["model"] = {"preset": "tiny" if args.smoke else "gpt2-124m", "vocab_size": vocab, "params": model_cfg.num_params(),
                       "flops_per_token": model_cfg.flops_per_token(), "block_size": model_cfg.block_size}
    best = max((r.get("mfu", 0.0) for n, r in runs.items() if n.startswith("bf16_zero1")), default=0.0)
    result["ratio"] = round(best, 4)
    nominal = next((v for k, v in NOMINAL_BF16_TFLOPS.items() if k in result["environment"].get("device", "")), None)
    if nominal:
        result["mfu_vs_nominal"] = round(best * peak / nominal, 4)
        result["nominal_bf16_tflops"] = nominal
    result["target"] = "MFU >= 0.45 of the measured bf16 matmul peak (124M preset, bf16)"
    result["smoke"] = args.smoke
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "gpu.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def _environment(device: torch.device) -> dict:
    import deepspeed

    env = {"torch": torch.__version__, "deepspeed": deepspeed.__version__, "cuda": torch.version.cuda}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(device=props.name, capability=f"{props.major}.{props.minor}", memory_gb=round(props.total_memory / 2**30, 1),
                   bf16_supported=torch.cuda.is_bf16_supported(), flash_sdp_enabled=torch.backends.cuda.flash_sdp_enabled())
    else:
        env["device"] = "cpu"
    return env


def _matmul_peak(precision: str, device: torch.device, smoke: bool) -> float:
    from lm_core.train_metrics import measure_matmul_tflops

    return measure_matmul_tflops(precision, device, n=256 if smoke else 8192, seconds=0.2 if smoke else 2.0)


def _sdpa_backends(device: torch.device, smoke: bool) -> dict:
    """Which scaled_dot_product_attention kernels run causal bf16 attention here, their times, and how far
    each is from the math kernel's output."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.functional import scaled_dot_product_attention as sdpa

    b, h, t, d = (1, 2, 64, 32) if smoke else (8, 12, 1024, 64)
    dtype = torch.bfloat16
    q, k, v = (torch.randn(b, h, t, d, device=device, dtype=dtype) for _ in range(3))
    with sdpa_kernel(SDPBackend.MATH):
        reference = sdpa(q, k, v, is_causal=True).float()
    out = {}
    for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.MATH):
        try:
            with sdpa_kernel(backend):
                y = sdpa(q, k, v, is_causal=True)
                times = []
                for _ in range(3 if smoke else 20):
                    _sync(device)
                    t0 = time.perf_counter()
                    sdpa(q, k, v, is_causal=True)
                    _sync(device)
                    times.append(time.perf_counter() - t0)
            out[backend.name] = {"ok": True, "ms": round(statistics.median(times) * 1e3, 3),
                                 "max_abs_diff_vs_math": round(float((y.float() - reference).abs().max()), 5)}
        except RuntimeError as exc:
            out[backend.name] = {"ok": False, "why": str(exc).splitlines()[0][:300]}
    return out


def _train_run(model_cfg, overrides: dict) -> dict:
    from lm_core.engine import train
    from lm_core.tracking import JsonlTracker, read_history
    from lm_core.train_config import TrainConfig

    cfg = TrainConfig(**{"warmup_steps": 10, "lr": 6e-4, "log_every": 10, "num_threads": 0, "keep_checkpoints": 1,
                         **overrides})
    cfg.log_every = min(cfg.log_every, max(1, cfg.max_steps // 3))
    cfg.warmup_steps = min(cfg.warmup_steps, cfg.max_steps)
    cfg.validate()
    tokens = np.random.default_rng(0).integers(0, model_cfg.vocab_size, size=4_000_000, dtype=np.uint16)
    with tempfile.TemporaryDirectory() as tmp:
        tracker = JsonlTracker(Path(tmp) / "history.jsonl")
        started = time.perf_counter()
        try:
            result = train(model_cfg, cfg, [tokens], None, Path(tmp) / "ckpt", tracker)
        finally:
            tracker.close()
        wall = time.perf_counter() - started
        history = [h["metrics"] for h in read_history(Path(tmp) / "history.jsonl") if "train/tokens_per_s" in h.get("metrics", {})]
    steady = history[1:] or history  # the first window holds start-up (and compile)
    tps = statistics.median(h["train/tokens_per_s"] for h in steady)
    row = {"steps": cfg.max_steps, "tokens_per_s": round(tps, 1), "wall_s": round(wall, 1),
           "final_loss": round(result.final_loss, 4), "skipped_steps": result.skipped_steps, "rollbacks": result.rollbacks,
           "events": sorted({e["kind"] for e in result.events})}
    if "train/mfu" in steady[-1]:
        row["mfu"] = round(statistics.median(h["train/mfu"] for h in steady), 4)
    for key in ("memory/gpu_peak_mb", "train/loss_scale", "train/grad_norm"):
        if key in steady[-1]:
            row[key.split("/")[1]] = round(steady[-1][key], 3)
    return row


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()
