"""Choosing the next token of many rows at once, on the device, each row with its own settings.

Every row carries its temperature (0: greedy), top-k (0: off), top-p (1: off), a 32-bit seed and a counter
(how many tokens it has generated). Sampling is the Gumbel-max trick: argmax(logits / T + g) with g
Gumbel noise is a draw from softmax(logits / T). The noise is not taken from a stateful generator: it is
a hash of (seed, counter, token id), so

- a row's draws depend on its own seed and position only, never on which other requests share the batch
  or which slot it sits in (a seeded server request answers what the same request answers alone);
- the cached and the recompute path draw the same tokens (the tests compare them token for token);
- the step is pure tensor arithmetic with fixed shapes, so it can be compiled or captured in a CUDA graph.

The hash works on int64 tensors holding 32-bit values, with multipliers below 2**31 so no product
overflows. 24 bits of it make a uniform in (0, 1); that resolution truncates the Gumbel tail at ~17,
which no real sampling distribution notices.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from lm_core.typed_config import ConfigError

TOP_LOGPROBS = 5  # the most alternatives a request can ask for per token (OpenAI's completions limit)
_M32 = 0xFFFFFFFF


@dataclass
class SamplingConfig:
    max_new_tokens: int = 64
    temperature: float = 1.0  # 0 means greedy
    top_k: int | None = None  # keep only the k most likely tokens
    top_p: float | None = None  # keep the smallest set of tokens whose probability sums to >= top_p (nucleus)
    seed: int | None = None  # None: nondeterministic

    def validate(self) -> None:
        def fail(msg: str) -> None:
            raise ConfigError(msg)

        n = self.max_new_tokens
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            fail(f"sampling.max_new_tokens={n!r} must be an integer >= 0; set sampling.max_new_tokens to e.g. 64")
        if not self.temperature >= 0:
            fail(f"sampling.temperature={self.temperature} must be >= 0; use 0 for greedy or e.g. 0.8 to sample")
        k = self.top_k
        if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
            fail(f"sampling.top_k={k!r} must be an integer >= 1; set sampling.top_k to e.g. 50 or leave it unset")
        if self.top_p is not None and not 0.0 < self.top_p <= 1.0:
            fail(f"sampling.top_p={self.top_p} must be in (0, 1]; set sampling.top_p to e.g. 0.9 or leave it unset")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            fail(f"sampling.seed={self.seed!r} must be an integer; set sampling.seed to e.g. 0 or leave it unset")

    @property
    def filters(self) -> bool:
        """Whether top-k or top-p cut anything (a sort of the logits is needed)."""
        return self.temperature > 0 and (self.top_k is not None or (self.top_p is not None and self.top_p < 1.0))


def seed_key(seed: int) -> int:
    """Any Python int as the 32-bit key the noise hash takes (high bits folded in, not dropped)."""
    seed &= (1 << 64) - 1
    return (seed ^ (seed >> 32)) & _M32


def _mix(x: Tensor) -> Tensor:
    """A 32-bit integer hash (xorshift-multiply rounds) on int64 tensors holding values < 2**32."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _M32
    x = x ^ (x >> 15)
    x = (x * 0x5BD1E995) & _M32
    return x ^ (x >> 16)


def token_keys(vocab_size: int, device=None) -> Tensor:
    """(V,) the hash of each token id: the per-token half of the noise, the same every step (made once)."""
    return _mix(torch.arange(vocab_size, device=device, dtype=torch.int64) + 0x3C6EF372)


def gumbel_noise(seeds: Tensor, counters: Tensor, keys: Tensor) -> Tensor:
    """(B, V) float32 Gumbel noise that depends only on each row's (seed, counter) and the token id;
    keys: token_keys(V)."""
    row = _mix(_mix(seeds & _M32) ^ (counters & _M32))  # (B,)
    bits = _mix(row[:, None] ^ keys[None, :]) >> 8  # (B, V), 24 bits
    u = (bits.float() + 0.5) * (1.0 / (1 << 24))  # uniform in (0, 1), never 0 or 1
    return -torch.log(-torch.log(u))


def filter_logits(scaled: Tensor, top_k: Tensor, top_p: Tensor) -> Tensor:
    """Mask (B, V) temperature-scaled logits to each row's top_k (B,) (0: off) and then top_p (B,) (>= 1: off).

    top-k keeps every token at least as likely as the k-th (ties survive); top-p then keeps the most likely
    tokens until their probability reaches top_p (the top token always survives)."""
    V = scaled.size(-1)
    ordered, order = torch.sort(scaled, dim=-1, descending=True)  # (B, V)
    k = torch.where(top_k > 0, top_k, V).clamp(max=V)  # (B,)
    kth = ordered.gather(1, (k - 1)[:, None])  # (B, 1)
    ordered = ordered.masked_fill(ordered < kth, float("-inf"))
    probs = torch.softmax(ordered, dim=-1)
    drop = ((torch.cumsum(probs, dim=-1) - probs) >= top_p[:, None]) & (top_p < 1.0)[:, None]
    ordered = ordered.masked_fill(drop, float("-inf"))
    return torch.empty_like(scaled).scatter_(1, order, ordered)


def sample(logits: Tensor, temperature: Tensor, top_k: Tensor, top_p: Tensor, seeds: Tensor, counters: Tensor,
           filters: bool, keys: Tensor | None = None, greedy_only: bool = False) -> Tensor:
    """Next token ids (B,) from float32 logits (B, V). `filters` and `greedy_only` are the host's knowledge that
    some row uses top-k/top-p (the sort is skipped otherwise) and that no row samples (only the argmax is
    taken); they are Python bools, so no device value is read. keys: token_keys(V), made once by the caller
    (computed here when not given)."""
    greedy = torch.argmax(logits, dim=-1)  # (B,)
    if greedy_only:
        return greedy
    scaled = logits / temperature.clamp(min=1e-6)[:, None]
    if filters:
        scaled = filter_logits(scaled, top_k, top_p)
    keys = token_keys(logits.size(-1), logits.device) if keys is None else keys
    drawn = torch.argmax(scaled + gumbel_noise(seeds, counters, keys), dim=-1)
    return torch.where(temperature > 0, drawn, greedy)


def with_logprobs(logits: Tensor, ids: Tensor) -> Tensor:
    """(B, 2 + 2 * TOP_LOGPROBS) float64 on the device: each row's chosen id and its log-probability under
    the model (temperature 1, before any filter), then the TOP_LOGPROBS most likely ids and theirs. One
    tensor, so the host reads the step's ids and logprobs with a single transfer (ids are exact in float64)."""
    logprobs = torch.log_softmax(logits, dim=-1)  # (B, V)
    chosen = logprobs.gather(1, ids[:, None])  # (B, 1)
    top = torch.topk(logprobs, min(TOP_LOGPROBS, logits.size(-1)), dim=-1)  # (B, N) each
    return torch.cat([ids[:, None].double(), chosen.double(), top.indices.double(), top.values.double()], dim=1)


def unpack_logprobs(row: list[float]) -> tuple[int, float, list[tuple[int, float]]]:
    """One host row of with_logprobs: (id, logprob, [(top id, logprob), ...] most likely first)."""
    n = (len(row) - 2) // 2
    return int(row[0]), row[1], [(int(i), lp) for i, lp in zip(row[2:2 + n], row[2 + n:])]
