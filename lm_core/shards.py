"""Token shards: Arrow IPC files of token ids, an index with checksums, and readers that verify them.

A shard directory holds `<split>_<nnnnn>.arrow` files plus `index.json`. Each file is one record
batch with one column `tokens` (uint16 when the vocab fits, else uint32); documents are laid out as
[bos, ids..., eos]. Readers memory-map the files (zero copy) after checking size and sha256.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc

INDEX_FILE = "index.json"
FORMAT_VERSION = 1


class ShardError(RuntimeError):
    """A shard is missing, corrupted, truncated, or made with another tokenizer."""


@dataclass
class ShardInfo:
    file: str
    split: str
    num_tokens: int
    num_docs: int
    num_bytes: int  # UTF-8 bytes of the documents' text, for bits-per-byte bookkeeping
    sha256: str


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

    def add(self, ids: list[int], num_bytes: int) -> None:
        doc = np.empty(len(ids) + 2, dtype=self.dtype)
        doc[0], doc[-1] = self.bos_id, self.eos_id
        doc[1:-1] = ids
        self._parts.append(doc)
        self._tokens += doc.size
        self._docs += 1
        self._bytes += num_bytes
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
        self.shards.append(ShardInfo(name, self.split, int(tokens.size), self._docs, self._bytes, file_sha256(self.out_dir / name)))
        self._parts, self._tokens, self._docs, self._bytes = [], 0, 0, 0


def write_index(out_dir: Path, shards: list[ShardInfo], tokenizer_sha256: str, vocab_size: int) -> dict:
    index = {
        "format": FORMAT_VERSION,
        "tokenizer_sha256": tokenizer_sha256,
        "vocab_size": vocab_size,
        "dtype": token_dtype(vocab_size).name,
        "shards": [asdict(s) for s in shards],
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
    path = Path(shard_dir) / INDEX_FILE
    if not path.is_file():
        raise ShardError(f"no shard index at {path}; run the shard stage first")
    index = json.loads(path.read_text())
    if tokenizer_sha256 is not None and index["tokenizer_sha256"] != tokenizer_sha256:
        raise ShardError(
            f"shards in {shard_dir} were made with tokenizer {index['tokenizer_sha256'][:12]}, "
            f"not {tokenizer_sha256[:12]}; re-run the shard stage with this tokenizer"
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
        raise ShardError(f"shard {path} is corrupted or truncated: sha256 {actual[:12]} != manifest {sha256[:12]}; re-run the shard stage")
    source = pa.memory_map(str(path), "r")
    column = ipc.open_file(source).get_batch(0).column(0)
    tokens = column.to_numpy(zero_copy_only=True)
    if tokens.size != num_tokens:
        raise ShardError(f"shard {path} holds {tokens.size} tokens, manifest says {num_tokens}; re-run the shard stage")
    return tokens


class RandomWindowBatches:
    """Batches of random (block_size + 1)-token windows; batch `step` depends only on (seed, step).

    That makes resuming exact: start at the step after the last one trained.
    """

    def __init__(self, shards: list[np.ndarray], block_size: int, batch_size: int, seed: int):
        usable = [s for s in shards if s.size >= block_size + 1]
        if not usable:
            raise ShardError(f"no shard holds block_size+1={block_size + 1} tokens; lower model.block_size or add data")
        self.shards, self.block_size, self.batch_size, self.seed = usable, block_size, batch_size, seed
        sizes = np.array([s.size - block_size for s in usable], dtype=np.float64)  # window starts per shard
        self._weights = sizes / sizes.sum()

    def batch(self, step: int) -> np.ndarray:
        """(batch_size, block_size + 1) int64 windows for this step."""
        rng = np.random.default_rng([self.seed, step])
        which = rng.choice(len(self.shards), size=self.batch_size, p=self._weights)
        out = np.empty((self.batch_size, self.block_size + 1), dtype=np.int64)
        for row, shard_idx in enumerate(which):
            shard = self.shards[shard_idx]
            start = int(rng.integers(0, shard.size - self.block_size))  # high is exclusive
            out[row] = shard[start : start + self.block_size + 1]
        return out


def sequential_windows(shards: list[np.ndarray], block_size: int, max_windows: int | None = None) -> Iterator[np.ndarray]:
    """Non-overlapping (block_size + 1)-token windows over the concatenated split, for evaluation.

    Consecutive windows share one token (the last target of one is the first input of the next), so
    every token after the first is predicted exactly once.
    """
    flat = np.concatenate(shards) if len(shards) > 1 else shards[0]
    count = 0
    for start in range(0, flat.size - block_size - 1 + 1, block_size):
        if max_windows is not None and count >= max_windows:
            return
        yield flat[start : start + block_size + 1].astype(np.int64)
        count += 1
