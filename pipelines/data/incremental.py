"""Incremental dedup (`dedup.incremental: true`): a new snapshot is deduplicated against what the latest
earlier dedup run with the same dedup config kept, without reprocessing the old documents.

  * A document of the new snapshot with the same doc_id and content as in that run's snapshot inherits
    its verdict (kept, quality/contamination drop, or duplicate of a kept document that is still here).
  * The inherited kept documents are the reference set: new documents are checked against them by
    exact key and by their stored MinHash band hashes (`minhash_bands`), so old documents are neither
    re-scored nor re-hashed; an old text is read only to verify a candidate pair.
  * Each run records itself in `dedup_runs` and stores the band hashes of what it kept, for the next.

The base run is looked up when a snapshot is first deduplicated; rerunning the same snapshot with the
same config reuses that output (the stage key does not change with later runs).
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import numpy as np

from lm_core.typed_config import to_dict
from pipelines.config import DedupConfig
from pipelines.data import catalog
from pipelines.data.neardup import band_table

SCHEMA = """
CREATE TABLE IF NOT EXISTS dedup_runs (
    dedup_key VARCHAR, snapshot VARCHAR, config_hash VARCHAR, base_key VARCHAR, created_at TIMESTAMP);
CREATE TABLE IF NOT EXISTS minhash_bands (dedup_key VARCHAR, doc_id VARCHAR, band SMALLINT, bucket UBIGINT);
"""


def config_hash(cfg: DedupConfig) -> str:
    return hashlib.sha256(json.dumps(to_dict(cfg), sort_keys=True, default=str).encode()).hexdigest()[:16]


def base_run(con: Any, cfg: DedupConfig, snapshot: str) -> tuple[str, str] | None:
    """(dedup_key, snapshot) of the latest earlier run with this config on another snapshot, if any."""
    con.execute(SCHEMA)
    found = catalog.rows(con, """SELECT dedup_key, snapshot FROM dedup_runs WHERE config_hash = ? AND snapshot <> ?
                                 ORDER BY created_at DESC LIMIT 1""", [config_hash(cfg), snapshot])
    return found[0] if found else None


def inherit(con: Any, snapshot: str, base: tuple[str, str] | None) -> None:
    """dedup_inherit: (doc_id, status, reason, duplicate_of) of the documents whose verdict carries over."""
    con.execute("CREATE OR REPLACE TEMP TABLE dedup_inherit (doc_id VARCHAR, status VARCHAR, reason VARCHAR, duplicate_of VARCHAR)")
    if base is None:
        return
    base_key, base_snapshot = base
    con.execute(
        """INSERT INTO dedup_inherit
           SELECT d.doc_id, b.status, b.reason, b.duplicate_of FROM documents d
           JOIN documents o ON o.snapshot = ? AND o.doc_id = d.doc_id AND o.content_hash = d.content_hash
           JOIN doc_status b ON b.dedup_key = ? AND b.doc_id = d.doc_id
           WHERE d.snapshot = ?""", [base_snapshot, base_key, snapshot])
    # a duplicate whose original is gone (or changed) is judged again, with the new documents
    con.execute("""DELETE FROM dedup_inherit WHERE duplicate_of IS NOT NULL
                   AND duplicate_of NOT IN (SELECT doc_id FROM dedup_inherit WHERE status = 'kept')""")


def record(con: Any, cfg: DedupConfig, dedup_key: str, snapshot: str, base: tuple[str, str] | None,
           band_idx: np.ndarray | None, bands: np.ndarray | None) -> None:
    """Remember this run, and the band hashes of every document it kept (inherited ones copied over)."""
    con.execute(SCHEMA)
    con.execute("DELETE FROM dedup_runs WHERE dedup_key = ?", [dedup_key])
    con.execute("DELETE FROM minhash_bands WHERE dedup_key = ?", [dedup_key])
    con.execute("INSERT INTO dedup_runs VALUES (?, ?, ?, ?, now())",
                [dedup_key, snapshot, config_hash(cfg), base[0] if base else None])
    if base is not None:
        con.execute("""INSERT INTO minhash_bands SELECT ?, m.doc_id, m.band, m.bucket FROM minhash_bands m
                       WHERE m.dedup_key = ? AND m.doc_id IN (SELECT doc_id FROM dedup_work WHERE is_ref)""",
                    [dedup_key, base[0]])
    if band_idx is not None and len(band_idx):
        con.register("new_bands", band_table(band_idx, bands))
        con.execute("""INSERT INTO minhash_bands SELECT ?, w.doc_id, b.band, b.bucket FROM new_bands b
                       JOIN dedup_work w USING (idx)
                       JOIN doc_status s ON s.dedup_key = ? AND s.doc_id = w.doc_id AND s.status = 'kept'""",
                    [dedup_key, dedup_key])
        con.unregister("new_bands")
