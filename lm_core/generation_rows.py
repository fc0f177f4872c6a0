"""What the generation engine keeps per request on the host (a Row) and what it reports (GenerationEvent).

A Row owns the request's tokens (prompt + generated), its slot, its seed and counter for the sampler,
and its text stream (lm_core.text_stream: never splits a UTF-8 character, holds back a possible stop
string). Everything here is plain Python; no tensor is touched.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from lm_core.text_stream import TextStream

if TYPE_CHECKING:
    from lm_core.generation_engine import GenerationRequest


class Detokenizer(Protocol):
    eos_id: int

    def decode(self, ids: list[int]) -> str: ...


@dataclass
class TokenLogprob:
    id: int
    logprob: float | None  # under the model at temperature 1; None for the first token of a prompt
    top: list[tuple[int, float]]  # the most likely ids at that position and their logprobs, best first


@dataclass
class GenerationEvent:
    request_id: int
    token_ids: list[int]  # new tokens since the last event (eos is never one)
    text: str = ""  # new text: never part of a UTF-8 character or of a stop string ("" without a tokenizer)
    finish_reason: str | None = None  # None while running; "stop" (eos or a stop string), "length", "cancelled", "error"
    tokens: int = 0  # tokens generated so far (a stop string's tokens included)
    logprobs: list[TokenLogprob] | None = None  # for token_ids, when the request asked
    prompt_logprobs: list[TokenLogprob] | None = None  # on the first event, when the request asked
    error: str | None = None  # with finish_reason "error"


class Row:
    """One request inside the engine."""

    def __init__(self, row_id: int, request: GenerationRequest, prompt: list[int], seed: int,
                 tokenizer: Detokenizer | None):
        self.id, self.request, self.seed = row_id, request, seed
        self.tokens = list(prompt)  # prompt + generated; the last one is the next decode input
        self.prompt_len = len(prompt)
        self.slot: int | None = None
        self.needs_prefill = True  # admitted and not yet in the cache, or sliding past it
        self.wants_prompt_logprobs = request.prompt_logprobs  # until the first prefill reports them
        self.done = False  # finished: later results (if any) are ignored
        self.stream = TextStream(tokenizer.decode, request.stop) if tokenizer is not None else None
        sampling = request.sampling
        self._top_k = sampling.top_k or 0
        self._floats = [float(sampling.temperature), float(sampling.top_p if sampling.top_p is not None else 1.0)]

    @property
    def generated(self) -> int:
        return len(self.tokens) - self.prompt_len

    def ints(self, slot: int, position: int) -> list[int]:
        """This row's int inputs (lm_core.decode_step's columns); the counter is the index of the token drawn."""
        return [slot, self.tokens[-1], position, self.seed, self.generated, self._top_k]

    def floats(self) -> list[float]:
        return self._floats

    def push(self, token: int, eos_id: int | None, logprob: TokenLogprob | None) -> GenerationEvent:
        """Book a chosen token; the event says whether the row is done and why."""
        if token == eos_id:
            return GenerationEvent(self.id, [], self.stream.finish() if self.stream else "", "stop", self.generated)
        self.tokens.append(token)
        text, reason = "", None
        if self.stream is not None:
            text = self.stream.push(token)
            if self.stream.stopped:
                reason = "stop"
        if reason is None and self.generated == self.request.sampling.max_new_tokens:
            reason = "length"
            text += self.stream.finish() if self.stream is not None else ""
        return GenerationEvent(self.id, [token], text, reason, self.generated, [logprob] if logprob else None)

    def finish(self, reason: str) -> GenerationEvent:
        """The last event of a row that ends without a new token (cancelled, failed, or nothing to generate)."""
        return GenerationEvent(self.id, [], "", reason, self.generated)
