"""Helpers shared by the test modules (pytest puts this directory on sys.path through conftest.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from lm_core.shards import ShardWriter, write_index


def write_counting_shards(out: Path, vocab: int = 64) -> Path:
    """Train/val shards of documents that count upward mod 60 from a random start: learnable
    (next = this + 1), never trivial. bos=1, eos=2, tokenizer hash all zeros, doc ids `<split>-<nnnn>`."""
    rng = np.random.default_rng(0)
    infos = []
    for split, n_docs in (("train", 200), ("val", 20)):
        writer = ShardWriter(out, split, tokens_per_shard=3000, vocab_size=vocab, bos_id=1, eos_id=2)
        for i in range(n_docs):
            start = int(rng.integers(0, 60))
            writer.add([4 + (start + j) % 60 for j in range(40)], num_bytes=40, doc_id=f"{split}-{i:04d}")
        infos += writer.close()
    write_index(out, infos, "0" * 64, vocab)
    return out
