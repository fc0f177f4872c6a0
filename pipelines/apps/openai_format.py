"""Engine results in OpenAI's response shapes: completion and chat bodies, stream chunks, and the two logprobs
formats (the completions API's parallel lists, which lm-evaluation-harness reads, and chat's per-token list).

A token's text in `tokens` / `top_logprobs` is its SentencePiece piece with the space marker as a space; a
byte-fallback piece that is not ASCII is written "bytes:\\xNN" (as OpenAI does for partial characters).
`text_offset` is each token's character offset in the returned `text` (with echo, the prompt's own
characters come first): a byte piece counts one character at the byte that starts a UTF-8 character and
none for continuation bytes, control tokens (BOS) count none.
"""

from __future__ import annotations

import time
import uuid

from lm_core.generation_rows import GenerationEvent, TokenLogprob
from lm_core.tokenizer import Tokenizer


class TokenTexts:
    """Per-id display text and character width, computed once per tokenizer."""

    def __init__(self, tokenizer: Tokenizer):
        nbytes = tokenizer.token_bytes()  # 0 for control and unknown pieces
        is_byte = tokenizer.byte_pieces()
        self.text: list[str] = []
        self.width: list[int] = []
        for i in range(tokenizer.vocab_size):
            piece = tokenizer.id_to_piece(i)
            if is_byte[i]:
                b = int(piece[3:5], 16)  # "<0xE6>"
                self.text.append(chr(b) if b < 0x80 else f"bytes:\\x{b:02x}")
                self.width.append(0 if 0x80 <= b < 0xC0 else 1)
            elif nbytes[i] == 0:
                self.text.append(piece)
                self.width.append(0)
            else:
                text = piece.replace("\u2581", " ")
                self.text.append(text)
                self.width.append(len(text))

    def completion_logprobs(self, entries: list[TokenLogprob], top_n: int, offset: int = 0) -> dict:
        """The completions API's logprobs object for these tokens, the first at character `offset` of the text."""
        tokens, token_logprobs, top_logprobs, offsets = [], [], [], []
        for e in entries:
            tokens.append(self.text[e.id])
            token_logprobs.append(e.logprob)
            offsets.append(offset)
            offset += self.width[e.id]
            if e.logprob is None:
                top_logprobs.append(None)  # a prompt's first token has no distribution
                continue
            top = {self.text[t]: lp for t, lp in e.top[:top_n]}
            top.setdefault(self.text[e.id], e.logprob)  # the chosen token is always listed (OpenAI's rule)
            top_logprobs.append(top)
        return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top_logprobs, "text_offset": offsets}

    def chat_logprobs(self, entries: list[TokenLogprob], top_n: int) -> dict:
        """The chat API's logprobs object: {"content": [{token, logprob, bytes, top_logprobs}]}."""

        def item(token: int, logprob: float) -> dict:
            text = self.text[token]
            return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

        return {"content": [{**item(e.id, e.logprob), "top_logprobs": [item(t, lp) for t, lp in e.top[:top_n]]}
                            for e in entries]}


class Choice:
    """One choice being generated: its text, finish reason, token count and logprob entries so far."""

    def __init__(self, index: int, prefix: str = "", prompt_logprobs: bool = False):
        self.index, self.text, self.finish_reason, self.tokens = index, prefix, None, 0
        self.entries: list[TokenLogprob] = []
        self.wants_prompt = prompt_logprobs
        self.sent_chars = self.sent_entries = self.sent_offset = 0  # what a stream has sent so far

    def add(self, event: GenerationEvent) -> None:
        self.text += event.text
        if event.prompt_logprobs is not None and self.wants_prompt:
            self.entries = event.prompt_logprobs + self.entries
        self.entries += event.logprobs or []
        self.tokens = event.tokens
        if event.finish_reason is not None:
            self.finish_reason = "stop" if event.finish_reason == "cancelled" else event.finish_reason


def head(kind: str, model: str) -> dict:
    prefix = "cmpl" if kind == "text_completion" else "chatcmpl"
    return {"id": f"{prefix}-{uuid.uuid4().hex}", "object": kind, "created": int(time.time()), "model": model}


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion_choice(choice: Choice, texts: TokenTexts, logprobs: int | None) -> dict:
    lp = None if logprobs is None else texts.completion_logprobs(choice.entries, logprobs)
    return {"index": choice.index, "text": choice.text, "logprobs": lp, "finish_reason": choice.finish_reason}


def completion_chunk_choice(choice: Choice, texts: TokenTexts, logprobs: int | None) -> dict | None:
    """The part of a streamed completion choice not sent yet (None when there is nothing to send)."""
    text, entries = choice.text[choice.sent_chars:], choice.entries[choice.sent_entries:]
    if not text and choice.finish_reason is None and not (logprobs is not None and entries):
        return None
    lp = None
    if logprobs is not None:
        lp = texts.completion_logprobs(entries, logprobs, choice.sent_offset)
        choice.sent_offset += sum(texts.width[e.id] for e in entries)
    choice.sent_chars, choice.sent_entries = len(choice.text), len(choice.entries)
    return {"index": choice.index, "text": text, "logprobs": lp, "finish_reason": choice.finish_reason}


def chat_choice(choice: Choice, texts: TokenTexts, top_logprobs: int | None) -> dict:
    lp = None if top_logprobs is None else texts.chat_logprobs(choice.entries, top_logprobs)
    return {"index": choice.index, "message": {"role": "assistant", "content": choice.text}, "logprobs": lp,
            "finish_reason": choice.finish_reason}


def chat_delta(index: int, texts: TokenTexts, event: GenerationEvent | None, top_logprobs: int | None,
               first: bool = False) -> dict:
    """A chat stream chunk's choice: the role first, then content pieces, then the finish reason."""
    if first:
        return {"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
    lp = None
    if top_logprobs is not None and event.logprobs:
        lp = texts.chat_logprobs(event.logprobs, top_logprobs)
    delta = {"content": event.text} if event.text else {}
    reason = "stop" if event.finish_reason == "cancelled" else event.finish_reason
    return {"index": index, "delta": delta, "logprobs": lp, "finish_reason": reason}
