"""The CUDA benchmark, prepared for a session that is lent a GPU: lmforge's engine (DeepSpeed on the GPU)
against a plain compiled PyTorch loop on the same model, in one run.

    python -m bench gpu [--steps 200] [--micro-batch 16] [--out DIR]
    python -m bench gpu --smoke          # the same code paths on CPU with a tiny model (no CUDA needed)

The baseline is what a skeptic would write: lmforge's GPT (`lm_core.model.GPT`), fp32 weights under bf16
autocast, torch's fused AdamW, `clip_grad_norm_`, `torch.compile`, the same batch (16 x 1024 tokens of the
gpt2-124m preset, vocabulary 50304) and the same lr schedule, with no host read per step. Beside it the
engine (`lm_core.engine.train`, spike gate on): bf16 at ZeRO 0/1/2 and ZeRO-3 (compiled; the same graph, so
inductor's cache makes the later compiles short), and shorter eager runs of fp16 with loss scaling at
ZeRO-2 and fp32 (TF32 on). Top-level `ratio` = engine ZeRO-1 bf16 tokens/s / baseline tokens/s
(target >= 0.95; ZeRO-2 >= 0.9, ZeRO-3 >= 0.7); `mfu` is against the bf16 matmul peak measured here (target
>= 0.50). `sync_check` runs short engine runs with `train.sync_check=true`, which turns CUDA's sync debug
mode to "error" around every ordinary step: a host sync there fails the run. `profile` is the torch
profiler's table of a few steady engine steps. Also: matmul peaks, which SDPA kernels run. Data are
uniform random tokens (the device machine has no corpus): the speed does not depend on them.
Everything goes to one JSON; nothing is installed at run time; the default settings fit in ~7 minutes on one H200.
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
TARGETS = {"ratio_zero1": 0.95, "ratio_zero2": 0.9, "ratio_zero3": 0.7, "mfu": 0.50}


def run(argv: list[str]) -> dict:
    p = argparse.ArgumentParser(prog="python -m bench gpu")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--micro-batch", type=int, default=16)
    p.add_argument("--smoke", action="store_true", help="tiny model on CPU: checks the script, measures nothing")
    p.add_argument("--out", default="", help="also write the JSON here (e.g. $OUT on the device machine)")
    args = p.parse_args(argv)
    if not args.smoke and not torch.cuda.is_available():
        raise SystemExit("bench gpu needs a CUDA device (or --smoke for a CPU check of the script itself)")
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    result: dict = {"environment": _environment(device), "smoke": args.smoke}
    result["matmul_tflops"] = {prec: round(_matmul_peak(prec, device, args.smoke), 1) for prec in ("bf16", "fp16", "fp32")}
    result["sdpa"] = _sdpa_backends(device, args.smoke)

    from lm_core.model import preset

    vocab = 512 if args.smoke else 50304  # GPT-2's vocabulary padded to a multiple of 64
    model_cfg = preset("tiny" if args.smoke else "gpt2-124m", vocab_size=vocab)
    steps, micro = (8, 2) if args.smoke else (args.steps, args.micro_batch)
    short = max(8, steps // 3)
    peak = result["matmul_tflops"]["bf16"]
    compile_ = not args.smoke  # compiling takes ~30 s per graph on a CPU and gains nothing there
    tokens = np.random.default_rng(0).integers(0, vocab, size=4_000_000, dtype=np.uint16)
    base = dict(max_steps=steps, micro_batch_size=micro, global_batch_size=micro, peak_tflops=peak, compile=compile_)
    runs: dict[str, dict] = {}

    def measure(name: str, fn) -> None:
        try:
            runs[name] = fn()
        except Exception as exc:  # noqa: BLE001 - one failing variant must not lose the others' numbers
            runs[name] = {"error": f"{type(exc).__name__}: {exc}"[:2000]}
        print(name, json.dumps(runs[name]), flush=True)

    measure("plain_compiled_bf16", lambda: _plain_loop(model_cfg, {**base, "precision": "bf16"}, tokens, device, peak))
    variants = {
        "engine_bf16_zero1": dict(precision="bf16", zero_stage=1),
        "engine_bf16_zero0": dict(precision="bf16", zero_stage=0),
        "engine_bf16_zero2": dict(precision="bf16", zero_stage=2),
        "engine_bf16_zero3": dict(precision="bf16", zero_stage=3, max_steps=short),
        # short and eager: these two answer "does it work, at what speed", not the compiled headline
        "engine_fp16_zero2": dict(precision="fp16", zero_stage=2, max_steps=short, compile=False),
        "engine_fp32_zero0_tf32": dict(precision="fp32", zero_stage=0, max_steps=short, compile=False),
    }
    for name, overrides in variants.items():
        if args.smoke and "fp16" in name:
            continue  # DeepSpeed refuses fp16 where the device has no fp16 kernels
        measure(name, lambda o=overrides: _engine_run(model_cfg, {**base, **o}, tokens))
    result["train"] = runs
    result["sync_check"] = {}
    for stage in (1, 3):
        cfg = {**base, "precision": "bf16", "zero_stage": stage, "max_steps": 12, "log_every": 6, "compile": False,
               "sync_check": device.type == "cuda"}
        try:
            _engine_run(model_cfg, cfg, tokens)
            result["sync_check"][f"bf16_zero{stage}"] = {"ok": True, "enforced": device.type == "cuda"}
        except Exception as exc:  # noqa: BLE001
            result["sync_check"][f"bf16_zero{stage}"] = {"ok": False, "error": f"{type(exc).__name__}: {exc}"[:2000]}
    result["profile"] = _profile(model_cfg, {**base, "precision": "bf16", "zero_stage": 1}, tokens, device)
    result["model"] = {"preset": "tiny" if args.smoke else "gpt2-124m", "vocab_size": vocab, "params": model_cfg.num_params(),
                       "flops_per_token": model_cfg.flops_per_token(), "block_size": model_cfg.block_size,
                       "micro_batch": micro, "steps": steps}
    result.update(_summary(runs, peak, result["environment"].get("device", "")))
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "gpu.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def _summary(runs: dict, peak: float, device_name: str) -> dict:
    plain = runs.get("plain_compiled_bf16", {}).get("tokens_per_s")

    def ratio(name: str) -> float | None:
        tps = runs.get(name, {}).get("tokens_per_s")
        return round(tps / plain, 4) if tps and plain else None

    out = {"ratio": ratio("engine_bf16_zero1"),
           "ratios": {name: ratio(name) for name in runs if name.startswith("engine_")},
           "mfu": runs.get("engine_bf16_zero1", {}).get("mfu"),
           "baseline_mfu": runs.get("plain_compiled_bf16", {}).get("mfu"),
           "targets": TARGETS,
           "baseline": "plain PyTorch loop on lm_core.model.GPT: bf16 autocast, fused AdamW, clip_grad_norm_, "
                       "torch.compile, same batch and schedule, no host read per step"}
    nominal = next((v for k, v in NOMINAL_BF16_TFLOPS.items() if k in device_name), None)
    if nominal and out["mfu"]:
        out["mfu_vs_nominal"] = round(out["mfu"] * peak / nominal, 4)
        out["nominal_bf16_tflops"] = nominal
    return out


def _train_config(overrides: dict):
    from lm_core.train_config import TrainConfig

    cfg = TrainConfig(**{"warmup_steps": 10, "lr": 6e-4, "log_every": 25, "num_threads": 0, "keep_checkpoints": 1,
                         **overrides})
    cfg.log_every = min(cfg.log_every, max(1, cfg.max_steps // 4))
    cfg.warmup_steps = min(cfg.warmup_steps, cfg.max_steps)
    cfg.validate()
    return cfg


def _plain_loop(model_cfg, overrides: dict, tokens: np.ndarray, device: torch.device, peak: float) -> dict:
    """The baseline: the loop a skeptic writes for the same work (see the module docstring)."""
    from lm_core.loader import TokenLoader
    from lm_core.model import GPT

    cfg = _train_config(overrides)
    torch.manual_seed(cfg.seed)
    model = GPT(model_cfg).to(device).train()
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=True)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, cfg.lr_multiplier)
    step_fn = torch.compile(model, dynamic=False) if cfg.compile else model
    batches = TokenLoader([tokens], model_cfg.block_size, cfg.micro_batch_size, seed=cfg.seed)
    started, rates, window_start = time.perf_counter(), [], None
    losses = torch.zeros((), device=device)
    for step in range(cfg.max_steps):
        window = torch.from_numpy(next(batches))
        window = window.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else window
        with torch.autocast(device.type, dtype=torch.bfloat16):
            _, loss = step_fn(window[:, :-1], window[:, 1:])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses += loss.detach()
        if (step + 1) % cfg.log_every == 0:
            _sync(device)
            now = time.perf_counter()
            if window_start is not None:
                rates.append(cfg.log_every * cfg.micro_batch_size * model_cfg.block_size / (now - window_start))
            window_start = now
    tps = statistics.median(rates[1:] or rates)  # the first window holds compilation
    return {"steps": cfg.max_steps, "tokens_per_s": round(tps, 1), "wall_s": round(time.perf_counter() - started, 1),
            "mfu": round(tps * model_cfg.flops_per_token() / (peak * 1e12), 4),
            "mean_loss": round(float(losses) / cfg.max_steps, 4), "compiled": cfg.compile}


def _engine_run(model_cfg, overrides: dict, tokens: np.ndarray, hooks=()) -> dict:
    from lm_core.engine import train
    from lm_core.tracking import JsonlTracker, read_history

    cfg = _train_config(overrides)
    with tempfile.TemporaryDirectory() as tmp:
        tracker = JsonlTracker(Path(tmp) / "history.jsonl")
        started = time.perf_counter()
        try:
            result = train(model_cfg, cfg, [tokens], None, Path(tmp) / "ckpt", tracker, hooks=list(hooks))
        finally:
            tracker.close()
        wall = time.perf_counter() - started
        history = [h["metrics"] for h in read_history(Path(tmp) / "history.jsonl") if "train/tokens_per_s" in h.get("metrics", {})]
    steady = history[2:] or history[1:] or history  # the first windows hold start-up and compilation
    tps = statistics.median(h["train/tokens_per_s"] for h in steady)
    row = {"steps": cfg.max_steps, "tokens_per_s": round(tps, 1), "wall_s": round(wall, 1), "compiled": cfg.compile,
           "final_loss": round(result.final_loss, 4), "skipped_steps": result.skipped_steps, "rollbacks": result.rollbacks,
           "events": sorted({e["kind"] for e in result.events})}
    if "train/mfu" in steady[-1]:
        row["mfu"] = round(statistics.median(h["train/mfu"] for h in steady), 4)
    for key in ("memory/gpu_peak_mb", "train/loss_scale", "train/grad_norm"):
        if key in steady[-1]:
            row[key.split("/")[1]] = round(steady[-1][key], 3)
    return row


def _profile(model_cfg, overrides: dict, tokens: np.ndarray, device: torch.device) -> dict:
    """The torch profiler's table of steady engine steps (after warm-up, between log steps)."""
    from torch.profiler import ProfilerActivity, profile, schedule

    from lm_core.step_hooks import StepHook

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    prof = profile(activities=activities, schedule=schedule(wait=0, warmup=2, active=4, repeat=1))

    class Advance(StepHook):
        def after_update(self, ctx, optimizer):
            if ctx.step >= 5:  # past start-up
                prof.step()

    try:
        with prof:
            _engine_run(model_cfg, {**overrides, "max_steps": 16, "log_every": 16, "compile": False}, tokens, hooks=[Advance()])
        sort = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
        return {"sort_by": sort, "table": prof.key_averages().table(sort_by=sort, row_limit=30)}
    except Exception as exc:  # noqa: BLE001
        return {"error": f"{type(exc).__name__}: {exc}"[:2000]}


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
    q, k, v = (torch.randn(b, h, t, d, device=device, dtype=torch.bfloat16) for _ in range(3))
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


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()
