"""Stage 2, dedup: quality rules, exact dedup on normalized text, then near-dup dedup (MinHash + LSH).

Each document of the snapshot gets one doc_status row: kept, or dropped with the first reason that
applies, in this order:
  quality:<rule>    a quality rule failed (pipelines.data.quality); duplicate_of is NULL
  contaminates:<s>  shares a long word n-gram with eval set <s> (pipelines.data.decontam)
  exact_duplicate   same text after lower-casing and collapsing whitespace as an earlier document
  near_duplicate    in a cluster of near duplicates: LSH candidates whose word n-gram shingle sets have
                    Jaccard >= dedup.near.threshold (pipelines.data.neardup)
For duplicates, duplicate_of names the kept document of its cluster. Within a cluster the earliest
document in source order survives (the config's order of sources, then file, then line/row/chunk number,
numerically), so the choice is stable and the original wins over later copies. With `dedup.incremental`, documents an earlier run
already judged keep their verdict, and what it kept is matched but never dropped (pipelines.data.incremental).
`read == kept + sum(dropped by reason)` is checked before the stage is marked complete. The run's data
report (pipelines.data.data_report) is written beside its output.
"""

from __future__ import annotations

import json
import shutil
import time
import uuid
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from pipelines.config import PipelineConfig
from pipelines.data import catalog, data_report, decontam, incremental
from pipelines.data.neardup import find_near_duplicates
from pipelines.data.neardup_partitioned import MAX_ROWS_PER_PARTITION, export_texts, find_near_duplicates_partitioned
from pipelines.data.quality import STATS_SQL, reason_sql
from pipelines.data.staging import arrow_int64s
from pipelines.data.task_pool import TaskPool, query_partition, task_pool
from pipelines.workspace import StageResult, Workspace, run_stage, stage_key

STAGE, VERSION = "dedup", "3"  # 3: the earliest copy in source order is kept (numeric line/row/chunk)


def key(cfg: PipelineConfig, ingest: StageResult) -> str:
    return stage_key(STAGE, VERSION, cfg.dedup, [ingest], extra=decontam.fingerprint(cfg.dedup.decontaminate) or None)


