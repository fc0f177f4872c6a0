"""Word n-gram contamination, one implementation for both directions: the dedup stage drops training
documents that share a long word n-gram (13 by default) with a configured evaluation text (reason
`contaminates:<eval set>`), and the evaluate stage reports which task examples share one with the
training text (`overlapping`).

Word hashing is the near-dup stage's (DuckDB `hash()` of lower-cased words); n-gram hashes come from
the same vectorized shingling, and membership is one `np.isin` per batch of documents.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from pipelines.config import ConfigError, EvalSetConfig, SourceConfig
from pipelines.data.neardup import MinHasher, NearDupConfig, read_words
from pipelines.data.sources import check_source, read_source, source_fingerprint


def _source(es: EvalSetConfig) -> SourceConfig:
    return SourceConfig(kind=es.kind, name=es.name, path=es.path, glob=es.glob, text_field=es.text_field, doc_chars=0)


def fingerprint(sets: list[EvalSetConfig]) -> list:
    """What the dedup key must change with: the eval files, with sizes and mtimes."""
    return [source_fingerprint(_source(es)) for es in sets]


def preflight(sets: list[EvalSetConfig]) -> None:
    names = [es.name for es in sets]
    if len(set(names)) != len(names):
        raise ConfigError(f"dedup.decontaminate names repeat ({names}); give each eval set a distinct name")
    for es in sets:
        check_source(_source(es))


def text_ngrams(con: Any, texts: list[str], hasher: MinHasher) -> tuple[np.ndarray, np.ndarray]:
    """(n-gram hashes, index into `texts` of each) as the dedup stage hashes documents; a text shorter than
    n words has none."""
    con.register("ngram_texts", pa.table({"idx": np.arange(len(texts)), "text": texts}))
    try:
        idx, words, offsets = read_words(con, "SELECT idx, text FROM ngram_texts")
    finally:
        con.unregister("ngram_texts")
    grams, owner = hasher.shingles(words, offsets, whole_only=True)
    return grams, idx[owner]


def eval_ngrams(con: Any, es: EvalSetConfig, hasher: MinHasher, downloads: Path) -> np.ndarray:
    """Sorted distinct n-gram hashes of one eval set's texts."""
    texts = [r.text for r in read_source(_source(es), downloads) if r.text]
    if not texts:
        raise ConfigError(f"dedup.decontaminate '{es.name}': no text read from {es.path}")
    return np.unique(text_ngrams(con, texts, hasher)[0])


def reference_ngrams(chunks: Iterable[str], ngram: int) -> np.ndarray:
    """Sorted distinct n-gram hashes of a large text given in chunks (e.g. the training split, decoded)."""
    import duckdb

    hasher = MinHasher(NearDupConfig(ngram=ngram, num_perm=1, bands=1))
    found = [np.zeros(0, dtype=np.uint64)]
    with duckdb.connect() as con:
        for chunk in chunks:
            found.append(np.unique(text_ngrams(con, [chunk], hasher)[0]))
    return np.unique(np.concatenate(found))


def overlapping(texts: list[str], reference: np.ndarray, ngram: int) -> tuple[np.ndarray, np.ndarray]:
    """(checkable, overlapping), one bool per text: whether it has an n-gram at all (n words or more), and
    whether one of its n-grams is in `reference` (reference_ngrams)."""
    import duckdb

    hasher = MinHasher(NearDupConfig(ngram=ngram, num_perm=1, bands=1))
    with duckdb.connect() as con:
        grams, owner = text_ngrams(con, texts, hasher)
    checkable, hit = np.zeros(len(texts), dtype=bool), np.zeros(len(texts), dtype=bool)
    checkable[owner] = True
    hit[owner[np.isin(grams, reference)]] = True
    return checkable, hit


def contaminated(con: Any, sql: str, n_docs: int, sets: list[EvalSetConfig], ngram: int, downloads: Path,
                 batch: int = 8192) -> dict[int, str]:
    """idx -> eval set name for each row of `sql` (idx 0..n_docs-1, text) sharing an n-gram with an eval
    set; the first set in config order names the reason."""
    hasher = MinHasher(NearDupConfig(ngram=ngram, num_perm=1, bands=1))
    grams = [(es.name, eval_ngrams(con, es, hasher, downloads)) for es in sets]
    hits: dict[int, str] = {}
    for lo in range(0, n_docs, batch):
        idx, words, offsets = read_words(con, f"SELECT idx, text FROM ({sql}) WHERE idx >= ? AND idx < ?", [lo, lo + batch])
        x, owner = hasher.shingles(words, offsets, whole_only=True)
        for name, eval_set in grams:
            for i in np.unique(owner[np.isin(x, eval_set)]).tolist():
                hits.setdefault(int(idx[i]), name)
    return hits
