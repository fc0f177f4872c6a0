"""MinHash + LSH near-duplicate detection on real text (the standard library's own docs) in DuckDB."""

from __future__ import annotations

import inspect
import json
import random
import re
import shutil
import textwrap

import duckdb
import numpy as np
import pyarrow as pa
import pytest

from pipelines.data.neardup import MinHasher, NearDupConfig, bucket_pairs, components, find_near_duplicates, read_words

DOCS = [inspect.getdoc(f) for f in (json.dumps, json.loads, shutil.copytree, shutil.rmtree, textwrap.wrap,
                                    textwrap.fill, textwrap.dedent, re.sub, re.compile, random.shuffle)]
LONG = inspect.getdoc(json.dumps)  # ~280 words


def words(text: str) -> list[str]:
    return [w for w in re.split(r"[^\w]+", text.lower()) if w]


def true_jaccard(a: str, b: str, n: int = NearDupConfig().ngram) -> float:
    sa = {tuple(words(a)[i:i + n]) for i in range(len(words(a)) - n + 1)}
    sb = {tuple(words(b)[i:i + n]) for i in range(len(words(b)) - n + 1)}
    return len(sa & sb) / len(sa | sb)


def edit(text: str, positions: list[int], new: str = "zebra") -> str:
    tokens = text.split(" ")
    for p in positions:
        tokens[p] = new
    return " ".join(tokens)


def table(texts: list[str]):
    con = duckdb.connect()
    con.register("src", pa.table({"idx": np.arange(len(texts)), "text": texts}))
    con.execute("CREATE TABLE docs AS SELECT * FROM src")
    return con


def find(texts: list[str], **kw):
    con = table(texts)
    return find_near_duplicates(con, "SELECT idx, text FROM docs", len(texts), NearDupConfig(**kw), batch=4)


def test_planted_near_duplicate_and_exact_copy_are_found():
    near = edit(LONG, [40, 120])  # two words replaced
    assert 0.8 <= true_jaccard(LONG, near) < 1
    texts = DOCS + [near, DOCS[6]]
    r = find(texts)
    assert dict(zip(r.dropped.tolist(), r.survivor.tolist())) == {10: 0, 11: 6}
    assert r.clusters == 2 and r.verified == 2


