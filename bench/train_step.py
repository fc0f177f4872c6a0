"""Tokens/s of lmforge's pretrain step (lm_core.engine.train: DeepSpeed ZeRO 0/1/2, spike detector on) vs a
plain PyTorch loop on the same model, batches, precision and optimizer, at world size 1.

    python -m bench train_step [--steps 30] [--repeats 3] [--threads 1] [--layers 4] [--width 256] [--block 128]
                               [--batch 8] [--vocab 4096]

Variants alternate inside one process (repeat-major), each run's first `log_every` steps are warm-up, and
the reported number is the median over repeats. Rates are per wall-clock second and per CPU second of this
process (time.process_time, all its threads): with 1 thread on a shared machine the CPU-second rate is
what another tenant's load does not move. `ratio` (top level) is the median over the (stage, precision)
pairs of engine / plain CPU-second tokens/s of the same precision (`ratio_wall`: the same on wall
time); MFU (wall) is against the matmul peak measured here for that precision. The plain loop uses the
engine's optimizer kernel (torch's fused AdamW) and, in bf16, the engine's numerics (bf16 weights and
gradients, fp32 master weights stepped by AdamW and copied back), so the ratio measures the engine's
overhead alone. `ratio_vs_default_adamw` compares with the same loop on PyTorch's default (unfused)
AdamW; `ratios_bf16_vs_autocast_loop` with PyTorch's AMP recipe (fp32 weights, autocast to bf16), which
on these CPUs runs elementwise ops in fp32 and is the faster of the two bf16 recipes here.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from lm_core.engine import train
from lm_core.loader import TokenLoader
from lm_core.model import GPT, GPTConfig
from lm_core.tracking import JsonlTracker, read_history
from lm_core.train_config import TrainConfig
from lm_core.train_metrics import measure_matmul_tflops


def plain_loop(model_cfg: GPTConfig, cfg: TrainConfig, shards: list[np.ndarray], fused: bool = True,
               autocast: bool = False) -> tuple[list[float], list[float]]:
    """The baseline: the textbook loop; (wall, cpu) tokens/s per log window after the first. fused=True uses
    the AdamW kernel the engine uses; fused=False is PyTorch's default AdamW on CPU. bf16 is the engine's
    numerics done by hand: bf16 weights and gradients, AdamW stepping fp32 master copies that are copied
    back; autocast=True is instead PyTorch's AMP recipe (fp32 weights, bf16 matmuls under autocast)."""
    torch.manual_seed(cfg.seed)
    model = GPT(model_cfg).train()
    masters = cfg.precision == "bf16" and not autocast
    if masters:
        model.bfloat16()
        model.rope_cos, model.rope_sin = model.rope_cos.float(), model.rope_sin.float()  # as DeepSpeed keeps buffers
    weights = [p.detach().float().clone().requires_grad_() if masters else p for p in model.parameters()]
    pairs = list(zip(model.parameters(), weights))
    decay = [w for p, w in pairs if p.dim() >= 2]
    no_decay = [w for p, w in pairs if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=fused)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, cfg.lr_multiplier)
    batches = TokenLoader(shards, model_cfg.block_size, cfg.micro_batch_size, seed=cfg.seed)  # as the engine draws them
    amp = torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.precision == "bf16" and autocast)
    tokens = cfg.log_every * cfg.global_batch_size * model_cfg.block_size
    rates, cpu_rates, t0, c0 = [], [], time.perf_counter(), time.process_time()
    for step in range(cfg.max_steps):
        window = torch.from_numpy(next(batches))
        with amp:
            _, loss = model(window[:, :-1], window[:, 1:])
        loss.backward()
        if masters:
            for p, w in pairs:
                w.grad = p.grad.float()
                p.grad = None
        torch.nn.utils.clip_grad_norm_(weights, cfg.grad_clip)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if masters:
            with torch.no_grad():
                for p, w in pairs:
                    p.copy_(w)
        loss.item()
        if (step + 1) % cfg.log_every == 0:
            now, cpu = time.perf_counter(), time.process_time()
            rates.append(tokens / (now - t0))
            cpu_rates.append(tokens / (cpu - c0))
            t0, c0 = now, cpu
    return rates[1:], cpu_rates[1:]


def engine_run(model_cfg: GPTConfig, cfg: TrainConfig, shards: list[np.ndarray], workdir: Path) -> tuple[list[float], list[float]]:
    """lmforge's loop; its own tracker reports wall tokens/s per log window, its progress callback the CPU time."""
    history = workdir / "history.jsonl"
    tracker = JsonlTracker(history)
    cpu_marks = []
    try:
        train(model_cfg, cfg, shards, None, workdir / "ckpt", tracker, progress=lambda m: cpu_marks.append(time.process_time()))
    finally:
        tracker.close()
    rates = [h["metrics"]["train/tokens_per_s"] for h in read_history(history) if "train/tokens_per_s" in h.get("metrics", {})]
    tokens = cfg.log_every * cfg.global_batch_size * model_cfg.block_size
    return rates[1:], [tokens / (b - a) for a, b in zip(cpu_marks, cpu_marks[1:])]


