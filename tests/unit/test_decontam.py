"""The one word n-gram contamination check: the evaluate stage's overlap report hashes words exactly as the
dedup stage's decontamination does (DuckDB word hashes, the near-dup shingling)."""

from __future__ import annotations

import duckdb
import numpy as np

from pipelines.data import decontam
from pipelines.data.neardup import MinHasher, NearDupConfig


def test_examples_seen_in_training_are_flagged():
    reference = decontam.reference_ngrams(["the quick brown fox jumps over the lazy dog", "every single day"], 4)
    checkable, hit = decontam.overlapping(["Did the QUICK brown fox, really?",  # case and punctuation: same words
                                           "Completely unrelated words here", "too short"], reference, 4)
    assert checkable.tolist() == [True, True, False] and hit.tolist() == [True, False, False]


def test_chunks_do_not_join_across_their_boundary():
    reference = decontam.reference_ngrams(["alpha beta", "gamma delta"], 3)
    assert decontam.overlapping(["alpha beta gamma"], reference, 3)[1].tolist() == [False]


def test_the_same_hashes_as_the_dedup_stage():
    hasher = MinHasher(NearDupConfig(ngram=3, num_perm=1, bands=1))
    text = "one two three four five"
    with duckdb.connect() as con:
        grams, owner = decontam.text_ngrams(con, [text, "x"], hasher)
    assert np.array_equal(np.unique(grams), decontam.reference_ngrams([text], 3)) and set(owner.tolist()) == {0}
