"""Token ids in, text pieces out: incremental detokenization that never splits a UTF-8 character, and
stop strings that are cut off before they are ever shown.

With byte fallback one character can span several tokens (an emoji is four `<0xNN>` pieces), and
decoding a prefix of them yields U+FFFD. So the stream decodes a short window of recent ids and only
releases text once it no longer ends in U+FFFD (the scheme Hugging Face's TextStreamer and vLLM use:
decoding from one token back keeps whatever context the decoder needs, e.g. a leading space).
Text that could be the beginning of a stop string is held back until it is clearly not one.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

REPLACEMENT = "\ufffd"


class TextStream:
    """Feed ids with `push(id) -> new text`; `finish() -> the rest`. After a stop string appears,
    `stopped` is True, the text before it has been returned and every later push returns ""."""

    def __init__(self, decode: Callable[[list[int]], str], stop: Sequence[str] = ()):
        if any(not isinstance(s, str) or s == "" for s in stop):
            raise ValueError(f"stop={list(stop)!r}: stop strings must be non-empty strings")
        self._decode = decode
        self._stop = tuple(stop)
        self._ids: list[int] = []
        self._prefix = 0  # ids[prefix:read] were already released; decoding starts at prefix for context
        self._read = 0
        self._held = ""  # decoded text that may be the start of a stop string
        self.text = ""  # everything released so far
        self.stopped = False

    def push(self, token_id: int) -> str:
        if self.stopped:
            return ""
        self._ids.append(token_id)
        before = self._decode(self._ids[self._prefix:self._read])
        now = self._decode(self._ids[self._prefix:])
        if len(now) <= len(before) or now.endswith(REPLACEMENT):
            return ""  # an incomplete character (or nothing visible yet): wait for more bytes
        self._prefix, self._read = self._read, len(self._ids)
        return self._release(now[len(before):], final=False)

    def finish(self) -> str:
        """The text still held back (an incomplete character comes out as U+FFFD) when generation ends."""
        if self.stopped:
            return ""
        before = self._decode(self._ids[self._prefix:self._read])
        now = self._decode(self._ids[self._prefix:])
        self._prefix = self._read = len(self._ids)
        return self._release(now[len(before):], final=True)

    def _release(self, new: str, final: bool) -> str:
        pending = self._held + new
        if self._stop:
            hits = [i for i in (pending.find(s) for s in self._stop) if i >= 0]
            if hits:
                self.stopped = True
                self._held = ""
                return self._emit(pending[:min(hits)])
        keep = 0 if final else self._partial_stop(pending)
        self._held = pending[len(pending) - keep:] if keep else ""
        return self._emit(pending[:len(pending) - keep])

    def _partial_stop(self, text: str) -> int:
        """Length of the longest suffix of text that is a proper prefix of some stop string."""
        best = 0
        for s in self._stop:
            for n in range(min(len(s) - 1, len(text)), best, -1):
                if text.endswith(s[:n]):
                    best = n
                    break
        return best

    def _emit(self, piece: str) -> str:
        self.text += piece
        return piece
