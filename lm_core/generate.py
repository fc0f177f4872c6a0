"""The one autoregressive generation loop (CLI sampling, eval, serving and benchmarks all call this).

With the KV cache the prompt is run once (prefill) and every further step feeds a single token
(decode). Without it, the whole window is recomputed each step; that is the slow baseline the cached
path must match token for token, so both paths share the same sampling code and the same RNG use.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from lm_core.model import GPT, KVCache
from lm_core.typed_config import ConfigError


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


def sample_next(logits: Tensor, sampling: SamplingConfig, generator: torch.Generator) -> int:
    """Pick one token id from logits (V,) according to `sampling`."""
    if sampling.temperature == 0:
        return int(torch.argmax(logits))
    logits = logits.float() / sampling.temperature
    if sampling.top_k is not None and sampling.top_k < logits.size(-1):
        kth = torch.topk(logits, sampling.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if sampling.top_p is not None and sampling.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)  # (V,)
        probs = torch.softmax(sorted_logits, dim=-1)
        # drop a token when the ones ranked above it already reach top_p; the top token always survives
        drop = (torch.cumsum(probs, dim=-1) - probs) >= sampling.top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    probs = torch.softmax(logits, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))


def generate_tokens(model: GPT, prompt_ids: list[int], sampling: SamplingConfig, *, eos_id: int | None = None,
                    use_cache: bool = True) -> Iterator[int]:
    """Yield new token ids one at a time (batch size 1).

    Stops after sampling.max_new_tokens tokens or when eos_id is sampled (eos itself is not yielded).
    The model only sees the last block_size tokens. With the cache, prefill + decode runs until the
    window is full (len(prompt) + generated == block_size); from then on the cache is refilled from the
    cropped window every step, which costs the same as use_cache=False but keeps both paths exactly
    equivalent. (Positions are absolute, so a full cache cannot simply be shifted.)

    The model is in eval() mode while the iterator runs and its previous mode is restored when the
    iterator finishes or is closed.
    """
    sampling.validate()
    if len(prompt_ids) == 0:
        raise ValueError("prompt_ids is empty; generation needs at least one token (e.g. a BOS id)")
    return _generate(model, list(prompt_ids), sampling, eos_id, use_cache)


@torch.no_grad()  # torch re-enters no_grad around each resume, so grad mode never leaks to the caller
def _generate(model: GPT, ids: list[int], sampling: SamplingConfig, eos_id: int | None,
              use_cache: bool) -> Iterator[int]:
    # kept separate from generate_tokens so argument errors raise at call time, not on the first next()
    param = next(model.parameters())
    device, block_size = param.device, model.cfg.block_size
    generator = torch.Generator(device=device)
    if sampling.seed is not None:
        generator.manual_seed(sampling.seed)
    else:
        generator.seed()
    cache = None
    if use_cache:
        max_len = min(block_size, len(ids) + sampling.max_new_tokens)
        cache = KVCache(model.cfg, batch_size=1, max_len=max_len, dtype=param.dtype, device=device)
    was_training = model.training
    model.eval()
    try:
        for _ in range(sampling.max_new_tokens):
            if cache is None:
                inputs = ids[-block_size:]
            elif cache.pos == 0 or cache.pos == cache.max_len:
                cache.reset()  # prefill (first step, or the window is full and must be rebuilt)
                inputs = ids[-cache.max_len:]
            else:
                inputs = ids[-1:]  # decode: everything earlier is already in the cache
            x = torch.tensor([inputs], dtype=torch.long, device=device)  # (1, T)
            logits, _ = model(x, kv_cache=cache)  # (1, T, V)
            token = sample_next(logits[0, -1], sampling, generator)
            if token == eos_id:
                return
            ids.append(token)
            yield token
    finally:
        model.train(was_training)


def generate(model: GPT, prompt_ids: list[int], sampling: SamplingConfig, *, eos_id: int | None = None,
             use_cache: bool = True) -> list[int]:
    """All new token ids as a list; see generate_tokens."""
    return list(generate_tokens(model, prompt_ids, sampling, eos_id=eos_id, use_cache=use_cache))
