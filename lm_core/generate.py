"""The one autoregressive generation loop (CLI sampling, eval, serving and benchmarks all call this).

With the KV cache the prompt is run once (prefill) and every further step feeds a single token
(decode). Without it, the whole window is recomputed each step; that is the slow baseline the cached
path must match token for token, so both paths share the same sampling code and the same RNG use.
A batch of prompts of different lengths is one left-padded tensor (the model masks the padding), and
batch size 1 is just a batch of one: generate_batch_tokens is the loop, everything else wraps it.
On top sit text helpers (stream_text, complete_text) that add stop strings and finish reasons and
stream text that never splits a UTF-8 character (lm_core.text_stream).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import closing
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

from lm_core.model import GPT, KVCache
from lm_core.text_stream import TextStream
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


def generate_batch_tokens(model: GPT, prompts: Sequence[Sequence[int]], sampling: SamplingConfig, *,
                          eos_id: int | None = None, use_cache: bool = True, cache: KVCache | None = None,
                          active: list[bool] | None = None) -> Iterator[list[int | None]]:
    """The generation loop: yield, per step, one new token id per prompt, or None for a row that is done.

    Prompts of different lengths run as one left-padded batch: the model masks the padding and starts
    each row's positions after it, so every row gets the tokens it would get alone (per-row RNGs, all
    seeded with sampling.seed, keep that true when sampling too). A row is done after eos (not yielded)
    or when the caller sets active[row] = False (e.g. on a stop string); the loop ends when every row is
    done or after sampling.max_new_tokens steps.

    The model only sees the last block_size tokens of each row. With the cache, prefill + decode runs
    until the window is full; from then on the cache is refilled from the cropped window every step,
    which costs the same as use_cache=False but keeps both paths exactly equivalent. (Positions are
    absolute, so a full cache cannot simply be shifted.) Pass `cache` to reuse one allocation across
    calls; it must hold len(prompts) rows and between min(block_size, longest prompt + max_new_tokens)
    and block_size positions.

    The model is in eval() mode while the iterator runs and its previous mode is restored when the
    iterator finishes or is closed.
    """
    sampling.validate()
    rows = [list(map(int, p)) for p in prompts]
    if not rows:
        raise ValueError("prompts is empty; pass at least one prompt")
    if any(len(r) == 0 for r in rows):
        raise ValueError("a prompt is empty (prompt_ids is empty); generation needs at least one token (e.g. a BOS id)")
    if active is None:
        active = [True] * len(rows)
    if len(active) != len(rows):
        raise ValueError(f"active has {len(active)} entries for {len(rows)} prompts")
    block_size = model.cfg.block_size
    need = min(block_size, max(map(len, rows)) + sampling.max_new_tokens)
    if cache is not None:
        if not use_cache:
            raise ValueError("a cache was passed with use_cache=False; pass one or the other")
        if cache.batch_size != len(rows) or not need <= cache.max_len <= block_size:
            raise ValueError(f"KV cache (batch {cache.batch_size}, max_len {cache.max_len}) does not fit {len(rows)} "
                             f"prompts needing {need} positions (at most block_size={block_size}); allocate "
                             f"KVCache(cfg, {len(rows)}, {need}) or more")
    elif use_cache:
        param = next(model.parameters())
        cache = KVCache(model.cfg, batch_size=len(rows), max_len=need, dtype=param.dtype, device=param.device)
    return _generate(model, rows, sampling, eos_id, cache, active)


@torch.no_grad()  # torch re-enters no_grad around each resume, so grad mode never leaks to the caller
def _generate(model: GPT, rows: list[list[int]], sampling: SamplingConfig, eos_id: int | None,
              cache: KVCache | None, active: list[bool]) -> Iterator[list[int | None]]:
    # kept separate from generate_batch_tokens so argument errors raise at call time, not on the first next()
    device = next(model.parameters()).device
    window = cache.max_len if cache is not None else model.cfg.block_size
    generators = [torch.Generator(device=device) for _ in rows]
    for g in generators:
        if sampling.seed is not None:
            g.manual_seed(sampling.seed)
        else:
            g.seed()
    if cache is not None:
        cache.reset()
    pad = None
    was_training = model.training
    model.eval()
    try:
        for _ in range(sampling.max_new_tokens):
            if not any(active):
                return
            if cache is None or cache.pos == 0 or cache.pos == cache.max_len:
                if cache is not None:
                    cache.reset()  # prefill (first step, or the window is full and must be rebuilt)
                x, pad = _left_pad([r[-window:] for r in rows], device)  # (B, T), (B,) or None
            else:
                # decode: everything earlier is in the cache; all rows grow by one, so pad stays valid
                x = torch.tensor([[r[-1]] for r in rows], dtype=torch.long, device=device)  # (B, 1)
            logits, _ = model(x, kv_cache=cache, pad=pad)  # (B, T, V)
            last = logits[:, -1]  # (B, V)
            greedy = torch.argmax(last, dim=-1).tolist() if sampling.temperature == 0 else None
            step: list[int | None] = []
            for b, row in enumerate(rows):
                token = None
                if active[b]:
                    token = greedy[b] if greedy is not None else sample_next(last[b], sampling, generators[b])
                    if token == eos_id:
                        active[b], token = False, None
                # a done row still takes part in the batch (its output is ignored) so all rows stay aligned
                row.append(token if token is not None else row[-1])
                step.append(token)
            yield step  # all None only when the last active rows just sampled eos
    finally:
        model.train(was_training)


def _left_pad(rows: list[list[int]], device) -> tuple[Tensor, Tensor | None]:
    """Rows of unequal length as one (B, T) tensor, padding on the left, and the pad counts (B,)
    (None when no row is padded, so the model takes its plain causal path)."""
    T = max(map(len, rows))
    pads = [T - len(r) for r in rows]
    x = torch.tensor([[0] * p + r for p, r in zip(pads, rows)], dtype=torch.long, device=device)
    return x, (torch.tensor(pads, dtype=torch.long, device=device) if any(pads) else None)


def generate_tokens(model: GPT, prompt_ids: Sequence[int], sampling: SamplingConfig, *, eos_id: int | None = None,
                    use_cache: bool = True, cache: KVCache | None = None) -> Iterator[int]:
    """Yield new token ids one at a time for one prompt; see generate_batch_tokens."""
    if len(prompt_ids) == 0:
        raise ValueError("prompt_ids is empty; generation needs at least one token (e.g. a BOS id)")
    steps = generate_batch_tokens(model, [prompt_ids], sampling, eos_id=eos_id, use_cache=use_cache, cache=cache)
    return _only_row(steps)


def _only_row(steps: Iterator[list[int | None]]) -> Iterator[int]:
    with closing(steps):  # closing this iterator closes the loop, which restores the model's mode
        for step in steps:
            if step[0] is None:
                return
            yield step[0]


def generate(model: GPT, prompt_ids: Sequence[int], sampling: SamplingConfig, *, eos_id: int | None = None,
             use_cache: bool = True) -> list[int]:
    """All new token ids as a list; see generate_batch_tokens."""
    return list(generate_tokens(model, prompt_ids, sampling, eos_id=eos_id, use_cache=use_cache))


def generate_batch(model: GPT, prompts: Sequence[Sequence[int]], sampling: SamplingConfig, *,
                   eos_id: int | None = None, use_cache: bool = True) -> list[list[int]]:
    """New token ids for each prompt, generated as one batch; see generate_batch_tokens."""
    out: list[list[int]] = [[] for _ in prompts]
    for step in generate_batch_tokens(model, prompts, sampling, eos_id=eos_id, use_cache=use_cache):
        for b, token in enumerate(step):
            if token is not None:
                out[b].append(token)
    return out


# --- text: stop strings, finish reasons, UTF-8-safe streaming ---------------------------------------


class Detokenizer(Protocol):
    eos_id: int

    def decode(self, ids: list[int]) -> str: ...


@dataclass
class TextChunk:
    index: int  # which prompt
    text: str  # new text; never part of a UTF-8 character or of a stop string
    finish_reason: str | None = None  # None while running; "stop" (eos or a stop string) or "length" at the end
    tokens: int = 0  # tokens generated for this prompt so far (a stop string's tokens included)


def stream_text(model: GPT, tokenizer: Detokenizer, prompts: Sequence[Sequence[int]], sampling: SamplingConfig, *,
                stop: Sequence[str] = (), use_cache: bool = True, cache: KVCache | None = None) -> Iterator[TextChunk]:
    """Generate for each prompt and yield text as it completes; each prompt ends with one chunk that has a
    finish_reason. Text is cut before the first stop string, which is not returned. A prompt that stops
    early leaves the batch (its row does no more sampling); closing the iterator stops all work."""
    streams = [TextStream(tokenizer.decode, stop) for _ in prompts]
    active = [True] * len(prompts)
    steps = generate_batch_tokens(model, prompts, sampling, eos_id=tokenizer.eos_id, use_cache=use_cache,
                                  cache=cache, active=active)
    return _stream_text(steps, streams, active, sampling.max_new_tokens)


def _stream_text(steps: Iterator[list[int | None]], streams: list[TextStream], active: list[bool],
                 max_new_tokens: int) -> Iterator[TextChunk]:
    counts = [0] * len(streams)
    done = [False] * len(streams)
    try:
        for step in steps:
            for b, token in enumerate(step):
                if done[b]:
                    continue
                stream = streams[b]
                if token is None:  # eos
                    done[b] = True
                    yield TextChunk(b, stream.finish(), "stop", counts[b])
                    continue
                counts[b] += 1
                piece = stream.push(token)
                if stream.stopped:
                    active[b], done[b] = False, True
                    yield TextChunk(b, piece, "stop", counts[b])
                elif counts[b] == max_new_tokens:
                    done[b] = True
                    yield TextChunk(b, piece + stream.finish(), "length", counts[b])
                elif piece:
                    yield TextChunk(b, piece, None, counts[b])
        for b in range(len(streams)):  # only max_new_tokens == 0 leaves rows unfinished here
            if not done[b]:
                yield TextChunk(b, streams[b].finish(), "length", counts[b])
    finally:
        steps.close()


def complete_text(model: GPT, tokenizer: Detokenizer, prompts: Sequence[Sequence[int]], sampling: SamplingConfig, *,
                  stop: Sequence[str] = (), use_cache: bool = True) -> list[TextChunk]:
    """The whole completion of each prompt as one TextChunk (text, finish_reason, tokens); see stream_text."""
    out = [TextChunk(b, "") for b in range(len(prompts))]
    for chunk in stream_text(model, tokenizer, prompts, sampling, stop=stop, use_cache=use_cache):
        done = out[chunk.index]
        done.text += chunk.text
        done.finish_reason, done.tokens = chunk.finish_reason, chunk.tokens
    return out
