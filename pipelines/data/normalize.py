"""Text normalization at ingest: Unicode NFC, control characters removed, configurable whitespace.

What is stored in `documents.text` (and hashed into `content_hash`) is the normalized text. The key for
exact dedup (`exact_key`, stored as `documents.norm_hash`) is a further, lossy form: lower-cased with
every whitespace run collapsed, so copies that differ only in case or spacing count as the same
document. It is computed here, in Python's C string methods, at ingest: ~10x faster than DuckDB's
regexp_replace over the same text.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from dataclasses import dataclass
from typing import Literal

# C0/C1 controls, DEL, and the zero-width/bidi format characters that hide in scraped text;
# \t and \n stay (line structure matters to verse and to source code). \r is gone by now.
_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u200b-\u200f\u202a-\u202e\u2060-\u2064\ufeff]")
_TRAILING = re.compile(r"[ \t]+$", re.MULTILINE)
_BLANK_RUNS = re.compile(r"\n{3,}")
_ANY_SPACE = re.compile(r"\s+")
_ASCII_CONTROL = bytes([*range(0x00, 0x09), *range(0x0b, 0x20), 0x7f])  # what _CONTROL matches in ASCII text
_ASCII_ONLY_STR_SPACE = (b"\x1c", b"\x1d", b"\x1e", b"\x1f")  # whitespace to str.split(), not to bytes.split()


@dataclass
class NormalizeConfig:
    nfc: bool = True  # Unicode NFC
    strip_control: bool = True  # drop control characters other than \t and \n
    whitespace: Literal["keep", "trim_lines", "collapse"] = "keep"  # trim_lines: no trailing spaces, <= 1 blank line


def normalize_text(text: str, cfg: NormalizeConfig) -> str:
    if cfg.nfc and not text.isascii():  # ASCII is already NFC; skipping it keeps ingest fast
        text = unicodedata.normalize("NFC", text)
    if cfg.strip_control:
        if text.isascii():  # the same deletion as _CONTROL's, ~10x faster on bytes
            raw = text.encode("ascii")
            kept = raw.translate(None, _ASCII_CONTROL)
            text = text if len(kept) == len(raw) else kept.decode("ascii")
        else:
            text = _CONTROL.sub("", text)
    if cfg.whitespace == "trim_lines":
        text = _BLANK_RUNS.sub("\n\n", _TRAILING.sub("", text)).strip("\n")
    elif cfg.whitespace == "collapse":
        text = _ANY_SPACE.sub(" ", text).strip()
    return text


def exact_key(text: str) -> str:
    """md5 of the lower-cased text with whitespace runs collapsed (the exact-dedup key)."""
    if text.isascii():  # bytes split the same way (~2x faster) unless \x1c-\x1f occur, which only str.split() splits on
        raw = text.lower().encode("ascii")
        if not any(sep in raw for sep in _ASCII_ONLY_STR_SPACE):
            return hashlib.md5(b" ".join(raw.split())).hexdigest()
    return hashlib.md5(" ".join(text.lower().split()).encode("utf-8")).hexdigest()
