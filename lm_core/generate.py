"""Call-and-collect generation on top of the one engine (lm_core.generation_engine): token ids for one prompt
or a batch, and text with stop strings and finish reasons, streamed as it completes.

Each helper submits its prompts to an engine and steps it until they are done: a private engine sized to
the prompts (one slot each, max_len = the longest prompt + max_new_tokens, at most block_size), or the
`engine` passed in. An engine that runs its own loop (engine.start(), as the server's does) is waited on
instead of stepped. use_cache=False recomputes every row's window each step: the slow baseline that the
cached path must match token for token.
"""

from __future__ import annotations

import queue
from collections.abc import Iterator, Sequence
from contextlib import closing
from dataclasses import dataclass

from lm_core.generation_engine import EngineConfig, GenerationEngine, GenerationRequest
from lm_core.generation_rows import Detokenizer, GenerationEvent
from lm_core.model import GPT
from lm_core.sampling import SamplingConfig

__all__ = ["SamplingConfig", "TextChunk", "generate", "generate_batch", "generate_tokens", "stream_text",
           "complete_text", "run_requests"]


def private_engine(model: GPT, prompts: Sequence[Sequence[int]], sampling: SamplingConfig, *,
                   tokenizer: Detokenizer | None = None, eos_id: int | None = None,
                   use_cache: bool = True) -> GenerationEngine:
    """An engine just big enough for these prompts: one slot each, as many positions as they can use."""
    need = min(model.cfg.block_size, max(map(len, prompts), default=1) + sampling.max_new_tokens)
    config = EngineConfig(slots=max(1, len(prompts)), max_len=max(1, need), use_cache=use_cache)
    return GenerationEngine(model, config, tokenizer=tokenizer, eos_id=eos_id)


def run_requests(engine: GenerationEngine, requests: Sequence[GenerationRequest]) -> Iterator[tuple[int, GenerationEvent]]:
    """Submit the requests and yield (index of the request, event) until every one has finished.

    The model is in eval() mode meanwhile and its previous mode is restored at the end. Closing the
    iterator early cancels what is still running."""
    events: queue.SimpleQueue = queue.SimpleQueue()
    index: dict[int, int] = {}
    for request in requests:
        request.on_event = events.put
    model, was_training = engine.model, engine.model.training
    model.eval()
    open_ids: set[int] = set()
    try:
        for i, request in enumerate(requests):
            rid = engine.submit(request)
            index[rid] = i
            open_ids.add(rid)
        while open_ids:
            if events.empty() and not engine.background:
                engine.step()
                continue
            event = events.get()
            if event.finish_reason is not None:
                open_ids.discard(event.request_id)
            yield index[event.request_id], event
    finally:
        for rid in open_ids:
            engine.cancel(rid)
        if not engine.background:
            while engine.has_work():  # let the cancellations free their slots
                engine.step()
        model.train(was_training)


def _id_requests(prompts: Sequence[Sequence[int]], sampling: SamplingConfig) -> list[GenerationRequest]:
    if not prompts:
        raise ValueError("prompts is empty; pass at least one prompt")
    if any(len(p) == 0 for p in prompts):
        raise ValueError("a prompt is empty (prompt_ids is empty); generation needs at least one token (e.g. a BOS id)")
    sampling.validate()
    return [GenerationRequest(list(p), sampling) for p in prompts]


def generate_batch(model: GPT, prompts: Sequence[Sequence[int]], sampling: SamplingConfig, *, eos_id: int | None = None,
                   use_cache: bool = True, engine: GenerationEngine | None = None) -> list[list[int]]:
    """New token ids for each prompt (eos ends a row and is not included)."""
    requests = _id_requests(prompts, sampling)
    engine = engine or private_engine(model, prompts, sampling, eos_id=eos_id, use_cache=use_cache)
    out: list[list[int]] = [[] for _ in prompts]
    for i, event in run_requests(engine, requests):
        out[i] += event.token_ids
    return out


def generate_tokens(model: GPT, prompt_ids: Sequence[int], sampling: SamplingConfig, *, eos_id: int | None = None,
                    use_cache: bool = True) -> Iterator[int]:
    """Yield new token ids one at a time for one prompt. Arguments are checked at call time."""
    requests = _id_requests([prompt_ids], sampling)
    engine = private_engine(model, [prompt_ids], sampling, eos_id=eos_id, use_cache=use_cache)
    return _tokens(run_requests(engine, requests))


def _tokens(events: Iterator[tuple[int, GenerationEvent]]) -> Iterator[int]:
    with closing(events):  # closing this iterator cancels the request and restores the model's mode
        for _, event in events:
            yield from event.token_ids


def generate(model: GPT, prompt_ids: Sequence[int], sampling: SamplingConfig, *, eos_id: int | None = None,
             use_cache: bool = True) -> list[int]:
    """All new token ids for one prompt, as a list."""
    return generate_batch(model, [prompt_ids], sampling, eos_id=eos_id, use_cache=use_cache)[0]


# --- text --------------------------------------------------------------------------------------------


@dataclass
class TextChunk:
    index: int  # which prompt
    text: str  # new text; never part of a UTF-8 character or of a stop string
    finish_reason: str | None = None  # None while running; "stop" (eos or a stop string) or "length" at the end
    tokens: int = 0  # tokens generated for this prompt so far (a stop string's tokens included)


def stream_text(model: GPT, tokenizer: Detokenizer, prompts: Sequence[Sequence[int]], sampling: SamplingConfig, *,
                stop: Sequence[str] = (), use_cache: bool = True,
                engine: GenerationEngine | None = None) -> Iterator[TextChunk]:
    """Generate for each prompt and yield text as it completes; each prompt ends with one chunk that has a
    finish_reason. Text is cut before the first stop string, which is not returned. A prompt that stops
    early leaves the batch at once; closing the iterator stops all work."""
    requests = _id_requests(prompts, sampling)
    for request in requests:
        request.stop = list(stop)
    if engine is None:
        engine = private_engine(model, prompts, sampling, tokenizer=tokenizer, use_cache=use_cache)
    return _chunks(run_requests(engine, requests))


def _chunks(events: Iterator[tuple[int, GenerationEvent]]) -> Iterator[TextChunk]:
    with closing(events):
        for i, event in events:
            if event.text or event.finish_reason is not None:
                yield TextChunk(i, event.text, event.finish_reason, event.tokens)


def complete_text(model: GPT, tokenizer: Detokenizer, prompts: Sequence[Sequence[int]], sampling: SamplingConfig, *,
                  stop: Sequence[str] = (), use_cache: bool = True,
                  engine: GenerationEngine | None = None) -> list[TextChunk]:
    """The whole completion of each prompt as one TextChunk (text, finish_reason, tokens); see stream_text."""
    out = [TextChunk(b, "") for b in range(len(prompts))]
    for chunk in stream_text(model, tokenizer, prompts, sampling, stop=stop, use_cache=use_cache, engine=engine):
        done = out[chunk.index]
        done.text += chunk.text
        done.finish_reason, done.tokens = chunk.finish_reason, chunk.tokens
    return out
