"""Validation metrics that compare across tokenizers: loss, perplexity and bits per byte."""

from __future__ import annotations

import math

import numpy as np
import torch

from lm_core.shards import sequential_windows


@torch.no_grad()
def bits_per_byte(
    model: torch.nn.Module,
    val_shards: list[np.ndarray],
    token_bytes: np.ndarray,
    block_size: int,
    max_windows: int | None = None,
    batch_size: int = 8,
    precision: str = "fp32",
) -> dict[str, float]:
    """Loss, perplexity and bits per byte over sequential validation windows.

    bpb = sum of nats over targets that stand for text / (ln 2 * their UTF-8 bytes); control
    targets (bos/eos) carry no bytes and are left out of bpb but kept in loss/perplexity.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    byte_table = torch.from_numpy(token_bytes.astype(np.int64)).to(device)
    nats_all = nats_text = 0.0
    n_targets = n_bytes = 0
    windows = list(sequential_windows(val_shards, block_size, max_windows))
    if not windows:
        raise ValueError(f"validation split is shorter than one window of {block_size + 1} tokens; add data or lower model.block_size")
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
        for start in range(0, len(windows), batch_size):
            batch = torch.from_numpy(np.stack(windows[start : start + batch_size])).to(device)  # (B, T+1)
            targets = batch[:, 1:]
            _, losses = model(batch[:, :-1], targets, reduction="none")  # (B, T)
            losses = losses.float()
            nbytes = byte_table[targets]  # (B, T)
            nats_all += losses.sum().item()
            nats_text += (losses * (nbytes > 0)).sum().item()
            n_targets += targets.numel()
            n_bytes += int(nbytes.sum().item())
    model.train(was_training)
    loss = nats_all / n_targets
    return {
        "loss": loss,
        "perplexity": math.exp(min(loss, 50.0)),
        "bpb": nats_text / (math.log(2) * max(1, n_bytes)),
        "tokens": float(n_targets),
        "bytes": float(n_bytes),
    }
