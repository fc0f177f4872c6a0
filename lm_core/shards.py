"""Token shards: Arrow IPC files of token ids, an index with checksums, and readers that verify them.

A shard directory holds `<split>_<nnnnn>.arrow` files plus `index.json`. Each file is one record
batch with one column `tokens` (uint16 when the vocab fits, else uint32); documents are laid out as
[bos, ids..., eos] and never cut between shards. The index records per shard its token and document
counts, the first and last document id it holds, its sha256 and the tokenizer's sha256, plus totals
per split. Readers memory-map the files (zero copy) after checking size and sha256, and refuse shards
made with another tokenizer.

When documents come with ids, each shard also gets `<split>_<nnnnn>.docs.arrow`: (doc_id, start) per
document, start being the offset of its bos token. `ShardDocuments` answers "which documents does this
token span hold" (a training window that spiked names the documents it was drawn from).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc

if TYPE_CHECKING:
    from lm_core.tokenizer import Tokenizer

INDEX_FILE = "index.json"
FORMAT_VERSION = 3  # 2: per-shard doc id range and tokenizer hash; 3: per-shard document table (optional)


class ShardError(RuntimeError):
    """A shard is missing, corrupted, truncated, or made with another tokenizer."""


RERUN = "rerun the shard stage: lmforge run --only shard"


@dataclass
class ShardInfo:
    file: str
    split: str
    num_tokens: int
    num_docs: int
    num_bytes: int  # UTF-8 bytes of the documents' text, for bits-per-byte bookkeeping
    sha256: str
    first_doc_id: str | None = None  # documents arrive in doc_id order, so these bound the shard's ids
    last_doc_id: str | None = None
    docs_file: str | None = None  # (doc_id, start) per document, when the documents had ids
    docs_sha256: str | None = None


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


class ShardWriter:
    """Buffers documents of one split and writes a shard file whenever tokens_per_shard is reached."""

    def __init__(self, out_dir: Path, split: str, tokens_per_shard: int, vocab_size: int, bos_id: int, eos_id: int):
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.split = split
        self.tokens_per_shard = tokens_per_shard
        self.dtype = token_dtype(vocab_size)
        self.bos_id, self.eos_id = bos_id, eos_id
        self.shards: list[ShardInfo] = []
        self._parts: list[np.ndarray] = []
        self._tokens = self._docs = self._bytes = 0
        self._first_doc: str | None = None
        self._last_doc: str | None = None
        self._doc_ids: list[str] = []  # ids of the open shard's documents and their bos offsets in it
        self._doc_starts: list[np.ndarray] = []

    def add(self, ids: Sequence[int] | np.ndarray, num_bytes: int, doc_id: str | None = None) -> None:
        self.add_batch([np.asarray(ids)], [num_bytes], None if doc_id is None else [doc_id])

    def add_batch(self, ids: list[np.ndarray], num_bytes: Sequence[int], doc_ids: Sequence[str] | None = None) -> None:
        """Append documents (token ids without bos/eos) in order; work is per document, not per token."""
        if not ids:
            return
        lengths = np.fromiter((a.size for a in ids), dtype=np.int64, count=len(ids)) + 2
        ends = np.cumsum(lengths)  # end of each [bos, ids..., eos] in the batch
        tokens = np.empty(int(ends[-1]), dtype=self.dtype)
        body = np.ones(tokens.size, dtype=bool)
        body[ends - lengths] = body[ends - 1] = False
        tokens[ends - lengths], tokens[ends - 1] = self.bos_id, self.eos_id
        tokens[body] = np.concatenate(ids)
        done = 0  # documents of this batch already placed
        while done < len(ids):
            # the first document that brings the open shard to tokens_per_shard closes it
            filled = self._tokens + ends[done:] - (ends[done - 1] if done else 0)
            last = done + int(np.searchsorted(filled, self.tokens_per_shard, side="left"))
            last = min(last, len(ids) - 1)
            begin = int(ends[done - 1]) if done else 0
            if doc_ids is not None:  # bos offsets of these documents in the open shard
                self._doc_ids.extend(doc_ids[done : last + 1])
                self._doc_starts.append(ends[done : last + 1] - lengths[done : last + 1] - begin + self._tokens)
            self._parts.append(tokens[begin : int(ends[last])])
            self._tokens += int(ends[last]) - begin
            self._docs += last + 1 - done
            self._bytes += int(sum(num_bytes[done : last + 1]))
            if doc_ids is not None:
                self._first_doc = self._first_doc if self._first_doc is not None else doc_ids[done]
                self._last_doc = doc_ids[last]
            done = last + 1
            if self._tokens >= self.tokens_per_shard:
                self._flush()

    def close(self) -> list[ShardInfo]:
        if self._parts:
            self._flush()
        return self.shards

    def _flush(self) -> None:
        name = f"{self.split}_{len(self.shards):05d}.arrow"
        tokens = np.concatenate(self._parts)
        batch = pa.record_batch([pa.array(tokens)], names=["tokens"])
        tmp = self.out_dir / f".{name}.tmp"
        with pa.OSFile(str(tmp), "wb") as sink, ipc.new_file(sink, batch.schema) as writer:
            writer.write_batch(batch)
        os.replace(tmp, self.out_dir / name)
        info = ShardInfo(name, self.split, int(tokens.size), self._docs, self._bytes, file_sha256(self.out_dir / name),
                         self._first_doc, self._last_doc)
        if self._doc_ids:
            info.docs_file = name.replace(".arrow", ".docs.arrow")
            starts = np.concatenate(self._doc_starts).astype(np.int64)
            docs = pa.record_batch([pa.array(self._doc_ids, pa.string()), pa.array(starts)], names=["doc_id", "start"])
            tmp = self.out_dir / f".{info.docs_file}.tmp"
            with pa.OSFile(str(tmp), "wb") as sink, ipc.new_file(sink, docs.schema) as writer:
                writer.write_batch(docs)
            os.replace(tmp, self.out_dir / info.docs_file)
            info.docs_sha256 = file_sha256(self.out_dir / info.docs_file)
        self.shards.append(info)
        self._parts, self._tokens, self._docs, self._bytes = [], 0, 0, 0
        self._first_doc = self._last_doc = None
        self._doc_ids, self._doc_starts = [], []


def encode_documents(tok: Tokenizer, writer: ShardWriter, batches: Iterable[list[tuple[str, str]]],
                     num_threads: int) -> None:
    """Encode batches of (doc_id, text) into the writer, in order.

    SentencePiece encodes each batch on num_threads threads outside the GIL and hands back one numpy
    array per document, so no Python code runs per token. Batch k+1 is encoding while this thread writes
    batch k and reads the next from `batches` (a DuckDB cursor in the shard stage): the encoder never
    waits for the reads and writes, and its threads' uneven finish at a batch's end overlaps other work.
    """
    from concurrent.futures import ThreadPoolExecutor

    def encode(batch: list[tuple[str, str]]) -> tuple[list[np.ndarray], list[int], list[str]]:
        texts = [text for _, text in batch]
        return tok.encode_arrays(texts, num_threads), [len(t.encode("utf-8")) for t in texts], [d for d, _ in batch]

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="encode") as pool:
        pending = None
        for batch in batches:
            encoding = pool.submit(encode, batch)
            if pending is not None:
                writer.add_batch(*pending.result())
            pending = encoding
        if pending is not None:
            writer.add_batch(*pending.result())


def write_index(out_dir: Path, shards: list[ShardInfo], tokenizer_sha256: str, vocab_size: int) -> dict:
    index = {
        "format": FORMAT_VERSION,
        "tokenizer_sha256": tokenizer_sha256,
        "vocab_size": vocab_size,
        "dtype": token_dtype(vocab_size).name,
        "shards": [{**asdict(s), "tokenizer_sha256": tokenizer_sha256} for s in shards],
        "totals": {
            split: {
                "num_tokens": sum(s.num_tokens for s in shards if s.split == split),
                "num_docs": sum(s.num_docs for s in shards if s.split == split),
                "num_bytes": sum(s.num_bytes for s in shards if s.split == split),
                "num_shards": sum(1 for s in shards if s.split == split),
            }
            for split in sorted({s.split for s in shards})
        },
    }
    tmp = Path(out_dir) / f".{INDEX_FILE}.tmp"
    tmp.write_text(json.dumps(index, indent=2))
    os.replace(tmp, Path(out_dir) / INDEX_FILE)
    return index


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_index(shard_dir: Path, tokenizer_sha256: str | None = None) -> dict:
    """The shard index; with tokenizer_sha256, refuse shards whose ids come from another tokenizer."""
    path = Path(shard_dir) / INDEX_FILE
    if not path.is_file():
        raise ShardError(f"no shard index at {path}; run the shard stage first")
    index = json.loads(path.read_text())
    if index.get("format", 1) > FORMAT_VERSION:
        raise ShardError(f"{path} has shard format {index['format']}, newer than this code reads ({FORMAT_VERSION}); "
                         "upgrade lmforge or rerun the shard stage: lmforge run --only shard")
    if tokenizer_sha256 is not None:
        for made_with, where in [(index["tokenizer_sha256"], str(path)),
                                 *((s.get("tokenizer_sha256", index["tokenizer_sha256"]), s["file"]) for s in index["shards"])]:
            if made_with != tokenizer_sha256:
                raise ShardError(
                    f"shards in {shard_dir} were made with tokenizer {made_with[:12]} ({where}), but this run's "
                    f"tokenizer is {tokenizer_sha256[:12]}: its ids would mean other pieces; rerun the shard stage "
                    "with this tokenizer, or use the tokenizer the shards were made with"
                )
    return index


def open_split(shard_dir: Path, split: str, tokenizer_sha256: str | None = None) -> list[np.ndarray]:
    """Memory-mapped, checksum-verified token arrays of one split, one per shard."""
    index = read_index(shard_dir, tokenizer_sha256)
    arrays = []
    for info in index["shards"]:
        if info["split"] == split:
            arrays.append(open_shard(Path(shard_dir) / info["file"], info["sha256"], info["num_tokens"]))
    if not arrays:
        raise ShardError(f"split '{split}' has no shards in {shard_dir}")
    return arrays


def open_shard(path: Path, sha256: str, num_tokens: int) -> np.ndarray:
    if not path.is_file():
        raise ShardError(f"shard file missing: {path}")
    actual = file_sha256(path)
    if actual != sha256:
        raise ShardError(f"shard {path} is corrupted or truncated: sha256 {actual[:12]} != manifest {sha256[:12]}; {RERUN}")
    source = pa.memory_map(str(path), "r")
    column = ipc.open_file(source).get_batch(0).column(0)
    tokens = column.to_numpy(zero_copy_only=True)
    if tokens.size != num_tokens:
        raise ShardError(f"shard {path} holds {tokens.size} tokens, manifest says {num_tokens}; {RERUN}")
    return tokens


class ShardDocuments:
    """The documents of one split's shards: which document ids a token span of shard k holds."""

    def __init__(self, tables: list[tuple[np.ndarray, np.ndarray]]):
        self.tables = tables  # per shard: (doc ids (n,) object, bos offsets (n,) int64, ascending)

    def doc_ids(self, shard: int, start: int, stop: int) -> list[str]:
        """Ids of the documents overlapping tokens [start, stop) of shard `shard`, in order."""
        ids, starts = self.tables[shard]
        first = max(0, int(np.searchsorted(starts, start, side="right")) - 1)  # the one that holds `start`
        last = int(np.searchsorted(starts, stop, side="left"))
        return [str(d) for d in ids[first:last]]


