"""Near-duplicate detection: MinHash signatures over word n-gram shingles, LSH banding in numpy.

The work splits between the two engines by what each does well:

  DuckDB   lower-case and split each text into words and hash every word (`hash()`, vectorized);
  numpy    word hashes -> shingle hashes -> (P, S) permuted hashes -> per-document minimum, in
           whole-batch array ops (no Python loop per document or shingle); band hashes -> candidate pairs
           (one sort per band; pairs only within shared buckets); candidate verification; connected
           components by label propagation.

Documents are identified by a dense `idx` (0..N-1) whose order is the survivor priority: in each
cluster of near duplicates the member with the smallest idx survives and every other member names it.

Incremental runs pass a reference set: documents an earlier run kept, given by their stored band hashes
(idx 0..n_reference-1, so they win every cluster they join). They are matched but never dropped, and
their text is read only for the few candidate pairs that need verifying.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from lm_core.typed_config import ConfigError

MAX_HASH = np.uint64(0xFFFFFFFF)
SIG_BLOCK = 1 << 16  # shingles per block of the permutation loop (x 8 bytes = 512 KB: sized for L2)
_WORDS_SQL = r"""list_transform(regexp_extract_all(lower({col}), '[\pL\pN_]+'), lambda w: hash(w))"""


@dataclass(frozen=True)
class NearDupConfig:
    """The `dedup.near` section of the pipeline config."""

    num_perm: int = 128
    bands: int = 32  # rows per band = num_perm / bands; 32 x 4 makes a J=0.8 pair a candidate with p > 0.999
    threshold: float = 0.8  # Jaccard of word n-gram shingles that makes a pair near duplicates
    # 3, not 5: Jaccard of shingle sets falls by ~2n shingles per edited word, so on short documents wide shingles
    # make a single edit look like a different text. A 30-word paragraph with one word replaced keeps J ~0.81 with
    # 3-word shingles but ~0.68 with 5 (bench dedup: recall of near copies with 0.5-2 % of words edited 0.99 vs 0.72 at
    # threshold 0.8, no hard negative merged either way; the extra drops it finds in real text are near copies too)
    ngram: int = 3
    seed: int = 1
    max_bucket: int = 64  # a bucket with more members pairs each with its first member only
    screen_margin: float = 0.15  # candidates estimated below threshold - margin skip the exact check

    @property
    def rows(self) -> int:
        return self.num_perm // self.bands

    def validate(self) -> None:
        if self.bands < 1 or self.num_perm % self.bands:
            raise ConfigError(f"dedup.near.num_perm={self.num_perm} is not divisible by dedup.near.bands={self.bands}; "
                              "set bands to a divisor of num_perm (rows per band = num_perm / bands)")
        if not 0 < self.threshold <= 1:
            raise ConfigError(f"dedup.near.threshold={self.threshold} must be in (0, 1]")
        if self.ngram < 1:
            raise ConfigError(f"dedup.near.ngram={self.ngram} must be >= 1")


class MinHasher:
    """Signatures for batches of documents given as DuckDB rows (idx, text)."""

    def __init__(self, params: NearDupConfig):
        params.validate()
        self.params = params
        rng = np.random.default_rng(params.seed)
        # multiply-shift hashing: h_p(x) = (a_p * x + b_p) mod 2^64 >> 32 for a 32-bit x, a_p odd
        self.a = rng.integers(1, 2**63, size=params.num_perm, dtype=np.uint64) | np.uint64(1)
        self.b = rng.integers(0, 2**63, size=params.num_perm, dtype=np.uint64)
        self.gram_mult = rng.integers(1, 2**63, size=params.ngram, dtype=np.uint64) | np.uint64(1)
        self.band_mult = rng.integers(1, 2**63, size=params.rows, dtype=np.uint64) | np.uint64(1)
        self.band_salt = rng.integers(0, 2**63, size=params.bands, dtype=np.uint64)

    def shingles(self, words: np.ndarray, offsets: np.ndarray, whole_only: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """Word hashes of a batch (flat, with per-document offsets) -> (32-bit shingle hashes, owner doc).

        A shingle is n consecutive words; a document shorter than n words is one shingle of all its words
        (none with `whole_only`).
        """
        n = self.params.ngram
        total = len(words)
        lengths = np.diff(offsets)
        owner = np.repeat(np.arange(len(lengths)), lengths)  # (W,) document of each word position
        end = offsets[1:][owner]  # (W,) where that document's words stop
        start_of = offsets[:-1][owner]
        padded = np.concatenate([words, np.zeros(n, dtype=np.uint64)])
        pos = np.arange(total)
        acc = np.zeros(total, dtype=np.uint64)
        for k in range(n):  # n is small (the shingle width); each step is a whole-batch op
            term = padded[k:k + total] * self.gram_mult[k]
            acc += np.where(pos + k < end, term, np.uint64(0))
        valid = pos + n <= end
        if not whole_only:
            valid |= (pos == start_of) & (end - start_of < n)
        acc = acc[valid]
        folded = (acc ^ (acc >> np.uint64(32))) & MAX_HASH
        return folded, owner[valid]

    def shingle_sets(self, words: np.ndarray, offsets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Each document's distinct shingle hashes, sorted: (flat uint32 values, (N+1,) offsets)."""
        x, owner = self.shingles(words, offsets)
        both = (owner.astype(np.uint64) << np.uint64(32)) | x
        both.sort()  # by (document, hash); a plain sort beats np.unique's hash table here
        both = both[np.concatenate([[True], both[1:] != both[:-1]])] if len(both) else both
        doc = (both >> np.uint64(32)).astype(np.int64)
        counts = np.bincount(doc, minlength=len(offsets) - 1)
        return (both & MAX_HASH).astype(np.uint32), np.concatenate([[0], np.cumsum(counts)])

    def signatures(self, words: np.ndarray, offsets: np.ndarray,
                   shingled: tuple[np.ndarray, np.ndarray] | None = None) -> np.ndarray:
        """(N, P) uint32 MinHash signatures; a document without words gets all-max (it matches nothing).
        `shingled`: the documents' shingle_sets, when already computed."""
        n_docs, p = len(offsets) - 1, self.params.num_perm
        sig = np.full((n_docs, p), np.uint32(0xFFFFFFFF), dtype=np.uint32)
        if shingled is None:
            x, owner = self.shingles(words, offsets)
            counts = np.bincount(owner, minlength=n_docs)  # owner is sorted: shingles come in document order
        else:
            x, set_offsets = shingled
            counts = np.diff(set_offsets)
        x = x.astype(np.uint64, copy=False)
        has = np.flatnonzero(counts)
        starts = (np.cumsum(counts) - counts)[has]  # (N',) where each document with shingles starts in x
        # one permutation at a time into one preallocated buffer of a block of documents: no temporaries, and a
        # block of <= SIG_BLOCK shingles stays in L2 through the 3 passes of each permutation
        # (~1.6x faster than whole 8192-document batches, same values)
        h = np.empty(min(len(x), SIG_BLOCK), dtype=np.uint64)
        mins = np.empty((p, len(has)), dtype=np.uint64)  # (P, N')
        ends = np.append(starts[1:], len(x))
        d0 = 0
        while d0 < len(has):
            # documents d0..d1-1: as many as fit in the block (at least one, which may be larger than it)
            d1 = max(d0 + 1, int(np.searchsorted(ends, starts[d0] + SIG_BLOCK, side="right")))
            lo, hi = starts[d0], ends[d1 - 1]
            xb, hb, sb = x[lo:hi], (h if hi - lo <= len(h) else np.empty(hi - lo, np.uint64))[:hi - lo], starts[d0:d1] - lo
            for k in range(p):
                np.multiply(xb, self.a[k], out=hb)
                hb += self.b[k]
                np.minimum.reduceat(hb, sb, out=mins[k, d0:d1])
            d0 = d1
        # the minimum of the 64-bit values has the minimum top half, so shift after reducing
        sig[has] = (mins >> np.uint64(32)).T
        return sig

    def band_hashes(self, sig: np.ndarray) -> np.ndarray:
        """(N, bands) uint64: one hash per band of `rows` signature values. A per-band salt makes the
        band part of the hash, so buckets of different bands never meet (SQL groups by bucket alone)."""
        n, b, r = len(sig), self.params.bands, self.params.rows
        view = sig.reshape(n, b, r)
        h = np.broadcast_to(self.band_salt, (n, b)).copy()
        for j in range(r):  # r is small (rows per band); wraps mod 2^64
            h += view[:, :, j].astype(np.uint64) * self.band_mult[j]
        return h ^ (h >> np.uint64(29))


