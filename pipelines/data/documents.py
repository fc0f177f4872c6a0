"""Text into documents: a file or a table cell is decoded (binary and invalid UTF-8 refused with a reason) and
cut at blank lines into chunks of about `doc_chars` characters. Files above STREAM_BYTES are cut block by
block, so memory stays bounded by the longest paragraph, whatever the file's size.
"""

from __future__ import annotations

import codecs
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from pipelines.data.source_config import SourceConfig

PARAGRAPH_BREAK = re.compile(r"\n[ \t]*\n")
STREAM_BYTES = 32 << 20  # larger text files are decoded and cut into documents block by block
STREAM_BLOCK = 4 << 20


@dataclass
class Record:
    """One record a source yields: a document's text, or the reason it was refused."""

    source: str
    uri: str
    text: str | None  # None when refused
    reason: str | None = None  # why it was refused
    snippet: str = ""
    record_no: int = 0  # the line (jsonl) or row (parquet/csv) number; for text, the chunk number in the file


def file_documents(src: SourceConfig, path: Path) -> Iterator[Record]:
    """The documents of a text file: whole when small (or one document per file), streamed when large."""
    try:
        if src.doc_chars and path.stat().st_size > STREAM_BYTES:
            yield from streamed_documents(src, path)
            return
        data = path.read_bytes()
    except OSError as exc:
        yield Record(src.label, str(path), None, "unreadable", str(exc)[:200])
        return
    yield from text_documents(src, str(path), data)


def streamed_documents(src: SourceConfig, path: Path) -> Iterator[Record]:
    """What `text_documents` yields for a large file, holding one block and the paragraph it ends in: text up
    to the last paragraph break in hand is cut into chunks, the rest waits for the next block. An invalid
    UTF-8 byte refuses the rest of the file (earlier chunks stay documents); the whole-file path refuses it all."""
    uri, builder, n_chunks, seen_text = str(path), ChunkBuilder(src.doc_chars), 0, False
    decoder, pending, carry, offset = codecs.getincrementaldecoder("utf-8")(), "", "", 0
    with open(path, "rb") as f:
        data = f.read(STREAM_BLOCK)
        if b"\x00" in data[:8192]:
            yield Record(src.label, uri, None, "binary", repr(data[:80]), 0)
            return
        while True:
            final = not data
            try:
                text = carry + decoder.decode(data, final=final)
            except UnicodeDecodeError as exc:
                yield Record(src.label, f"{uri}#{n_chunks}", None, "bad_encoding", f"{exc} (block at byte {offset})"[:200], n_chunks)
                return
            offset += len(data)
            carry = "\r" if not final and text.endswith("\r") else ""  # a \r\n split across blocks
            text = text[:len(text) - len(carry)].replace("\r\n", "\n").replace("\r", "\n")
            pending += text
            seen_text = seen_text or bool(text.strip())
            cut = len(pending) if final else max((m.end() for m in PARAGRAPH_BREAK.finditer(pending)), default=0)
            pieces = PARAGRAPH_BREAK.split(pending[:cut])
            paragraphs = pieces if final else pieces[:-1]  # pieces[-1] is "" (the cut is a break's end)
            pending = pending[cut:]
            for chunk in builder.add_all(paragraphs):
                yield Record(src.label, f"{uri}#{n_chunks}", chunk, record_no=n_chunks)
                n_chunks += 1
            if final:
                break
            data = f.read(STREAM_BLOCK)
    if (chunk := builder.flush()) is not None:
        yield Record(src.label, f"{uri}#{n_chunks}", chunk, record_no=n_chunks)
    elif not seen_text and not n_chunks:
        yield Record(src.label, uri, None, "empty", "", 0)


def text_documents(src: SourceConfig, uri: str, data: bytes, row: int | None = None) -> Iterator[Record]:
    """Decode a file or a table cell (refusing binary and invalid UTF-8) and cut it into documents at
    blank lines. record_no is the table row, else the chunk number within the file."""
    no = row or 0
    if b"\x00" in data[:8192]:
        yield Record(src.label, uri, None, "binary", repr(data[:80]), no)
        return
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        yield Record(src.label, uri, None, "bad_encoding", f"{exc}: {data[max(0, exc.start - 40):exc.start + 40]!r}", no)
        return
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    # blank (not text.strip(), without its copy): accounted for here, whatever doc_chars is: chunking would yield nothing
    if not text or text.isspace():
        yield Record(src.label, uri, None, "empty", "", no)
        return
    if not src.doc_chars:
        yield Record(src.label, uri, text, record_no=no)
        return
    for i, chunk in enumerate(chunks(text, src.doc_chars)):
        yield Record(src.label, f"{uri}#{i}", chunk, record_no=row or i)


def chunks(text: str, target: int) -> Iterator[str]:
    """Consecutive paragraphs of `text` joined until a chunk reaches `target` characters (ChunkBuilder's rule)."""
    builder = ChunkBuilder(target)
    yield from builder.add_all(PARAGRAPH_BREAK.split(text))
    if (last := builder.flush()) is not None:
        yield last


class ChunkBuilder:
    """Joins paragraphs (blank ones skipped) into a chunk until it reaches `target` characters."""

    def __init__(self, target: int):
        self.target, self.parts, self.size = target, [], 0

    def add_all(self, paragraphs: Iterable[str]) -> Iterator[str]:
        """The chunks that adding `paragraphs` in order completes; the rest waits for more, or for flush. One
        loop over locals: it runs once per paragraph of every file ingested."""
        parts, size, target = self.parts, self.size, self.target
        for paragraph in paragraphs:
            if not paragraph or paragraph.isspace():  # blank: not paragraph.strip(), without the copy
                continue
            parts.append(paragraph)
            size += len(paragraph) + 2
            if size >= target:
                yield "\n\n".join(parts)
                parts, size = [], 0
        self.parts, self.size = parts, size

    def flush(self) -> str | None:
        chunk = "\n\n".join(self.parts) if self.parts else None
        self.parts, self.size = [], 0
        return chunk