def run(cfg: PipelineConfig, ws: Workspace, ingest: StageResult, force: bool = False) -> StageResult:
    dedup_key, snapshot = key(cfg, ingest), ingest.key

    def build(out: Path) -> dict:
        timings: dict[str, float] = {}
        work = ws.artifacts / STAGE / ".work" / f"{dedup_key}-{uuid.uuid4().hex[:8]}"  # the pool's scratch files
        try:
            return _build(out, timings, work)
        finally:
            shutil.rmtree(work, ignore_errors=True)

    def _build(out: Path, timings: dict[str, float], work: Path) -> dict:
        with ws.duckdb() as con, (task_pool(cfg.flow) if partitioned(cfg) else nullcontext()) as pool:
            if pool is not None:  # local workers start (and import the near-dup code) during the quality SQL
                pool.warm("pipelines.data.neardup_partitioned")
            catalog.ensure_schema(con)
            if cfg.flow.data_workers:
                con.execute(f"SET threads = {int(cfg.flow.data_workers)}")
            con.begin()
            con.execute("DELETE FROM doc_status WHERE dedup_key = ?", [dedup_key])
            t = time.perf_counter()
            base = incremental.base_run(con, cfg.dedup, snapshot) if cfg.dedup.incremental else None
            incremental.inherit(con, snapshot, base)
            _screen(con, snapshot, cfg, pool, work / "quality")
            timings["quality_s"] = time.perf_counter() - t
            t = time.perf_counter()
            contaminated = _decontaminate(con, snapshot, cfg, ws) if cfg.dedup.decontaminate else 0
            timings["decontam_s"] = time.perf_counter() - t
            t = time.perf_counter()
            _exact(con)
            timings["exact_s"] = time.perf_counter() - t
            t = time.perf_counter()
            near, result = _near(con, snapshot, cfg, base, pool, work / "near") if cfg.dedup.method == "near" else ({}, None)
            timings["near_s"] = time.perf_counter() - t
            if pool is not None:  # the workers are idle from here on: they load the plot's imports (see data_report)
                pool.warm("pipelines.data.data_report", "matplotlib.figure")
            _write_status(con, dedup_key, snapshot)
            if cfg.dedup.incremental:
                incremental.record(con, cfg.dedup, dedup_key, snapshot, base,
                                   result and result.band_idx, result and result.bands)
                near.update(incremental_base=base and base[0],
                            inherited=catalog.scalar(con, "SELECT count(*) FROM dedup_inherit"))
            read = catalog.scalar(con, "SELECT count(*) FROM documents WHERE snapshot = ?", [snapshot])
            by_reason = dict(catalog.rows(
                con, "SELECT coalesce(reason, 'kept'), count(*) FROM doc_status WHERE dedup_key = ? GROUP BY ALL ORDER BY 1",
                [dedup_key]))
            kept = by_reason.pop("kept", 0)
            if read != kept + sum(by_reason.values()):
                con.rollback()
                raise RuntimeError(f"dedup accounting broke: read={read} kept={kept} dropped={by_reason}")
            kept_bytes = catalog.scalar(
                con, """SELECT sum(d.n_bytes) FROM doc_status s JOIN documents d USING (snapshot, doc_id)
                        WHERE s.dedup_key = ? AND s.status = 'kept'""", [dedup_key])
            exact_clusters = catalog.scalar(con, "SELECT count(DISTINCT first) FROM dedup_exact WHERE rank > 1")
            con.commit()
            data_report.write_stage_report(con, snapshot, dedup_key, out, pool)  # JSON, Markdown and a PNG plot
        report = {"snapshot": snapshot, "read": read, "kept": kept, "dropped": sum(by_reason.values()),
                  "dropped_by_reason": by_reason, "kept_bytes": int(kept_bytes or 0),
                  "exact_clusters": int(exact_clusters), "contaminated": contaminated, **near,
                  "near_ngram": cfg.dedup.near.ngram,  # `lmforge data report` shows similarity at this run's width
                  **{k: round(v, 3) for k, v in timings.items()}}
        (out / "report.json").write_text(json.dumps(report, indent=2))
        return report

    return run_stage(ws, STAGE, dedup_key, build, force)


