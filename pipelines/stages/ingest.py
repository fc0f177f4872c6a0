"""Stage 1, ingest: read every configured source into the DuckDB catalog as one snapshot.

The work is split into partitions: one per input file (a built-in corpus, a remote table or a source
cut by max_docs is one partition). A partition's key hashes its source's config, the screening
settings, the file's uri, size and mtime, and this code's version. `ingest_partition` reads one
partition into Parquet files under `artifacts/ingest/.partitions/<key>/` and never touches the catalog,
so partitions can run anywhere at once (the Prefect flow fans them out on a Dask cluster); `run` then
loads them into DuckDB in one process, the catalog's only writer. A partition that an earlier snapshot
already holds is copied from that snapshot in SQL, not read again: a new file in a workspace costs
reading that file only.

Every record read ends up as a document row or a quarantine row with its reason:
`read == documents + quarantined` is checked before the stage is marked complete.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from lm_core.typed_config import to_dict
from pipelines.config import ConfigError, NormalizeConfig, PipelineConfig, SourceConfig
from pipelines.data import catalog, decontam
from pipelines.data.normalize import exact_key, normalize_text
from pipelines.data.sources import Record, check_source, read_partition, source_partitions
from pipelines.workspace import StageResult, Workspace, run_stage, stage_key

STAGE, VERSION = "ingest", "3"
BATCH = 2000
DOC_SCHEMA = pa.schema([("source", pa.string()), ("uri", pa.string()), ("record_no", pa.int64()),
                        ("text", pa.string()), ("norm_hash", pa.string())])
BAD_SCHEMA = pa.schema([("source", pa.string()), ("uri", pa.string()), ("record_no", pa.int64()),
                        ("reason", pa.string()), ("snippet", pa.string())])
COLUMNS = "snapshot, doc_id, source, uri, text, n_bytes, content_hash, norm_hash, record_no, partition_key"
BAD_COLUMNS = "snapshot, source, uri, reason, snippet, record_no, partition_key"


@dataclass(frozen=True)
class Partition:
    """One unit of ingest work: a file of a source (uri ""  = the whole source)."""
    source: SourceConfig
    uri: str
    key: str

    @property
    def name(self) -> str:
        return f"{self.source.label}:{Path(self.uri).name or self.source.kind}"


def partitions(cfg: PipelineConfig) -> list[Partition]:
    """Every partition of the configured sources, in source order then file order."""
    ing = cfg.ingest
    screen = {"min_chars": ing.min_chars, "max_chars": ing.max_chars, "normalize": to_dict(ing.normalize)}
    out = []
    for src in ing.sources:
        for uri, fingerprint in source_partitions(src):
            payload = {"version": VERSION, "source": to_dict(src), "screen": screen, "uri": uri, "fingerprint": fingerprint}
            digest = hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]
            out.append(Partition(src, uri, digest))
    return out


def key(cfg: PipelineConfig) -> str:
    return stage_key(STAGE, VERSION, cfg.ingest, extra=[p.key for p in partitions(cfg)])


def preflight(cfg: PipelineConfig) -> None:
    """Before any work: every source and every eval set of dedup.decontaminate can be read."""
    for src in cfg.ingest.sources:
        check_source(src)
    decontam.preflight(cfg.dedup.decontaminate)


def staged_dir(ws: Workspace, partition: Partition) -> Path:
    return ws.artifacts / STAGE / ".partitions" / partition.key


def pending_partitions(cfg: PipelineConfig, ws: Workspace, force: bool = False) -> list[Partition]:
    """The partitions no earlier snapshot holds: the ones a new snapshot has to read."""
    parts = partitions(cfg)
    if force or not parts:
        return parts
    with ws.duckdb() as con:
        catalog.ensure_schema(con)
        held = {k for (k,) in catalog.rows(con, "SELECT DISTINCT partition_key FROM ingest_partitions")}
    return [p for p in parts if p.key not in held]


def ingest_partition(cfg: PipelineConfig, ws: Workspace, partition: Partition) -> dict:
    """Read and screen one partition into docs.parquet + quarantine.parquet (+ counts.json); reuse them
    when already staged. Touches no catalog: safe to run in many processes at once."""
    final = staged_dir(ws, partition)
    if (final / "counts.json").is_file():
        return json.loads((final / "counts.json").read_text())
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".tmp-{partition.key}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    counts = {"read": 0, "documents": 0, "quarantined": 0}
    try:
        with pq.ParquetWriter(tmp / "docs.parquet", DOC_SCHEMA) as docs_out, \
             pq.ParquetWriter(tmp / "quarantine.parquet", BAD_SCHEMA) as bad_out:
            records = read_partition(partition.source, partition.uri, ws.downloads)
            while batch := list(islice(records, BATCH)):
                docs, refused = _screen(batch, cfg.ingest.min_chars, cfg.ingest.max_chars, cfg.ingest.normalize)
                docs_out.write_table(_doc_table(docs))
                bad_out.write_table(_bad_table(refused))
                counts["read"] += len(batch)
                counts["documents"] += len(docs)
                counts["quarantined"] += len(refused)
        (tmp / "counts.json").write_text(json.dumps(counts))
        try:
            os.replace(tmp, final)
        except OSError:  # another worker staged the same partition first: same content, keep theirs
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return counts


def run(cfg: PipelineConfig, ws: Workspace, force: bool = False) -> StageResult:
    snapshot = key(cfg)
    parts = partitions(cfg)

    def build(out: Path) -> dict:
        loaded: list[Path] = []
        with ws.duckdb() as con:
            catalog.ensure_schema(con)
            con.begin()
            for table in ("documents", "quarantine", "ingest_partitions"):
                con.execute(f"DELETE FROM {table} WHERE snapshot = ?", [snapshot])
            copied = set() if force else _copy(con, snapshot, [p.key for p in parts])
            for p in parts:
                if p.key not in copied:
                    counts = ingest_partition(cfg, ws, p)
                    _load(con, snapshot, p, staged_dir(ws, p), counts)
                    loaded.append(staged_dir(ws, p))
            report = _totals(con, snapshot)
            if report["documents"] == 0:
                con.rollback()
                raise ConfigError(f"the corpus is empty: no source produced a document "
                                  f"({report['quarantine_reasons'] or 'no records'}); check ingest.sources")
            if report.pop("broken"):
                con.rollback()
                raise RuntimeError(f"ingest accounting broke: {report}")
            listing = catalog.rows(con, """SELECT source, uri, partition_key, n_read, n_documents, n_quarantined, reused
                                           FROM ingest_partitions WHERE snapshot = ? ORDER BY source, uri""", [snapshot])
            con.commit()
        for staged in loaded:  # the catalog holds the rows now
            shutil.rmtree(staged, ignore_errors=True)
        fields = ("source", "uri", "partition_key", "read", "documents", "quarantined", "reused")
        (out / "partitions.json").write_text(json.dumps([dict(zip(fields, row)) for row in listing], indent=2))
        report = {"snapshot": snapshot, **report}
        (out / "report.json").write_text(json.dumps(report, indent=2))
        return report

    return run_stage(ws, STAGE, snapshot, build, force)


def _copy(con, snapshot: str, keys: list[str]) -> set[str]:
    """Copy the rows of every partition an earlier snapshot holds under this snapshot, set-wise (no file
    is read); returns the keys copied."""
    con.register("wanted_partitions", pa.table({"partition_key": pa.array(keys, pa.string())}))
    con.execute("""CREATE OR REPLACE TEMP TABLE ingest_reuse AS
                   SELECT partition_key, min(snapshot) AS earlier FROM ingest_partitions
                   WHERE snapshot <> ? AND partition_key IN (SELECT partition_key FROM wanted_partitions) GROUP BY ALL""",
                [snapshot])
    con.unregister("wanted_partitions")
    same = "JOIN ingest_reuse r ON t.snapshot = r.earlier AND t.partition_key = r.partition_key"
    con.execute(f"""INSERT INTO documents ({COLUMNS})
                    SELECT ?, t.doc_id, t.source, t.uri, t.text, t.n_bytes, t.content_hash, t.norm_hash, t.record_no,
                           t.partition_key FROM documents t {same}""", [snapshot])
    con.execute(f"""INSERT INTO quarantine ({BAD_COLUMNS})
                    SELECT ?, t.source, t.uri, t.reason, t.snippet, t.record_no, t.partition_key FROM quarantine t {same}""",
                [snapshot])
    con.execute(f"""INSERT INTO ingest_partitions
                    SELECT ?, t.partition_key, t.source, t.uri, t.n_read, t.n_documents, t.n_quarantined, true
                    FROM ingest_partitions t {same}""", [snapshot])
    return {k for (k,) in catalog.rows(con, "SELECT partition_key FROM ingest_reuse")}


def _load(con, snapshot: str, p: Partition, staged: Path, counts: dict) -> None:
    con.execute(
        f"""INSERT INTO documents ({COLUMNS})
            SELECT ?, substr(md5(source || '|' || uri), 1, 16), source, uri, text, strlen(text), md5(text), norm_hash,
                   record_no, ? FROM read_parquet(?)""", [snapshot, p.key, str(staged / "docs.parquet")])
    con.execute(f"INSERT INTO quarantine ({BAD_COLUMNS}) SELECT ?, source, uri, reason, snippet, record_no, ? "
                "FROM read_parquet(?)", [snapshot, p.key, str(staged / "quarantine.parquet")])
    con.execute("INSERT INTO ingest_partitions VALUES (?, ?, ?, ?, ?, ?, ?, false)",
                [snapshot, p.key, p.source.label, p.uri, counts["read"], counts["documents"], counts["quarantined"]])


def _totals(con, snapshot: str) -> dict:
    """The snapshot's counts, from the rows themselves and from the partitions' own counts (must agree)."""
    (n_parts, n_reused, read, want_docs, want_bad), = catalog.rows(
        con, """SELECT count(*), count(*) FILTER (WHERE reused), coalesce(sum(n_read), 0),
                       coalesce(sum(n_documents), 0), coalesce(sum(n_quarantined), 0)
                FROM ingest_partitions WHERE snapshot = ?""", [snapshot])
    documents, n_bytes = catalog.rows(con, "SELECT count(*), coalesce(sum(n_bytes), 0) FROM documents WHERE snapshot = ?",
                                      [snapshot])[0]
    reasons = dict(catalog.rows(con, "SELECT reason, count(*) FROM quarantine WHERE snapshot = ? GROUP BY ALL ORDER BY 1",
                                [snapshot]))
    quarantined = sum(reasons.values())
    broken = (documents, quarantined) != (want_docs, want_bad) or read != documents + quarantined
    return {"read": int(read), "documents": int(documents), "quarantined": int(quarantined), "bytes": int(n_bytes),
            "quarantine_reasons": reasons, "partitions": int(n_parts), "partitions_read": int(n_parts - n_reused),
            "partitions_reused": int(n_reused), "broken": broken}


def _screen(batch: list[Record], min_chars: int, max_chars: int,
            normalize: NormalizeConfig) -> tuple[list[Record], list[Record]]:
    docs, refused = [], []
    for r in batch:
        if r.text is not None:
            r.text = normalize_text(r.text, normalize)
            if not r.text.strip():
                r.text, r.reason = None, "empty"
            elif len(r.text) < min_chars:
                r.snippet, r.text, r.reason = r.text[:120], None, "too_short"
            elif len(r.text) > max_chars:
                r.snippet, r.text, r.reason = r.text[:120], None, "too_long"
        (docs if r.text is not None else refused).append(r)
    return docs, refused


def _doc_table(docs: list[Record]) -> pa.Table:
    return pa.table({"source": [d.source for d in docs], "uri": [d.uri for d in docs],
                     "record_no": [d.record_no for d in docs], "text": [d.text for d in docs],
                     "norm_hash": [exact_key(d.text) for d in docs]}, schema=DOC_SCHEMA)


def _bad_table(refused: list[Record]) -> pa.Table:
    return pa.table({"source": [r.source for r in refused], "uri": [r.uri for r in refused],
                     "record_no": [r.record_no for r in refused], "reason": [r.reason for r in refused],
                     "snippet": [r.snippet for r in refused]}, schema=BAD_SCHEMA)
