"""Near-dup detection as partition-parallel work, with exactly the result of neardup.find_near_duplicates.

  1. export      this process writes the input texts as Parquet partitions of contiguous idx ranges;
  2. signatures  one task per partition, in its own DuckDB: word hashes, shingle sets, MinHash signatures
                 and band hashes, written beside the texts (numpy files, band rows as Parquet sorted by band);
  3. buckets     one task per band range: the band hashes of every partition (and the reference set's band
                 rows) grouped by bucket into candidate pairs (neardup.bucket_pairs); buckets are per band, so
                 the union of the ranges' pairs is the single-process pair set;
  4. verify      one task per chunk of candidate pairs: the signature screen and exact Jaccard
                 (neardup.verify, on the rows the chunk needs, read from the partitions' files);
  5. clusters    this process: connected components, so the smallest idx of a cluster survives.

Every step computes per document or per pair what the single-process path computes, so the kept set and
`duplicate_of` do not depend on how many partitions, band ranges or workers there are. A task receives
paths and small arrays; the partitions' files live under `work`, which a cluster's workers must see at
the same path (a shared workspace).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from pipelines.data import neardup
from pipelines.data.neardup import MinHasher, NearDupConfig, NearDupResult, components, jaccard, numpy_of, read_words, verify
from pipelines.data.task_pool import TaskPool

MAX_ROWS_PER_PARTITION = 100_000  # bounds a signature task's memory: ~(P*4 + shingles*4) bytes per document
MIN_PAIRS_PER_CHUNK = 5_000  # ~0.03 s of verifying: smaller chunks would cost more in task overhead than they save


def _quote(path: Path | str) -> str:
    return str(path).replace("'", "''")


def export_texts(con: Any, sql: str, out: Path, per: int, order: str = "idx") -> list[str]:
    """Write the rows of `sql` (idx, text) as partitions of `per` consecutive idx (or `order`); returns their
    globs in that order."""
    out.parent.mkdir(parents=True, exist_ok=True)
    con.execute(f"""COPY (SELECT *, (row_number() OVER (ORDER BY {order}) - 1) // {int(per)} AS part FROM ({sql}))
                    TO '{_quote(out)}' (FORMAT parquet, PARTITION_BY (part))""")
    parts = sorted((int(d.name.split("=", 1)[1]), d) for d in out.glob("part=*") if d.is_dir())
    return [str(d / "*.parquet") for _, d in parts]


def signature_partition(params: NearDupConfig, texts: str, out: str, batch: int = 8192) -> dict:
    """Task: signatures of one partition. Writes idx, sig, shingle sets (values + offsets) and the band hashes
    of the documents with words (band_idx, bands)."""
    import duckdb

    hasher, out_dir = MinHasher(params), Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    with duckdb.connect() as con:
        con.execute("SET threads = 1")  # one core per task: the pool provides the parallelism
        idx, words, offsets = read_words(con, "SELECT idx, text FROM read_parquet(?)", [texts])
    n = len(idx)
    sig = np.empty((n, params.num_perm), dtype=np.uint32)
    values, counts = [], []
    for lo in range(0, n, batch):  # bounded intermediates: shingles of `batch` documents at a time
        hi = min(n, lo + batch)
        w, o = words[offsets[lo]:offsets[hi]], offsets[lo:hi + 1] - offsets[lo]
        sets = hasher.shingle_sets(w, o)
        sig[lo:hi] = hasher.signatures(w, o, shingled=sets)
        values.append(sets[0])
        counts.append(np.diff(sets[1]))
    set_values = np.concatenate(values) if values else np.zeros(0, np.uint32)
    set_offsets = np.concatenate([[0], np.cumsum(np.concatenate(counts))]).astype(np.int64) if counts else np.zeros(1, np.int64)
    has_words = (sig != np.uint32(0xFFFFFFFF)).any(axis=1)
    band_idx, bands = idx[has_words].astype(np.int64), hasher.band_hashes(sig[has_words])
    for name, array in (("idx", idx.astype(np.int64)), ("sig", sig), ("set_values", set_values),
                        ("set_offsets", set_offsets), ("band_idx", band_idx), ("bands", bands)):
        np.save(out_dir / f"{name}.npy", array)
    return {"dir": str(out_dir), "rows": n}


def bucket_range(max_bucket: int, dirs: list[str], lo: int, hi: int, reference: str | None) -> np.ndarray:
    """Task: candidate pairs of bands lo..hi-1 (and the reference set's rows of those bands), from the band
    hashes the signature tasks wrote."""
    idx = [np.load(Path(d) / "band_idx.npy") for d in dirs]
    bands = [np.load(Path(d) / "bands.npy", mmap_mode="r")[:, lo:hi] for d in dirs]
    rows = None
    if reference:
        import pyarrow.parquet as pq

        t = pq.read_table(reference, columns=["band", "bucket", "idx"], filters=[("band", ">=", lo), ("band", "<", hi)])
        rows = tuple(numpy_of(t.column(k)) for k in ("band", "bucket", "idx"))
    return neardup.bucket_pairs(np.concatenate(idx) if idx else np.zeros(0, np.int64),
                        np.concatenate(bands) if bands else np.zeros((0, hi - lo), np.uint64), max_bucket, rows, lo)


class PartitionFiles:
    """Random access to the signatures and shingle sets the signature tasks wrote (memory-mapped)."""

    def __init__(self, dirs: list[str]):
        self.dirs = [Path(d) for d in dirs]
        self.idx = [np.load(d / "idx.npy") for d in self.dirs]
        self.first = np.array([i[0] for i in self.idx], dtype=np.int64)

    def gather(self, wanted: np.ndarray) -> tuple[np.ndarray, tuple[np.ndarray, np.ndarray]]:
        """Signatures (k, P) and shingle sets (values, (k+1,) offsets) of the sorted idx `wanted`."""
        part = np.searchsorted(self.first, wanted, side="right") - 1
        sigs, values, lengths = [], [], []
        for p in np.unique(part):
            rows = np.searchsorted(self.idx[p], wanted[part == p])
            sigs.append(np.load(self.dirs[p] / "sig.npy", mmap_mode="r")[rows])
            offsets = np.load(self.dirs[p] / "set_offsets.npy", mmap_mode="r")
            starts, ends = np.asarray(offsets[rows]), np.asarray(offsets[rows + 1])
            n = ends - starts
            # the flat positions of each wanted row's values, in row order
            flat = np.repeat(starts - np.concatenate([[0], np.cumsum(n)[:-1]]), n) + np.arange(n.sum())
            values.append(np.load(self.dirs[p] / "set_values.npy", mmap_mode="r")[flat])
            lengths.append(n)
        n_all = np.concatenate(lengths) if lengths else np.zeros(0, np.int64)
        return (np.concatenate(sigs) if sigs else np.zeros((0, 0), np.uint32),
                (np.concatenate(values) if values else np.zeros(0, np.uint32), np.concatenate([[0], np.cumsum(n_all)])))


def verify_chunk(params: NearDupConfig, dirs: list[str], pairs: np.ndarray) -> np.ndarray:
    """Task: the pairs of this chunk that are near duplicates (neardup.verify on the rows they need)."""
    wanted = neardup.sorted_unique(pairs.reshape(-1))
    sig, sets = PartitionFiles(dirs).gather(wanted)
    rows = np.searchsorted(wanted, pairs)
    kept = verify(sig, sets, np.arange(len(wanted)), rows, params.threshold, params.screen_margin)
    return wanted[kept] if len(kept) else np.zeros((0, 2), np.int64)


def find_near_duplicates_partitioned(con: Any, sql: str, n_docs: int, params: NearDupConfig, pool: TaskPool, work: Path,
                                     rows_per_partition: int | None = None, n_reference: int = 0,
                                     reference_bands_sql: str | None = None, reference_text_sql: str | None = None,
                                     with_bands: bool = False) -> NearDupResult:
    """neardup.find_near_duplicates's result, computed by `pool`'s workers; `work` is an empty scratch
    directory the caller removes afterwards. `with_bands`: also return every document's band hashes
    (incremental runs store them)."""
    work.mkdir(parents=True, exist_ok=True)
    n_rows = con.execute(f"SELECT count(*) FROM ({sql})").fetchall()[0][0]
    per = rows_per_partition or min(MAX_ROWS_PER_PARTITION, max(4096, math.ceil(n_rows / (4 * pool.workers))))
    texts = export_texts(con, sql, work / "texts", per) if n_rows else []
    done = pool.map(signature_partition, [(params, t, str(work / f"sig-{i:05d}")) for i, t in enumerate(texts)])
    dirs = [d["dir"] for d in done if d["rows"]]
    reference = None
    if n_reference and reference_bands_sql:
        reference = str(work / "reference_bands.parquet")
        con.execute(f"COPY ({reference_bands_sql}) TO '{_quote(reference)}' (FORMAT parquet)")
    n_ranges = min(params.bands, 2 * pool.workers) if dirs else 0
    edges = np.linspace(0, params.bands, n_ranges + 1).round().astype(int)
    found = pool.map(bucket_range, [(params.max_bucket, dirs, int(lo), int(hi), reference)
                                    for lo, hi in zip(edges[:-1], edges[1:])])
    pairs = neardup.unique_pairs(np.concatenate(found)) if found else np.zeros((0, 2), np.int64)
    is_ref = pairs < n_reference  # (C, 2)
    pairs = pairs[~is_ref.all(axis=1)]  # reference pairs were settled by the earlier run
    is_ref = pairs < n_reference
    new_pairs, mixed = pairs[~is_ref.any(axis=1)], pairs[is_ref.any(axis=1)]
    n_chunks = min(2 * pool.workers, max(1, len(new_pairs) // MIN_PAIRS_PER_CHUNK))
    chunks = [c for c in np.array_split(new_pairs, n_chunks) if len(c)]
    verified = pool.map(verify_chunk, [(params, dirs, c) for c in chunks])
    if len(mixed):  # (reference, new): reference texts come from the caller's DuckDB, as in the single-process path
        hasher = MinHasher(params)
        ref_ids, new_ids = neardup.sorted_unique(mixed[:, 0]), neardup.sorted_unique(mixed[:, 1])
        idx, words, offsets = read_words(con, f"SELECT idx, text FROM ({reference_text_sql}) WHERE idx IN (SELECT unnest(?))",
                                         [ref_ids.tolist()])
        ref_row = np.full(n_reference, -1, dtype=np.int64)
        ref_row[idx] = np.arange(len(idx))
        _, new_sets = PartitionFiles(dirs).gather(new_ids)
        exact = jaccard(hasher.shingle_sets(words, offsets), ref_row[mixed[:, 0]], np.searchsorted(new_ids, mixed[:, 1]), new_sets)
        verified.append(mixed[exact >= params.threshold])
    verified = np.concatenate(verified) if verified else np.zeros((0, 2), np.int64)
    label = components(n_docs, verified)
    members = np.flatnonzero((label != np.arange(n_docs)) & (np.arange(n_docs) >= n_reference))
    band_idx = bands = None
    if with_bands:
        band_idx = np.concatenate([np.load(Path(d) / "band_idx.npy") for d in dirs]) if dirs else np.zeros(0, np.int64)
        bands = np.concatenate([np.load(Path(d) / "bands.npy") for d in dirs]) if dirs else np.zeros((0, params.bands), np.uint64)
    return NearDupResult(members, label[members], len(pairs), len(verified), int(len(neardup.sorted_unique(label[members]))),
                         band_idx, bands)
