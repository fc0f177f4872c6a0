"""Stage 2, dedup: exact duplicates (same content hash) removed in SQL; each drop names its original.

The survivor of a duplicate group is the document with the smallest uri, so the choice is stable.
"""

from __future__ import annotations

import json
from pathlib import Path

from pipelines import catalog
from pipelines.config import PipelineConfig
from pipelines.workspace import StageResult, Workspace, run_stage, stage_key

STAGE, VERSION = "dedup", "1"


def key(cfg: PipelineConfig, ingest: StageResult) -> str:
    return stage_key(STAGE, VERSION, cfg.dedup, [ingest])


def run(cfg: PipelineConfig, ws: Workspace, ingest: StageResult, force: bool = False) -> StageResult:
    dedup_key, snapshot = key(cfg, ingest), ingest.key

    def build(out: Path) -> dict:
        with ws.duckdb() as con:
            catalog.ensure_schema(con)
            con.begin()
            con.execute("DELETE FROM doc_status WHERE dedup_key = ?", [dedup_key])
            con.execute(
                """INSERT INTO doc_status
                   SELECT ?, snapshot, doc_id,
                          CASE WHEN rank = 1 THEN 'kept' ELSE 'dropped' END,
                          CASE WHEN rank = 1 THEN NULL ELSE 'exact_duplicate' END,
                          CASE WHEN rank = 1 THEN NULL ELSE first_doc END
                   FROM (SELECT snapshot, doc_id,
                                row_number() OVER w AS rank,
                                first_value(doc_id) OVER w AS first_doc
                         FROM documents WHERE snapshot = ?
                         WINDOW w AS (PARTITION BY content_hash ORDER BY uri))""",
                [dedup_key, snapshot],
            )
            read = catalog.scalar(con, "SELECT count(*) FROM documents WHERE snapshot = ?", [snapshot])
            by_reason = dict(catalog.rows(
                con, "SELECT coalesce(reason, 'kept'), count(*) FROM doc_status WHERE dedup_key = ? GROUP BY ALL",
                [dedup_key]))
            kept = by_reason.pop("kept", 0)
            if read != kept + sum(by_reason.values()):
                con.rollback()
                raise RuntimeError(f"dedup accounting broke: read={read} kept={kept} dropped={by_reason}")
            kept_bytes = catalog.scalar(
                con, """SELECT sum(d.n_bytes) FROM doc_status s JOIN documents d USING (snapshot, doc_id)
                        WHERE s.dedup_key = ? AND s.status = 'kept'""", [dedup_key])
            con.commit()
        report = {"snapshot": snapshot, "read": read, "kept": kept, "dropped": sum(by_reason.values()),
                  "dropped_by_reason": by_reason, "kept_bytes": int(kept_bytes or 0)}
        (out / "report.json").write_text(json.dumps(report, indent=2))
        return report

    return run_stage(ws, STAGE, dedup_key, build, force)
