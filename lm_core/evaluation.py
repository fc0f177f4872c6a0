"""Validation metrics that compare across tokenizers: loss, perplexity and bits per byte.

One scoring loop serves both the training loop's validation loss and the evaluate stage's bpb. Batches
keep one shape (a short last batch is padded with ignored rows), so a compiled model does not recompile
for it, and the sums stay on the device until the end.
"""

from __future__ import annotations

import hashlib
import math

import numpy as np
import torch

from lm_core.shards import evaluation_windows


@torch.no_grad()
def bits_per_byte(
    model: torch.nn.Module,
    val_shards: list[np.ndarray],
    token_bytes: np.ndarray | None,
    block_size: int,
    max_windows: int | None = None,
    batch_size: int = 8,
    precision: str = "fp32",
) -> dict[str, float]:
    """Loss, perplexity and bits per byte over the validation windows (lm_core.shards.evaluation_windows:
    all of them, or a fixed-seed sample of `max_windows` spread over the split).

    bpb = sum of nats over targets that stand for text / (ln 2 * their UTF-8 bytes); control
    targets (bos/eos) carry no bytes and are left out of bpb but kept in loss/perplexity. Without
    `token_bytes` only the loss and perplexity are computed (bpb is NaN). `windows_sha256` identifies the
    exact token windows scored: two scores compare only when it is the same.
    """
    windows = evaluation_windows(val_shards, block_size, max_windows)
    if not windows:
        raise ValueError(f"validation split is shorter than one window of {block_size + 1} tokens; add data or lower model.block_size")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    byte_table = torch.from_numpy(token_bytes.astype(np.int64)).to(device) if token_bytes is not None else None
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # nats all, nats of text targets, targets, bytes
    batch = np.full((batch_size, block_size + 1), -1, dtype=np.int64)  # (B, T+1); rows past the data stay -1
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
        for start in range(0, len(windows), batch_size):
            part = windows[start : start + batch_size]
            batch[: len(part)] = np.stack(part)
            batch[len(part):] = -1
            tokens = torch.from_numpy(batch).to(device)
            targets = tokens[:, 1:]  # (B, T), -1 in padding rows: ignored by the loss
            _, losses = model(tokens[:, :-1].clamp(min=0), targets, reduction="none")  # (B, T)
            losses = losses.double()
            real = targets >= 0
            nbytes = byte_table[targets.clamp(min=0)] * real if byte_table is not None else torch.zeros_like(targets)
            sums += torch.stack([losses.sum(), (losses * (nbytes > 0)).sum(), real.sum().double(), nbytes.sum().double()])
    model.train(was_training)
    nats_all, nats_text, n_targets, n_bytes = sums.tolist()
    loss = nats_all / n_targets
    return {
        "loss": loss,
        "perplexity": math.exp(min(loss, 50.0)),
        "bpb": nats_text / (math.log(2) * max(1.0, n_bytes)) if byte_table is not None else float("nan"),
        "tokens": n_targets,
        "bytes": n_bytes,
        "windows": len(windows),
        "windows_sha256": windows_digest(windows),
    }


def windows_digest(windows: list[np.ndarray]) -> str:
    digest = hashlib.sha256()
    for window in windows:
        digest.update(np.ascontiguousarray(window, dtype=np.int64).tobytes())
    return digest.hexdigest()


def validation_loss(model: torch.nn.Module, val_shards: list[np.ndarray], block_size: int, max_windows: int,
                    precision: str, batch_size: int = 8) -> float:
    """Mean next-token loss over the first `max_windows` sequential validation windows."""
    return bits_per_byte(model, val_shards, None, block_size, max_windows, batch_size, precision)["loss"]