def read_words(con: Any, sql: str, params: list | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Run `sql` (columns idx, text; ordered by idx) and return (idx, flat word hashes, offsets)."""
    table = con.sql(f"SELECT idx, {_WORDS_SQL.format(col='text')} AS h FROM ({sql}) ORDER BY idx",
                    params=params or []).to_arrow_table()
    idx = numpy_of(table.column("idx"))
    if len(idx) == 0:
        return idx, np.zeros(0, np.uint64), np.zeros(1, np.int64)
    lists = table.column("h").combine_chunks()
    words = numpy_of(lists.values).astype(np.uint64, copy=False)
    offsets = numpy_of(lists.offsets).astype(np.int64)
    if offsets[0]:
        words, offsets = words[offsets[0]:offsets[-1]], offsets - offsets[0]
    return idx, words, offsets


_NUMPY_TYPES = {"int16": np.int16, "int32": np.int32, "int64": np.int64, "uint64": np.uint64}


def numpy_of(array: Any) -> np.ndarray:
    """An Arrow integer array (or column) without nulls as numpy, read from its data buffer. pyarrow's own
    to_numpy imports pandas on its first call: ~0.3 s in every fresh worker process (each near-dup task's)."""
    if hasattr(array, "combine_chunks"):
        array = array.combine_chunks()
    if array.null_count:
        raise ValueError(f"numpy_of: {array.null_count} nulls in a {array.type} array")
    dtype = np.dtype(_NUMPY_TYPES[str(array.type)])
    return np.frombuffer(array.buffers()[1], dtype=dtype, count=len(array), offset=array.offset * dtype.itemsize)


def band_table(idx: np.ndarray, bands: np.ndarray):
    """Long form of (N, bands) band hashes: one row (band, bucket, idx) per document and band."""
    import pyarrow as pa

    n, b = bands.shape
    return pa.table({"band": np.tile(np.arange(b, dtype=np.int16), n), "bucket": bands.reshape(-1),
                     "idx": np.repeat(idx.astype(np.int64), b)})


def candidate_pairs(con: Any, idx: np.ndarray, bands: np.ndarray, max_bucket: int,
                    reference_sql: str | None = None) -> np.ndarray:
    """(C, 2) int64 pairs (a < b) sharing a bucket in some band. `reference_sql` (idx, band, bucket) adds
    stored band rows of reference documents."""
    reference = None
    if reference_sql:
        got = con.execute(f"SELECT band, bucket, idx FROM ({reference_sql})").fetchnumpy()
        reference = tuple(np.asarray(got[k]) for k in ("band", "bucket", "idx"))
    return bucket_pairs(idx, bands, max_bucket, reference)


def bucket_pairs(idx: np.ndarray, bands: np.ndarray, max_bucket: int,
                 reference: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None, first_band: int = 0) -> np.ndarray:
    """(C, 2) int64 distinct pairs (a < b), sorted, of documents sharing a bucket in some band; a bucket with more
    than `max_bucket` members pairs each member with its first (smallest idx) only.

    `bands` (N, k): the band hashes of documents `idx` for bands first_band..first_band+k-1; `reference`
    (band, bucket, idx) adds stored rows (those of other bands are ignored). One sort per band (N values) finds
    the shared buckets; pairs are made only within them, then deduplicated across bands as one uint64 key.
    """
    idx = np.asarray(idx, dtype=np.int64)
    if reference is not None:
        ref_band, ref_bucket, ref_idx = (np.asarray(a) for a in reference)
        order = np.argsort(ref_band, kind="stable")
        ref_band, ref_bucket, ref_idx = ref_band[order], ref_bucket[order], ref_idx[order].astype(np.int64)
    keys = []
    for j in range(bands.shape[1]):
        bucket, members = np.ascontiguousarray(bands[:, j]), idx
        if reference is not None:
            lo, hi = np.searchsorted(ref_band, [first_band + j, first_band + j + 1])
            bucket, members = np.concatenate([bucket, ref_bucket[lo:hi]]), np.concatenate([idx, ref_idx[lo:hi]])
        keys.append(_band_pair_keys(bucket.astype(np.uint64, copy=False), members, max_bucket))
    return _pairs_of_keys(sorted_unique(np.concatenate(keys)) if keys else np.zeros(0, np.uint64))


def unique_pairs(pairs: np.ndarray) -> np.ndarray:
    """The distinct rows of (C, 2) pairs of idx < 2^32, sorted (np.unique(axis=0), on one uint64 key per pair)."""
    pairs = np.asarray(pairs, dtype=np.int64).reshape(-1, 2)
    return _pairs_of_keys(sorted_unique((pairs[:, 0].astype(np.uint64) << np.uint64(32)) | pairs[:, 1].astype(np.uint64)))


def sorted_unique(values: np.ndarray) -> np.ndarray:
    """np.unique(values) for a 1-D integer array, by a sort: numpy 2's hash-table np.unique took ~90x as long as
    the sort on 15M pair keys."""
    values = np.sort(values)
    return values[np.concatenate([[True], values[1:] != values[:-1]])] if len(values) else values


def _pairs_of_keys(keys: np.ndarray) -> np.ndarray:
    return np.stack([(keys >> np.uint64(32)).astype(np.int64), (keys & MAX_HASH).astype(np.int64)], axis=1)


def _band_pair_keys(bucket: np.ndarray, members: np.ndarray, max_bucket: int) -> np.ndarray:
    """Pairs (a < b) within each shared bucket of one band, as keys a << 32 | b (idx < 2^32)."""
    order = np.argsort(bucket)
    sorted_bucket = bucket[order]
    same = sorted_bucket[1:] == sorted_bucket[:-1]
    shared = np.zeros(len(bucket), dtype=bool)  # rows in a bucket with more than one member
    shared[1:] |= same
    shared[:-1] |= same
    if not shared.any():
        return np.zeros(0, np.uint64)
    b, m = sorted_bucket[shared], members[order[shared]]
    start = np.flatnonzero(np.concatenate([[True], b[1:] != b[:-1]]))
    size = np.diff(np.append(start, len(b)))
    # members ascending within each bucket: one sort of (bucket number << 32 | member)
    m = np.sort((np.repeat(np.arange(len(start), dtype=np.uint64), size) << np.uint64(32)) | m.astype(np.uint64))
    m = (m & MAX_HASH).astype(np.int64)
    out = []
    for s in np.flatnonzero(np.bincount(size)).tolist():
        rows = m[start[size == s][:, None] + np.arange(s)]  # (G, s) buckets of s members, ascending
        if s <= max_bucket:
            i, j = np.triu_indices(s, 1)
            a, c = rows[:, i], rows[:, j]
        else:
            a, c = np.repeat(rows[:, :1], s - 1, axis=1), rows[:, 1:]
        a, c = a.ravel(), c.ravel()
        keep = a != c  # a document listed twice in a bucket (a repeated reference row) is no pair
        out.append((a[keep].astype(np.uint64) << np.uint64(32)) | c[keep].astype(np.uint64))
    return np.concatenate(out)


def estimate(sig: np.ndarray, row_of: np.ndarray, pairs: np.ndarray, chunk: int = 1 << 16) -> np.ndarray:
    """Estimated Jaccard of each pair: the fraction of equal signature values."""
    est = np.zeros(len(pairs), dtype=np.float32)
    for i in range(0, len(pairs), chunk):
        a, b = row_of[pairs[i:i + chunk, 0]], row_of[pairs[i:i + chunk, 1]]
        est[i:i + chunk] = (sig[a] == sig[b]).mean(axis=1)
    return est


def jaccard(sets_a: tuple[np.ndarray, np.ndarray], ra: np.ndarray, rb: np.ndarray,
            sets_b: tuple[np.ndarray, np.ndarray] | None = None) -> np.ndarray:
    """True Jaccard of shingle sets for row pairs (row ra[i] of sets_a, row rb[i] of sets_b, default
    sets_a). One small numpy op per pair: this runs on the few candidates that survive the signature
    estimate, never on all documents."""
    (va, oa), (vb, ob) = sets_a, sets_b or sets_a
    out = np.zeros(len(ra), dtype=np.float32)
    for i, (a, b) in enumerate(zip(ra.tolist(), rb.tolist())):
        sa, sb = va[oa[a]:oa[a + 1]], vb[ob[b]:ob[b + 1]]
        inter = np.intersect1d(sa, sb, assume_unique=True).size
        out[i] = inter / max(1, len(sa) + len(sb) - inter)
    return out


def verify(sig: np.ndarray, sets: tuple[np.ndarray, np.ndarray], row_of: np.ndarray, pairs: np.ndarray,
           threshold: float, margin: float) -> np.ndarray:
    """The candidate pairs whose true shingle Jaccard reaches the threshold. The MinHash estimate (std
    ~sqrt(J(1-J)/P), 0.035 at J=0.8, P=128) only screens: pairs estimated below threshold - margin go."""
    pairs = pairs[estimate(sig, row_of, pairs) >= threshold - margin]
    exact = jaccard(sets, row_of[pairs[:, 0]], row_of[pairs[:, 1]])
    return pairs[exact >= threshold]


def components(n: int, pairs: np.ndarray) -> np.ndarray:
    """Label of each node 0..n-1 = the smallest node in its connected component (label propagation
    with pointer jumping; every step is an array op over all edges)."""
    label = np.arange(n, dtype=np.int64)
    if len(pairs) == 0:
        return label
    a, b = pairs[:, 0], pairs[:, 1]
    while True:
        m = np.minimum(label[a], label[b])
        new = label.copy()
        np.minimum.at(new, a, m)
        np.minimum.at(new, b, m)
        new = new[new]  # jump: follow labels to their own labels
        while not np.array_equal(new, new[new]):
            new = new[new]
        if np.array_equal(new, label):
            return label
        label = new


@dataclass
class NearDupResult:
    dropped: np.ndarray  # idx of each dropped document
    survivor: np.ndarray  # idx of the document it duplicates (its cluster's smallest idx)
    candidates: int
    verified: int
    clusters: int
    band_idx: np.ndarray | None = None  # the documents with words, and their (N, bands) band hashes
    bands: np.ndarray | None = None


def find_near_duplicates(con: Any, sql: str, n_docs: int, params: NearDupConfig, batch: int = 8192,
                         n_reference: int = 0, reference_bands_sql: str | None = None,
                         reference_text_sql: str | None = None) -> NearDupResult:
    """Near duplicates among the rows of `sql` (columns idx 0..n_docs-1, text).

    Signatures are computed per batch of `batch` documents; all band hashes then go to DuckDB at once.
    Reference documents (idx < n_reference) come as stored band rows (`reference_bands_sql`: idx, band,
    bucket) and, for verification, texts (`reference_text_sql`: idx, text); they are never dropped.
    """
    hasher = MinHasher(params)
    sig = np.empty((n_docs, params.num_perm), dtype=np.uint32)
    row_of = np.full(n_docs, -1, dtype=np.int64)
    set_values, set_counts = [], []
    filled = 0
    for lo in range(0, n_docs, batch):
        idx, words, offsets = read_words(con, f"SELECT idx, text FROM ({sql}) WHERE idx >= ? AND idx < ?", [lo, lo + batch])
        shingled = hasher.shingle_sets(words, offsets)
        sig[filled:filled + len(idx)] = hasher.signatures(words, offsets, shingled=shingled)
        set_values.append(shingled[0])
        set_counts.append(np.diff(shingled[1]))
        row_of[idx] = np.arange(filled, filled + len(idx))
        filled += len(idx)
    sets = (np.concatenate(set_values) if set_values else np.zeros(0, np.uint32),
            np.concatenate([[0], np.cumsum(np.concatenate(set_counts))]) if set_counts else np.zeros(1, np.int64))
    sig, present = sig[:filled], np.flatnonzero(row_of >= 0)
    has_words = (sig != np.uint32(0xFFFFFFFF)).any(axis=1)
    order = row_of[present]
    keep_rows = has_words[order]
    band_idx = present[keep_rows]
    bands = hasher.band_hashes(sig[order[keep_rows]])
    pairs = candidate_pairs(con, band_idx, bands, params.max_bucket, reference_bands_sql if n_reference else None)
    is_ref = pairs < n_reference  # (C, 2)
    pairs = pairs[~is_ref.all(axis=1)]  # reference pairs were settled by the earlier run
    is_ref = pairs < n_reference
    new_pairs = pairs[~is_ref.any(axis=1)]
    verified = [verify(sig, sets, row_of, new_pairs, params.threshold, params.screen_margin)]
    mixed = pairs[is_ref.any(axis=1)]  # (reference, new): a < b since references have the smaller idx
    if len(mixed):
        ref_ids = sorted_unique(mixed[:, 0])
        idx, words, offsets = read_words(con, f"SELECT idx, text FROM ({reference_text_sql}) WHERE idx IN (SELECT unnest(?))",
                                         [ref_ids.tolist()])
        ref_row = np.full(n_reference, -1, dtype=np.int64)
        ref_row[idx] = np.arange(len(idx))
        exact = jaccard(hasher.shingle_sets(words, offsets), ref_row[mixed[:, 0]], row_of[mixed[:, 1]], sets)
        verified.append(mixed[exact >= params.threshold])
    verified = np.concatenate(verified)
    label = components(n_docs, verified)
    members = np.flatnonzero((label != np.arange(n_docs)) & (np.arange(n_docs) >= n_reference))
    return NearDupResult(members, label[members], len(pairs), len(verified),
                         int(len(sorted_unique(label[members]))), band_idx, bands)
