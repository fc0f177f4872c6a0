"""Decontamination: drop training documents that share a long word n-gram (13 by default) with any
configured evaluation text, with reason `contaminates:<eval set>`.

Word hashing is the near-dup stage's (DuckDB `hash()` of lower-cased words); n-gram hashes come from
the same vectorized shingling, and membership is one `np.isin` per batch of documents.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from pipelines.config import ConfigError, EvalSetConfig, SourceConfig
from pipelines.neardup import MinHasher, NearDupConfig, read_words
from pipelines.sources import check_source, read_source, source_fingerprint


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


def eval_ngrams(con: Any, es: EvalSetConfig, hasher: MinHasher, downloads: Path) -> np.ndarray:
    """Sorted distinct n-gram hashes of one eval set's texts."""
    texts = [r.text for r in read_source(_source(es), downloads) if r.text]
    if not texts:
        raise ConfigError(f"dedup.decontaminate '{es.name}': no text read from {es.path}")
    con.register("eval_texts", pa.table({"idx": np.arange(len(texts)), "text": texts}))
    try:
        _, words, offsets = read_words(con, "SELECT idx, text FROM eval_texts")
    finally:
        con.unregister("eval_texts")
    grams, _ = hasher.shingles(words, offsets, whole_only=True)
    return np.unique(grams)


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
