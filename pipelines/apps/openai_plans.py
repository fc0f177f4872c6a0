"""From a request body to the engine requests that answer it, and from their events to OpenAI's responses.

`plan_completion` / `plan_chat` run on a worker thread (they parse, render the chat template and tokenize);
the Plan they return knows how to shape the answer: the whole body, or the stream's chunks.
Choice i*n + j is sample j of prompt i. With a seed, sample 0 of every prompt uses the seed itself (so
n=1 answers what lm_core's generate answers with that seed) and sample j a seed derived from it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Protocol

from lm_core.generation_engine import GenerationRequest
from lm_core.generation_rows import GenerationEvent
from lm_core.sampling import SamplingConfig
from lm_core.tokenizer import Tokenizer
from lm_core.weights import CHAT_STOP
from pipelines.apps import openai_format as fmt
from pipelines.apps.openai_schema import ChatRequest, CompletionRequest, RequestError, SamplingFields, parse_body

MAX_PROMPTS = 32  # prompts in one completions request
MAX_CHOICES = 128  # prompts x n: every choice is a row of the running batch


class ServedModel(Protocol):
    """What planning needs of pipelines.apps.serving.ServedModel."""

    name: str
    block_size: int
    max_piece_chars: int
    tokenizer: Tokenizer
    texts: fmt.TokenTexts
    chat_template: Any  # a compiled Jinja template


@dataclass
class Plan:
    request: SamplingFields
    requests: list[GenerationRequest]
    prompt_tokens: int
    prefixes: list[str] = field(default_factory=list)  # per choice: the echoed prompt text
    head: dict = field(default_factory=dict)

    @property
    def stream(self) -> bool:
        return self.request.stream

    @property
    def include_usage(self) -> bool:
        return bool(self.request.stream_options and self.request.stream_options.include_usage)

    def new_choices(self) -> list[fmt.Choice]:
        return [fmt.Choice(i, self.prefixes[i] if self.prefixes else "", r.prompt_logprobs)
                for i, r in enumerate(self.requests)]

    def usage(self, choices: list[fmt.Choice]) -> dict:
        return fmt.usage(self.prompt_tokens, sum(c.tokens for c in choices))

    def usage_chunk(self, served: ServedModel, choices: list[fmt.Choice]) -> dict:
        return {**self.head, "choices": [], "usage": self.usage(choices)}

    def opening_chunks(self, served: ServedModel) -> list[dict]:
        return []


class CompletionPlan(Plan):
    def body(self, served: ServedModel, choices: list[fmt.Choice]) -> dict:
        body = [fmt.completion_choice(c, served.texts, self.request.logprobs) for c in choices]
        return {**self.head, "choices": body, "usage": self.usage(choices)}

    def chunk(self, served: ServedModel, choice: fmt.Choice, event: GenerationEvent) -> dict | None:
        part = fmt.completion_chunk_choice(choice, served.texts, self.request.logprobs)
        return None if part is None else {**self.head, "choices": [part]}


class ChatPlan(Plan):
    @property
    def top_logprobs(self) -> int | None:
        return (self.request.top_logprobs or 0) if self.request.logprobs else None

    def body(self, served: ServedModel, choices: list[fmt.Choice]) -> dict:
        body = [fmt.chat_choice(c, served.texts, self.top_logprobs) for c in choices]
        return {**self.head, "choices": body, "usage": self.usage(choices)}

    def opening_chunks(self, served: ServedModel) -> list[dict]:
        return [{**self.head, "choices": [fmt.chat_delta(i, served.texts, None, None, first=True)]}
                for i in range(len(self.requests))]

    def chunk(self, served: ServedModel, choice: fmt.Choice, event: GenerationEvent) -> dict | None:
        if not event.text and event.finish_reason is None and not (self.top_logprobs is not None and event.logprobs):
            return None
        return {**self.head, "choices": [fmt.chat_delta(choice.index, served.texts, event, self.top_logprobs)]}


def plan_completion(served: ServedModel, raw: bytes) -> CompletionPlan:
    req = parse_body(raw, CompletionRequest)
    check_model(served, req.model)
    max_tokens = 16 if req.max_tokens is None else req.max_tokens
    prompts = [req.prompt] if isinstance(req.prompt, str) or isinstance(req.prompt[0], int) else list(req.prompt)
    if len(prompts) > MAX_PROMPTS:
        raise RequestError(400, f"{len(prompts)} prompts in one request; send at most {MAX_PROMPTS} per request", "prompt")
    tok = served.tokenizer
    ids, texts = [], []
    for p in prompts:
        if isinstance(p, str):
            check_length(served, at_least_tokens(served, p), max_tokens, at_least=True)  # before tokenizing a huge string
            ids.append(tok.encode(p, bos=True))
            texts.append(p)
        else:
            if bad := [i for i in p if not 0 <= i < tok.vocab_size][:5]:
                raise RequestError(400, f"token ids {bad} are outside the vocabulary (0..{tok.vocab_size - 1})", "prompt")
            ids.append(list(p))
            texts.append(tok.decode(list(p)))
    check_length(served, max(map(len, ids)), max_tokens)
    logprobs = req.logprobs is not None
    requests = _requests(req, ids, max_tokens, logprobs=logprobs, prompt_logprobs=logprobs and req.echo)
    prefixes = [texts[i // req.n] for i in range(len(requests))] if req.echo else []
    return CompletionPlan(req, requests, sum(map(len, ids)), prefixes, fmt.head("text_completion", served.name))


def plan_chat(served: ServedModel, raw: bytes) -> ChatPlan:
    req = parse_body(raw, ChatRequest)
    check_model(served, req.model)
    # the template knows system, user and assistant; OpenAI's newer "developer" role is the system's
    messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in req.messages]
    try:
        text = served.chat_template.render(messages=messages, add_generation_prompt=True, bos_token="", eos_token="")
    except Exception as exc:  # a template error is the export's fault, not the client's
        raise RequestError(500, f"the model's chat template failed: {exc}", code="chat_template_error") from None
    budget = req.completion_budget  # None: as much as the context leaves (OpenAI's default)
    check_length(served, at_least_tokens(served, text), 1 if budget is None else budget, at_least=True)
    ids = served.tokenizer.encode(text, bos=True)
    max_tokens = served.block_size - len(ids) if budget is None else budget
    check_length(served, len(ids), max(max_tokens, 1))
    requests = _requests(req, [ids], max_tokens, logprobs=req.logprobs, prompt_logprobs=False, stop=list(CHAT_STOP))
    return ChatPlan(req, requests, len(ids), [], fmt.head("chat.completion" + (".chunk" if req.stream else ""), served.name))


def _requests(req: SamplingFields, prompts: list[list[int]], max_tokens: int, *, logprobs: bool, prompt_logprobs: bool,
              stop: list[str] = ()) -> list[GenerationRequest]:
    if len(prompts) * req.n > MAX_CHOICES:
        raise RequestError(400, f"{len(prompts)} prompts x n={req.n} is {len(prompts) * req.n} choices; ask for at most "
                                f"{MAX_CHOICES} per request", "n")
    requests = []
    for ids in prompts:
        for j in range(req.n):
            seed = req.seed if req.seed is None or j == 0 else req.seed + j * 0x9E3779B97F4A7C15
            sampling = SamplingConfig(max_new_tokens=max_tokens, temperature=req.temperature, top_k=req.top_k,
                                      top_p=None if req.top_p >= 1.0 else req.top_p, seed=seed)
            requests.append(GenerationRequest(ids, sampling, stop=[*stop, *req.stop], logprobs=logprobs,
                                              prompt_logprobs=prompt_logprobs))
    return requests


def check_model(served: ServedModel, name: str) -> None:
    if name != served.name:
        raise RequestError(404, f"The model '{name}' does not exist; this server serves '{served.name}' "
                                f"(see /v1/models)", "model", "model_not_found")


def at_least_tokens(served: ServedModel, text: str) -> int:
    """A lower bound on the tokens of `text` plus BOS, from its length alone: no piece spans more characters
    than the vocabulary's longest."""
    return 1 + math.ceil(len(text) / served.max_piece_chars)


def check_length(served: ServedModel, prompt_tokens: int, max_tokens: int, at_least: bool = False) -> None:
    if prompt_tokens + max_tokens > served.block_size:
        some = "at least " if at_least else ""
        raise RequestError(400, f"This model's maximum context length is {served.block_size} tokens. However, you "
                                f"requested {some}{prompt_tokens + max_tokens} tokens ({some}{prompt_tokens} in the prompt, "
                                f"{max_tokens} for the completion). Please reduce the prompt or max_tokens.",
                           "max_tokens", "context_length_exceeded")
