"""One ingest partition read and screened into Parquet files, in any process: the work ingest's tasks do.

`stage_partition` reads the records of some files of a source (pipelines.data.sources), normalizes and screens
them (empty, too_short, too_long), and writes docs.parquet (with each document's content and exact-dedup hashes)
and quarantine.parquet, then counts.json, into a directory that appears whole or not at all. It touches no
catalog. Its arguments are light (a SourceConfig, paths, the screening settings): a worker process that runs it
imports pyarrow and this data library only, not pipelines.config and the model code (torch) behind it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from itertools import islice
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipelines.data.documents import Record
from pipelines.data.normalize import NormalizeConfig, exact_key, normalize_text
from pipelines.data.source_config import SourceConfig
from pipelines.data.sources import read_partition

BATCH = 2000
DOC_SCHEMA = pa.schema([("source", pa.string()), ("uri", pa.string()), ("record_no", pa.int64()),
                        ("text", pa.string()), ("content_hash", pa.string()), ("norm_hash", pa.string())])
BAD_SCHEMA = pa.schema([("source", pa.string()), ("uri", pa.string()), ("record_no", pa.int64()),
                        ("reason", pa.string()), ("snippet", pa.string())])
# staged files live only until the catalog has loaded them: no dictionary for text (it would be tried and dropped
# on every page) and no codec (lz4 cost ~0.15 s per 75 MB in the worker, snappy more; the staged bytes are about
# the input's own)
WRITE_OPTIONS = {"compression": "none", "use_dictionary": ["source"]}


def stage_partition(source: SourceConfig, files: tuple[str, ...], downloads: Path, min_chars: int, max_chars: int,
                    normalize: NormalizeConfig, final: Path) -> dict:
    """Read and screen the records of `files` into final/{docs,quarantine}.parquet + counts.json; reuse them
    when already staged. Safe to run in many processes at once: the first to finish wins."""
    if (final / "counts.json").is_file():
        return json.loads((final / "counts.json").read_text())
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".tmp-{final.name}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    counts = {"read": 0, "documents": 0, "quarantined": 0}
    try:
        with pq.ParquetWriter(tmp / "docs.parquet", DOC_SCHEMA, **WRITE_OPTIONS) as docs_out, \
             pq.ParquetWriter(tmp / "quarantine.parquet", BAD_SCHEMA, **WRITE_OPTIONS) as bad_out:
            records = read_partition(source, files, downloads)
            while batch := list(islice(records, BATCH)):
                docs, refused = screen(batch, min_chars, max_chars, normalize)
                docs_out.write_table(doc_table(docs))
                bad_out.write_table(bad_table(refused))
                counts["read"] += len(batch)
                counts["documents"] += len(docs)
                counts["quarantined"] += len(refused)
        (tmp / "counts.json").write_text(json.dumps(counts))
        try:
            os.replace(tmp, final)
        except OSError:  # another worker staged the same partition first: same content, keep theirs
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return counts


def screen(batch: list[Record], min_chars: int, max_chars: int,
           normalize: NormalizeConfig) -> tuple[list[Record], list[Record]]:
    """Normalize each document's text and refuse the empty, too short and too long ones (with a snippet)."""
    docs, refused = [], []
    for r in batch:
        if r.text is not None:
            r.text = normalize_text(r.text, normalize)
            if not r.text or r.text.isspace():
                r.text, r.reason = None, "empty"
            elif len(r.text) < min_chars:
                r.snippet, r.text, r.reason = r.text[:120], None, "too_short"
            elif len(r.text) > max_chars:
                r.snippet, r.text, r.reason = r.text[:120], None, "too_long"
        (docs if r.text is not None else refused).append(r)
    return docs, refused


def doc_table(docs: list[Record]) -> pa.Table:
    """The documents with md5 of their UTF-8 text (content_hash, what DuckDB's md5(text) gives) and their exact
    key (norm_hash), hashed here, in the worker, rather than by the catalog's single writer."""
    encoded = [d.text.encode("utf-8") for d in docs]
    return pa.Table.from_arrays(
        [arrow_strings([d.source for d in docs]), arrow_strings([d.uri for d in docs]),
         arrow_int64s([d.record_no for d in docs]), arrow_strings(encoded),
         arrow_strings([hashlib.md5(raw).hexdigest() for raw in encoded]), arrow_strings([exact_key(d.text) for d in docs])],
        schema=DOC_SCHEMA)


def bad_table(refused: list[Record]) -> pa.Table:
    return pa.Table.from_arrays(
        [arrow_strings([r.source for r in refused]), arrow_strings([r.uri for r in refused]),
         arrow_int64s([r.record_no for r in refused]), arrow_strings([r.reason for r in refused]),
         arrow_strings([r.snippet for r in refused])], schema=BAD_SCHEMA)


# Arrays from their buffers: pa.array() imports pandas on its first call (~0.4 s in every fresh worker process)


def arrow_strings(values: list[str] | list[bytes]) -> pa.Array | pa.ChunkedArray:
    """A string array of str (or of their UTF-8 bytes); chunked past 2 GiB, as pa.array would."""
    data = [v.encode("utf-8") for v in values] if values and isinstance(values[0], str) else values
    offsets = np.zeros(len(data) + 1, np.int64)
    np.cumsum(np.fromiter(map(len, data), np.int64, len(data)), out=offsets[1:])
    if offsets[-1] >= 2**31 and len(data) > 1:
        half = len(data) // 2
        return pa.chunked_array([*_chunks(arrow_strings(data[:half])), *_chunks(arrow_strings(data[half:]))], pa.string())
    return pa.StringArray.from_buffers(len(data), pa.py_buffer(offsets.astype(np.int32)), pa.py_buffer(b"".join(data)))


def _chunks(array: pa.Array | pa.ChunkedArray) -> list[pa.Array]:
    return array.chunks if isinstance(array, pa.ChunkedArray) else [array]


def arrow_int64s(values: list[int] | np.ndarray) -> pa.Array:
    data = (np.ascontiguousarray(values, dtype=np.int64) if isinstance(values, np.ndarray)
            else np.fromiter(values, np.int64, len(values)))
    return pa.Array.from_buffers(pa.int64(), len(data), [None, pa.py_buffer(data)])