def open_documents(shard_dir: Path, split: str, tokenizer_sha256: str | None = None) -> ShardDocuments | None:
    """The split's per-shard document tables (checksums verified), or None when the shards have none."""
    index = read_index(shard_dir, tokenizer_sha256)
    tables = []
    for info in index["shards"]:
        if info["split"] != split:
            continue
        if not info.get("docs_file"):
            return None
        path = Path(shard_dir) / info["docs_file"]
        if not path.is_file() or file_sha256(path) != info["docs_sha256"]:
            raise ShardError(f"document table {path} is missing or does not match its index checksum; {RERUN}")
        batch = ipc.open_file(pa.memory_map(str(path), "r")).get_batch(0)
        tables.append((batch.column(0).to_numpy(zero_copy_only=False), batch.column(1).to_numpy()))
    return ShardDocuments(tables)


def evaluation_windows(shards: list[np.ndarray], block_size: int, max_windows: int | None = None,
                       seed: int = 0) -> list[np.ndarray]:
    """Non-overlapping (block_size + 1)-token windows over the concatenated split, for evaluation.

    Consecutive windows share one token (the last target of one is the first input of the next), so every
    token after the first is predicted exactly once. With `max_windows` below their number, a fixed-seed
    sample spread over the whole split, in split order: documents at the end count as much as the first
    ones (a continued run's new documents among them), and the same split always gives the same windows.
    """
    flat = np.concatenate(shards) if len(shards) > 1 else shards[0]
    starts = np.arange(0, max(0, flat.size - block_size), block_size)
    if max_windows is not None and max_windows < len(starts):
        starts = np.sort(np.random.default_rng(seed).choice(starts, size=max_windows, replace=False))
    return [flat[start : start + block_size + 1].astype(np.int64) for start in starts.tolist()]


def document_tokens(shards: list[np.ndarray], documents: ShardDocuments, doc_ids: set[str]) -> list[np.ndarray]:
    """The tokens of the documents `doc_ids` (each from its bos to the next document's), one array per run of
    consecutive such documents in a shard: a sub-split to score on its own."""
    runs = []
    for shard, (ids, starts) in zip(shards, documents.tables):
        ends = np.append(starts[1:], shard.size)
        keep = np.fromiter((str(d) in doc_ids for d in ids), dtype=bool, count=len(ids))
        i = 0
        while i < len(ids):
            if not keep[i]:
                i += 1
                continue
            j = i
            while j + 1 < len(ids) and keep[j + 1]:
                j += 1
            runs.append(shard[starts[i] : ends[j]])
            i = j + 1
    return runs
