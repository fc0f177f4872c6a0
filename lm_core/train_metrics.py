"""What training measures besides the loss: the update/param ratio, memory, and the matmul peak MFU is
counted against. All of it runs on log steps only (each reads values back to the host)."""

from __future__ import annotations

import math
import os
import resource
import time

import numpy as np
import torch


@torch.no_grad()
def update_ratio(optimizer: torch.optim.Optimizer, tensors: list[tuple[torch.Tensor, int]], lrs: list[float],
                 partitioned: bool, world_size: int, chunk: int = 1 << 20) -> float:
    """||theta_new - theta_old|| / ||theta_old|| of the AdamW update just applied: how big a step it took.

    Rebuilt from the optimizer's own tensors (the fp32 master weights or partitions it stepped and its
    moments) rather than from a copy of the parameters taken before the step, which would cost a full
    model's memory at every logged step: AdamW set theta_new = theta_old * (1 - lr*wd) - lr/bc1 * m / (sqrt(v)/sqrt(bc2) + eps),
    so theta_old follows from theta_new, m and v, a chunk at a time. Sums stay on the device until the end;
    ZeRO partitions are summed over ranks."""
    sums = None  # (2,) float64: sum of squares of the update, of theta_old
    for param, index in tensors:
        state = optimizer.state.get(param)
        if not state:
            continue
        group, lr = optimizer.param_groups[index], lrs[index]
        (beta1, beta2), eps, wd = group["betas"], group["eps"], group["weight_decay"]
        t = float(state["step"])
        step_size, bc2_sqrt = lr / (1 - beta1**t), math.sqrt(1 - beta2**t)
        new_all, m_all, v_all = param.detach().view(-1), state["exp_avg"].view(-1), state["exp_avg_sq"].view(-1)
        for i in range(0, new_all.numel(), chunk):
            new = new_all[i:i + chunk].float()
            m, v = m_all[i:i + chunk].float(), v_all[i:i + chunk].float()
            old = (new + step_size * m / (v.sqrt() / bc2_sqrt + eps)) / (1 - lr * wd)
            part = torch.stack([(new - old).pow(2).sum(), old.pow(2).sum()]).double()
            sums = part if sums is None else sums + part
    if sums is None:
        return 0.0
    if partitioned and world_size > 1:  # each rank stepped its own partition
        torch.distributed.all_reduce(sums)
    num, den = sums.tolist()
    return math.sqrt(num) / max(math.sqrt(den), 1e-12)


def memory_metrics(device: torch.device) -> dict[str, float]:
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    out = {"memory/peak_rss_mb": peak_kib / 1024}
    try:
        with open("/proc/self/statm") as f:
            out["memory/rss_mb"] = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        pass
    if device.type == "cuda":
        out["memory/gpu_peak_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    return out


def measure_matmul_tflops(precision: str, device: torch.device | str = "cpu", n: int = 1024, seconds: float = 0.5) -> float:
    """Achieved TFLOP/s of square matmuls in this precision: the peak that MFU is measured against."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b  # warm-up (kernel selection, AMX tile setup)
    cuda = torch.device(device).type == "cuda"
    rates = []
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline or len(rates) < 3:
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        a @ b
        if cuda:
            torch.cuda.synchronize()
        rates.append(2 * n**3 / (time.perf_counter() - t0) / 1e12)
    return float(np.percentile(rates, 90))


def sync_errors(device: torch.device, on: bool) -> None:
    """CUDA's sync debug mode: with `on`, any operation that waits for the GPU raises (train.sync_check)."""
    if device.type == "cuda":
        torch.cuda.set_sync_debug_mode("error" if on else "default")
