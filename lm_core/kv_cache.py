"""The KV cache of generation: slots of preallocated keys and values, and where a forward's tokens sit in it.

lm_core.generation_engine hands out the slots and keeps every length on the host; lm_core.model reads and
writes the cache through a CacheAccess. Shape letters as in lm_core.model: B batch, T new tokens, S attended
positions, K kv heads, D head_dim.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from lm_core.model import GPTConfig


class KVCache:
    """Slotted, preallocated key/value cache for continuous batching: k, v of shape
    (n_layer, slots, K, max_len + 1, D).

    A slot holds one sequence. Its length lives with the caller (lm_core.generation_engine), not here:
    a forward names each row's slot and start position (CacheAccess), writes the row's new keys there
    and masks every key past the row's own position, so sequences of any length share one tensor and no
    step reallocates or moves anything. Stale keys left by an earlier sequence in a slot are never read.
    Column max_len is scratch: a row that takes part in a fixed-shape step with nothing to decode writes
    there, and no real query ever attends to it.
    """

    def __init__(self, cfg: GPTConfig, slots: int, max_len: int, dtype=torch.float32, device="cpu"):
        if not 0 < max_len <= cfg.block_size:
            raise ValueError(f"KV cache max_len={max_len} must be in 1..block_size={cfg.block_size}")
        shape = (cfg.n_layer, slots, cfg.kv_heads, max_len + 1, cfg.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.slots, self.max_len, self.scratch = slots, max_len, max_len

    def write_and_read(self, layer: int, k: Tensor, v: Tensor, positions: Tensor, slots: Tensor | slice | None,
                       window: int, common_start: int | None = None) -> tuple[Tensor, Tensor]:
        """Write k, v (B, K, T, D) at each row's positions (B, T) of its slot and return the keys and values
        of positions [0, window) of those slots, (B, K, S, D). slots: a (B,) tensor of slot ids (a gather),
        or a slice of B consecutive slots (None: every slot), read as a view without a copy. common_start:
        every row starts there (known on the host), so the write is a plain slice copy."""
        if isinstance(slots, Tensor):
            keys, values = self.k[layer], self.v[layer]  # (slots, K, M + 1, D)
            rows = slots
        else:
            keys, values = self.k[layer][slots or slice(None)], self.v[layer][slots or slice(None)]  # (B, K, M + 1, D)
            rows = slice(None)
        if common_start is not None:
            end = common_start + k.size(2)
            keys[rows, :, common_start:end] = k
            values[rows, :, common_start:end] = v
        else:
            if not isinstance(slots, Tensor):
                rows = torch.arange(k.size(0), device=k.device)
            # two index tensors around a slice: the indexed shape is (B, T, K, D)
            keys[rows[:, None], :, positions] = k.transpose(1, 2)
            values[rows[:, None], :, positions] = v.transpose(1, 2)
        if isinstance(slots, Tensor):
            return keys[:, :, :window][slots], values[:, :, :window][slots]  # gathers only the S columns asked for
        return keys[:, :, :window], values[:, :, :window]


@dataclass
class CacheAccess:
    """Where a forward's tokens sit in a KVCache: row b is slot slots[b] (a tensor of slot ids; a slice of
    consecutive slots; None: slot b, every slot) and its T new tokens take positions start[b] .. start[b] + T - 1.
    Keys [0, window) are attended (None: the whole cache including the scratch column, the fixed shape a
    compiled decode step needs).

    common_start: every row's new tokens start at this position, and the host knows it (a prefill starts at 0;
    a decode step of rows of equal length). Positions are then shared by the batch, the cache write is a
    slice copy, and when the queries are the window's last T positions (a prefill, or one token per row) the
    mask is SDPA's own causal mask or none at all: faster, and the same numbers as a forward without a
    cache (which the recompute baseline relies on in bf16)."""

    cache: KVCache
    start: Tensor  # (B,) long
    slots: Tensor | slice | None = None  # (B,) long, or a slice
    window: int | None = None
    common_start: int | None = None

    def positions_and_mask(self, T: int, device) -> tuple[Tensor, Tensor | bool | None]:
        """The new tokens' positions, (B, T) or (T,) when the batch shares them, and the attention mask:
        (B|1, 1, T, S) bool, None for SDPA's causal mask, False for none."""
        S = self.window or self.cache.k.size(3)
        start = self.common_start
        if start is not None and start + T == S and (start == 0 or T == 1):
            # the queries are the window's last positions: causal (a prefill) or every key visible (one token)
            return torch.arange(start, start + T, device=device), (None if T > 1 else False)
        if start is not None:
            positions = torch.arange(start, start + T, device=device)[None, :]  # (1, T)
        else:
            positions = self.start[:, None] + torch.arange(T, device=device)  # (B, T)
        keys = torch.arange(S, device=device)  # (S,)
        # a query sees its slot's keys up to its own position: older sequences' leftovers and the scratch
        # column lie past it. Every row sees key 0 at least, so no softmax row is all -inf.
        mask = (keys[None, None, :] <= positions[:, :, None])[:, None]  # (B|1, 1, T, S)
        return (positions[0] if start is not None else positions), mask
