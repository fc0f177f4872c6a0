"""Stage 3, split: kept documents into train/validation by a seeded hash of their content.

Deterministic and independent of order, so adding documents never moves an old one across splits.
"""

from __future__ import annotations

import json
from pathlib import Path

from pipelines.config import PipelineConfig
from pipelines.data import catalog
from pipelines.workspace import StageResult, Workspace, run_stage, stage_key

STAGE, VERSION = "split", "1"
BUCKETS = 100_000


def key(cfg: PipelineConfig, dedup: StageResult) -> str:
    return stage_key(STAGE, VERSION, cfg.split, [dedup])


def run(cfg: PipelineConfig, ws: Workspace, dedup: StageResult, force: bool = False) -> StageResult:
    split_key = key(cfg, dedup)
    threshold = int(cfg.split.val_fraction * BUCKETS)

    def build(out: Path) -> dict:
        with ws.duckdb() as con:
            catalog.ensure_schema(con)
            con.begin()
            con.execute("DELETE FROM splits WHERE split_key = ?", [split_key])
            con.execute(
                """INSERT INTO splits
                   SELECT ?, s.snapshot, s.doc_id,
                          CASE WHEN md5_number(d.content_hash || ':' || ?) % ? < ? THEN 'val' ELSE 'train' END
                   FROM doc_status s JOIN documents d USING (snapshot, doc_id)
                   WHERE s.dedup_key = ? AND s.status = 'kept'""",
                [split_key, str(cfg.split.seed), BUCKETS, threshold, dedup.key],
            )
            counts = dict(catalog.rows(con, "SELECT split, count(*) FROM splits WHERE split_key = ? GROUP BY ALL", [split_key]))
            if not counts.get("val") or not counts.get("train"):
                con.rollback()
                raise ValueError(
                    f"split gave train={counts.get('train', 0)} val={counts.get('val', 0)} documents; each needs at least one. "
                    "Add documents, lower ingest.sources[].doc_chars, or raise split.val_fraction"
                )
            split_bytes = dict(catalog.rows(
                con, """SELECT s.split, sum(d.n_bytes) FROM splits s JOIN documents d USING (snapshot, doc_id)
                        WHERE s.split_key = ? GROUP BY ALL""", [split_key]))
            con.commit()
        report = {"train_docs": counts["train"], "val_docs": counts["val"],
                  "train_bytes": int(split_bytes["train"]), "val_bytes": int(split_bytes["val"])}
        (out / "report.json").write_text(json.dumps(report, indent=2))
        return report

    return run_stage(ws, STAGE, split_key, build, force)
