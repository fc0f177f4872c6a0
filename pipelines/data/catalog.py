"""The DuckDB catalog: tables every data stage writes, keyed by the stage key that wrote them.

documents   one row per ingested document of a snapshot (the ingest key); text is normalized,
            norm_hash is the exact-dedup key (md5 of the lower-cased, whitespace-collapsed text);
            provenance: source, uri, record_no (line / row / chunk number), content_hash (md5 of the
            text), snapshot, and the ingest partition (one input file) it came from
quarantine  records refused at ingest, with the reason, a snippet and the same provenance
ingest_partitions  per snapshot, each partition it holds with its counts; a later snapshot copies the
            rows of a partition it shares (same file, same settings) instead of reading the file again
doc_status  per dedup key: each document kept, or dropped with a reason and what it duplicates
splits      per split key: each kept document's split (train/val)
(dedup_runs and minhash_bands, for incremental dedup, are pipelines.data.incremental's.)
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

SCHEMA = """
CREATE TABLE IF NOT EXISTS documents (
    snapshot VARCHAR, doc_id VARCHAR, source VARCHAR, uri VARCHAR, text VARCHAR,
    n_bytes BIGINT, content_hash VARCHAR, norm_hash VARCHAR);
ALTER TABLE documents ADD COLUMN IF NOT EXISTS norm_hash VARCHAR;
ALTER TABLE documents ADD COLUMN IF NOT EXISTS record_no BIGINT;
ALTER TABLE documents ADD COLUMN IF NOT EXISTS partition_key VARCHAR;
CREATE TABLE IF NOT EXISTS quarantine (
    snapshot VARCHAR, source VARCHAR, uri VARCHAR, reason VARCHAR, snippet VARCHAR);
ALTER TABLE quarantine ADD COLUMN IF NOT EXISTS record_no BIGINT;
ALTER TABLE quarantine ADD COLUMN IF NOT EXISTS partition_key VARCHAR;
CREATE TABLE IF NOT EXISTS ingest_partitions (
    snapshot VARCHAR, partition_key VARCHAR, source VARCHAR, uri VARCHAR,
    n_read BIGINT, n_documents BIGINT, n_quarantined BIGINT, reused BOOLEAN);
CREATE TABLE IF NOT EXISTS doc_status (
    dedup_key VARCHAR, snapshot VARCHAR, doc_id VARCHAR, status VARCHAR, reason VARCHAR, duplicate_of VARCHAR);
CREATE TABLE IF NOT EXISTS splits (
    split_key VARCHAR, snapshot VARCHAR, doc_id VARCHAR, split VARCHAR);
"""


def ensure_schema(con: Any) -> None:
    con.execute(SCHEMA)


def rows(con: Any, sql: str, params: list | None = None) -> list[tuple]:
    """Run a query and fetch everything (DuckDB blocks the connection on an unfinished result)."""
    return con.execute(sql, params or []).fetchall()


def scalar(con: Any, sql: str, params: list | None = None) -> Any:
    result = rows(con, sql, params)
    return result[0][0] if result else None


def split_texts(con: Any, split_key: str, split: str, batch_size: int = 512, order: str = "d.doc_id") -> Iterator[list[tuple[str, str]]]:
    """Batches of (doc_id, text) of one split, streamed so a large split never sits in memory whole."""
    cursor = con.cursor()
    try:
        database = scalar(con, "SELECT current_database()")
        cursor.execute(f'USE "{database}"')  # a cursor starts in the connection's default database, not in con's
        cursor.execute(
            f"""SELECT d.doc_id, d.text FROM splits s
                JOIN documents d ON d.snapshot = s.snapshot AND d.doc_id = s.doc_id
                WHERE s.split_key = ? AND s.split = ? ORDER BY {order}""",
            [split_key, split],
        )
        while batch := cursor.fetchmany(batch_size):
            yield batch
    finally:
        cursor.close()