def test_moderate_overlap_is_kept():
    # the first half of json.dumps' doc plus a different text: real overlap, far from a duplicate
    half = " ".join(LONG.split(" ")[: len(LONG.split(" ")) // 2]) + " " + DOCS[2]
    j = true_jaccard(LONG, half)
    assert 0.2 < j < 0.6
    r = find([LONG, half] + DOCS[3:])
    assert len(r.dropped) == 0


def test_threshold_decides_a_borderline_pair():
    near = edit(LONG, list(range(10, 235, 20)))  # 12 of ~235 words replaced, spread out
    j = true_jaccard(LONG, near)
    assert 0.6 < j < 0.8
    assert len(find([LONG, near], threshold=0.8).dropped) == 0
    assert find([LONG, near], threshold=0.6).dropped.tolist() == [1]


def test_survivor_is_the_smallest_idx_and_clusters_are_transitive():
    a = LONG
    b = edit(a, [30])
    c = edit(b, [200])  # c is near b and near a
    r = find([DOCS[2], c, b, a])
    assert sorted(r.dropped.tolist()) == [2, 3] and set(r.survivor.tolist()) == {1}
    assert r.clusters == 1


def test_signature_estimate_tracks_true_jaccard_and_is_deterministic():
    con = table(DOCS + [edit(LONG, [10, 50, 90])])
    _, w, o = read_words(con, "SELECT idx, text FROM docs")
    h = MinHasher(NearDupConfig(num_perm=256, bands=32))
    sig = h.signatures(w, o)
    assert sig.shape == (11, 256) and sig.dtype == np.uint32
    est = (sig[0] == sig[10]).mean()
    assert abs(est - true_jaccard(LONG, edit(LONG, [10, 50, 90]))) < 0.1
    assert (sig[0] == sig[1]).mean() < 0.1  # unrelated docs share almost no minima
    np.testing.assert_array_equal(sig, MinHasher(NearDupConfig(num_perm=256, bands=32)).signatures(w, o))
    values, offsets = h.shingle_sets(w, o)
    sig2 = h.signatures(w, o, shingled=(values, offsets))
    np.testing.assert_array_equal(sig, sig2)
    assert len(values) == offsets[-1] and (np.diff(offsets) > 0).all()


def test_short_and_empty_documents():
    r = find(["one two", "one two", "!!! ???", "", "three four five"], ngram=5)
    assert r.dropped.tolist() == [1] and r.survivor.tolist() == [0]  # short docs are one shingle
    con = table(["", "a b c"])
    _, w, o = read_words(con, "SELECT idx, text FROM docs")
    sig = MinHasher(NearDupConfig()).signatures(w, o)
    assert (sig[0] == np.uint32(0xFFFFFFFF)).all() and not (sig[1] == np.uint32(0xFFFFFFFF)).all()


def test_components_label_is_the_smallest_member():
    pairs = np.array([[5, 6], [1, 5], [7, 8], [2, 9], [8, 9]])
    label = components(10, pairs)
    assert label.tolist() == [0, 1, 2, 3, 4, 1, 1, 2, 2, 2]
    assert components(3, np.zeros((0, 2), np.int64)).tolist() == [0, 1, 2]


def test_bad_parameters_are_refused():
    with pytest.raises(ValueError, match="not divisible"):
        MinHasher(NearDupConfig(num_perm=128, bands=7))
    with pytest.raises(ValueError, match="threshold"):
        MinHasher(NearDupConfig(threshold=1.5))


def test_empty_inputs_and_gaps_in_idx():
    con = table(["", "   ", LONG, "unrelated words only here", LONG])
    r = find_near_duplicates(con, "SELECT idx, text FROM docs WHERE idx > 9", 5, NearDupConfig())
    assert len(r.dropped) == 0 and r.candidates == 0
    # idx 1..3 absent (as when earlier steps dropped them), batches of 2 with an empty one in between
    r = find_near_duplicates(con, "SELECT idx, text FROM docs WHERE idx IN (0, 4)", 5, NearDupConfig(), batch=2)
    assert len(r.dropped) == 0  # "" has no words: it matches nothing
    r = find_near_duplicates(con, "SELECT idx, text FROM docs WHERE idx IN (2, 4)", 5, NearDupConfig(), batch=2)
    assert r.dropped.tolist() == [4] and r.survivor.tolist() == [2]


def test_bucket_pairs_match_the_definition():
    """bucket_pairs against a plain reading of its contract: every pair within a shared bucket of a band, a bucket
    over max_bucket pairing its members with its smallest only, reference rows joining their own band; few
    distinct band values make buckets of every size."""
    rng = np.random.default_rng(3)
    n, k, max_bucket, n_ref = 400, 6, 5, 50
    idx = np.sort(rng.choice(10_000, n, replace=False)) + n_ref
    bands = rng.integers(0, [40, 150, 1, 40, 300, 90], size=(n, k)).astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)
    bands[:, 2] = np.arange(n)  # a band where nothing is shared
    ref_bands = rng.integers(0, 60, size=(n_ref, k + 2)).astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)
    ref = (np.tile(np.arange(k + 2, dtype=np.int16), n_ref), ref_bands.reshape(-1), np.repeat(np.arange(n_ref), k + 2))
    for reference, first_band in ((None, 0), (ref, 0), (ref, 2)):
        expected = set()
        for j in range(k):
            buckets: dict[int, list[int]] = {}
            for b, i in zip(bands[:, j].tolist(), idx.tolist()):
                buckets.setdefault(b, []).append(i)
            if reference is not None:
                for i in range(n_ref):
                    buckets.setdefault(int(ref_bands[i, first_band + j]), []).append(i)
            for members in buckets.values():
                m = sorted(members)
                if len(m) <= max_bucket:
                    expected |= {(a, c) for x, a in enumerate(m) for c in m[x + 1:]}
                else:
                    expected |= {(m[0], c) for c in m[1:]}
        got = bucket_pairs(idx, bands, max_bucket, reference, first_band)
        assert [tuple(p) for p in got.tolist()] == sorted(expected)
    assert bucket_pairs(idx[:0], bands[:0], max_bucket).shape == (0, 2)