def _screen(con: Any, snapshot: str, cfg: PipelineConfig, pool: TaskPool | None, work: Path) -> None:
    """dedup_work: each document to judge with its priority idx (source order), quality verdict and exact
    key; inherited kept documents come first as references (is_ref), not scored again. On a Dask cluster the
    quality statistics (per document) are computed by its tasks, on exported partitions; on one machine this
    process's DuckDB computes them on flow.data_workers threads (measured at 100k documents and 2 workers:
    1.35 s, against 1.9 s for exporting them to two worker processes)."""
    judged = "FROM documents WHERE snapshot = ? AND doc_id NOT IN (SELECT doc_id FROM dedup_inherit)"
    quality, stats = reason_sql(cfg.dedup.quality), f", {STATS_SQL}"
    if pool is not None and pool.distributed:
        con.execute(f"CREATE OR REPLACE TEMP TABLE dedup_quality_input AS SELECT doc_id, text {judged}", [snapshot])
        n_rows = catalog.scalar(con, "SELECT count(*) FROM dedup_quality_input")
        per = min(MAX_ROWS_PER_PARTITION, max(4096, -(-n_rows // (4 * pool.workers))))
        parts = export_texts(con, "SELECT doc_id, text FROM dedup_quality_input", work, per, order="doc_id") if n_rows else []
        # the same SQL as below, per partition in the workers' own DuckDBs: the same verdicts
        sql = f"SELECT doc_id, {quality} AS quality FROM (SELECT doc_id{stats} FROM read_parquet(?))"
        tables = pool.map(query_partition, [(sql, t) for t in parts])
        con.execute("DROP TABLE dedup_quality_input")
        con.register("quality_rows", pa.concat_tables(tables) if tables else
                     pa.table({"doc_id": pa.array([], pa.string()), "quality": pa.array([], pa.string())}))
        con.execute("CREATE OR REPLACE TEMP TABLE dedup_quality AS SELECT doc_id, quality FROM quality_rows")
        con.unregister("quality_rows")
        judged = judged.replace("FROM documents", "FROM documents JOIN dedup_quality USING (doc_id)")
        quality, stats = "quality", ", quality"
    con.execute(
        f"""CREATE OR REPLACE TEMP TABLE dedup_work AS
            SELECT row_number() OVER (ORDER BY is_ref DESC, {SOURCE_ORDER_SQL.format(sources=_source_rank(cfg))}, doc_id) - 1
                   AS idx, doc_id, is_ref, quality, exact_key
            FROM (SELECT doc_id, source, uri, record_no, true AS is_ref, CAST(NULL AS VARCHAR) AS quality,
                         coalesce(norm_hash, content_hash) AS exact_key
                  FROM documents WHERE snapshot = ? AND doc_id IN (SELECT doc_id FROM dedup_inherit WHERE status = 'kept')
                  UNION ALL
                  SELECT doc_id, source, uri, record_no, false, {quality}, exact_key
                  FROM (SELECT doc_id, source, uri, record_no, text, coalesce(norm_hash, content_hash) AS exact_key{stats}
                        {judged}))""",
        [snapshot, snapshot])


# Source order, which decides the copy of a duplicate cluster that is kept: the config's order of sources,
# then the file, then the line/row number in it, then the chunk number in that record (uris look like
# `path`, `path:LINE`, `path#CHUNK`, `path:ROW#CHUNK`), numerically: line 1269 comes before line 12167
SOURCE_ORDER_SQL = r"""{sources}, regexp_replace(uri, '(:[0-9]+)?(#[0-9]+)?$', ''), record_no NULLS FIRST,
    coalesce(TRY_CAST(regexp_extract(uri, '#([0-9]+)$', 1) AS BIGINT), -1)"""


def _source_rank(cfg: PipelineConfig) -> str:
    """A SQL expression: the position of a document's source in ingest.sources."""
    cases = " ".join(f"WHEN '{src.label.replace(chr(39), chr(39) * 2)}' THEN {i}" for i, src in enumerate(cfg.ingest.sources))
    return f"CASE source {cases} ELSE {len(cfg.ingest.sources)} END" if cases else "0"


def _decontaminate(con: Any, snapshot: str, cfg: PipelineConfig, ws: Workspace) -> int:
    """Mark documents that pass the quality rules but overlap an eval set (verdict in `quality`)."""
    con.execute(
        """CREATE OR REPLACE TEMP TABLE dedup_decontam_input AS
           SELECT w.idx, d.text FROM dedup_work w JOIN documents d ON d.snapshot = ? AND d.doc_id = w.doc_id
           WHERE w.quality IS NULL AND NOT w.is_ref""", [snapshot])
    n_docs = catalog.scalar(con, "SELECT count(*) FROM dedup_work")
    hits = decontam.contaminated(con, "SELECT idx, text FROM dedup_decontam_input", n_docs,
                                 cfg.dedup.decontaminate, cfg.dedup.decontam_ngram, ws.downloads)
    con.execute("DROP TABLE dedup_decontam_input")
    if hits:
        con.register("contaminated", pa.table({"idx": np.fromiter(hits, np.int64, len(hits)),
                                               "reason": [f"contaminates:{name}" for name in hits.values()]}))
        con.execute("UPDATE dedup_work SET quality = c.reason FROM contaminated c WHERE dedup_work.idx = c.idx")
        con.unregister("contaminated")
    return len(hits)


def _exact(con: Any) -> None:
    """dedup_exact: for the documents that pass, their exact-duplicate group's first member and rank."""
    con.execute(
        """CREATE OR REPLACE TEMP TABLE dedup_exact AS
           SELECT idx, first_value(idx) OVER w AS first, row_number() OVER w AS rank
           FROM dedup_work WHERE quality IS NULL
           WINDOW w AS (PARTITION BY exact_key ORDER BY idx)""")
    con.execute("CREATE OR REPLACE TEMP TABLE dedup_near (idx BIGINT, survivor BIGINT)")


def partitioned(cfg: PipelineConfig) -> bool:
    """Near-dup runs as partition tasks (pipelines.data.neardup_partitioned, same result) on a Dask cluster
    or on flow.data_workers local processes; else in this process as one piece."""
    return cfg.flow.task_runner == "dask" or cfg.flow.data_workers is not None


def _near(con: Any, snapshot: str, cfg: PipelineConfig, base: tuple[str, str] | None, pool: TaskPool | None,
          work: Path) -> tuple[dict, Any]:
    """dedup_near: (idx, survivor idx) for each near duplicate among the exact survivors."""
    con.execute(
        """CREATE OR REPLACE TEMP TABLE dedup_near_input AS
           SELECT w.idx, d.text FROM dedup_work w JOIN dedup_exact e USING (idx)
           JOIN documents d ON d.snapshot = ? AND d.doc_id = w.doc_id WHERE e.rank = 1 AND NOT w.is_ref""", [snapshot])
    n_docs = catalog.scalar(con, "SELECT count(*) FROM dedup_work")
    n_ref, ref_bands, ref_texts = 0, None, None
    if base is not None:
        n_ref = catalog.scalar(con, "SELECT count(*) FROM dedup_work WHERE is_ref")
        con.execute("""CREATE OR REPLACE TEMP TABLE dedup_ref_bands AS
                       SELECT w.idx, m.band, m.bucket FROM minhash_bands m JOIN dedup_work w ON w.doc_id = m.doc_id
                       WHERE m.dedup_key = ? AND w.is_ref""", [base[0]])
        con.execute("""CREATE OR REPLACE TEMP VIEW dedup_ref_texts AS
                       SELECT w.idx, d.text FROM dedup_work w JOIN documents d ON d.doc_id = w.doc_id
                       WHERE d.snapshot = '{}' AND w.is_ref""".format(snapshot.replace("'", "")))
        ref_bands, ref_texts = "SELECT idx, band, bucket FROM dedup_ref_bands", "SELECT idx, text FROM dedup_ref_texts"
    refs = {"n_reference": n_ref, "reference_bands_sql": ref_bands, "reference_text_sql": ref_texts}
    if pool is None:
        result = find_near_duplicates(con, "SELECT idx, text FROM dedup_near_input", n_docs, cfg.dedup.near, **refs)
    else:
        result = find_near_duplicates_partitioned(con, "SELECT idx, text FROM dedup_near_input", n_docs, cfg.dedup.near,
                                                  pool, work, with_bands=cfg.dedup.incremental, **refs)
    if len(result.dropped):
        con.register("near_batch", pa.Table.from_arrays([arrow_int64s(result.dropped), arrow_int64s(result.survivor)],
                                                        names=["idx", "survivor"]))
        con.execute("INSERT INTO dedup_near SELECT idx, survivor FROM near_batch")
        con.unregister("near_batch")
    con.execute("DROP TABLE dedup_near_input")
    return {"near_candidates": result.candidates, "near_verified_pairs": result.verified,
            "near_clusters": result.clusters}, result


def _write_status(con: Any, dedup_key: str, snapshot: str) -> None:
    con.execute("INSERT INTO doc_status SELECT ?, ?, doc_id, status, reason, duplicate_of FROM dedup_inherit",
                [dedup_key, snapshot])
    # an exact copy of a document that is itself a near duplicate names that one's survivor: every
    # duplicate_of points at a kept document
    con.execute(
        """INSERT INTO doc_status
           SELECT ?, ?, w.doc_id,
                  CASE WHEN w.quality IS NULL AND e.rank = 1 AND n.idx IS NULL THEN 'kept' ELSE 'dropped' END,
                  CASE WHEN w.quality IS NOT NULL THEN w.quality
                       WHEN e.rank > 1 THEN 'exact_duplicate'
                       WHEN n.idx IS NOT NULL THEN 'near_duplicate' END,
                  o.doc_id
           FROM dedup_work w
           LEFT JOIN dedup_exact e USING (idx)
           LEFT JOIN dedup_near n USING (idx)
           LEFT JOIN dedup_near nf ON nf.idx = e.first
           LEFT JOIN dedup_work o ON o.idx = CASE WHEN e.rank > 1 THEN coalesce(nf.survivor, e.first)
                                                  ELSE n.survivor END
           WHERE NOT w.is_ref""",
        [dedup_key, snapshot])