def run(argv: list[str]) -> dict:
    p = argparse.ArgumentParser(prog="python -m bench train_step")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--block", type=int, default=128)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--stages", default="0,1,2")
    args = p.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    torch.set_num_threads(args.threads)

    model_cfg = GPTConfig(vocab_size=args.vocab, block_size=args.block, n_layer=args.layers, n_head=max(1, args.width // 64),
                          n_embd=args.width)
    rng = np.random.default_rng(0)
    shards = [rng.integers(0, args.vocab, size=200_000, dtype=np.uint16)]
    stages = [int(s) for s in args.stages.split(",")]
    precisions = ("fp32", "bf16")

    def config(precision: str, stage: int) -> TrainConfig:
        return TrainConfig(micro_batch_size=args.batch, global_batch_size=args.batch, max_steps=args.steps,
                           warmup_steps=min(5, args.steps), lr=1e-3, log_every=args.log_every, precision=precision,
                           zero_stage=stage, num_threads=args.threads)

    samples: dict[str, list[float]] = {}
    cpu_samples: dict[str, list[float]] = {}

    def record(name: str, rates: tuple[list[float], list[float]]) -> None:
        samples.setdefault(name, []).append(statistics.median(rates[0]))
        cpu_samples.setdefault(name, []).append(statistics.median(rates[1]))

    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(args.repeats):
            for precision in precisions:
                record(f"plain_{precision}", plain_loop(model_cfg, config(precision, 0), shards))
                record(f"plaindefault_{precision}", plain_loop(model_cfg, config(precision, 0), shards, fused=False))
                if precision == "bf16":
                    record("plainautocast_bf16", plain_loop(model_cfg, config(precision, 0), shards, autocast=True))
                for stage in stages:
                    work = Path(tmp) / f"r{repeat}_{precision}_z{stage}"
                    record(f"engine_z{stage}_{precision}", engine_run(model_cfg, config(precision, stage), shards, work))
        peaks = {prec: measure_matmul_tflops(prec, "cpu") for prec in precisions}

    flops_per_token = model_cfg.flops_per_token()
    variants = {}
    for name, values in samples.items():
        precision = name.rsplit("_", 1)[1]
        tps = statistics.median(values)
        variants[name] = {"tokens_per_s": round(tps, 1), "samples": [round(v, 1) for v in values],
                          "tokens_per_cpu_s": round(statistics.median(cpu_samples[name]), 1),
                          "cpu_samples": [round(v, 1) for v in cpu_samples[name]],
                          "mfu": round(tps * flops_per_token / (peaks[precision] * 1e12), 4)}

    def ratios_of(field_: str, baseline: str = "plain") -> dict[str, float]:
        return {f"z{stage}_{prec}": round(variants[f"engine_z{stage}_{prec}"][field_] / variants[f"{baseline}_{prec}"][field_], 3)
                for stage in stages for prec in precisions}

    ratios, ratios_wall = ratios_of("tokens_per_cpu_s"), ratios_of("tokens_per_s")
    ratios_default = ratios_of("tokens_per_cpu_s", "plaindefault")
    vs_autocast = {f"z{stage}_bf16": round(variants[f"engine_z{stage}_bf16"]["tokens_per_cpu_s"]
                                           / variants["plainautocast_bf16"]["tokens_per_cpu_s"], 3) for stage in stages}
    return {
        "ratio": round(statistics.median(ratios.values()), 3),
        "ratio_min": min(ratios.values()),
        "ratios": ratios,
        "ratio_wall": round(statistics.median(ratios_wall.values()), 3),
        "ratios_wall": ratios_wall,
        "ratio_vs_default_adamw": round(statistics.median(ratios_default.values()), 3),
        "ratios_vs_default_adamw": ratios_default,
        "ratios_bf16_vs_autocast_loop": vs_autocast,
        "target": ">= 0.95 (engine tokens/s / plain loop tokens/s, same precision, same fused AdamW)",
        "variants": variants,
        "peak_tflops_measured": {k: round(v, 3) for k, v in peaks.items()},
        "model": {"n_layer": args.layers, "n_embd": args.width, "block_size": args.block, "vocab_size": args.vocab,
                  "params": model_cfg.num_params(), "flops_per_token": flops_per_token},
        "batch": args.batch, "steps": args.steps, "repeats": args.repeats, "threads": args.threads,
        "note": "world size 1 on CPU; engine = lm_core.engine.train with its defaults (spike detector on)",
    }
