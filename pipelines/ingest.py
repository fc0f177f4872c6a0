"""Stage 1, ingest: read every configured source into the DuckDB catalog as one snapshot.

Every record read ends up as a document row or a quarantine row with its reason:
`read == documents + quarantined` is checked before the stage is marked complete.
"""

from __future__ import annotations

import json
from itertools import islice
from pathlib import Path

import pyarrow as pa

from pipelines import catalog, decontam
from pipelines.config import ConfigError, NormalizeConfig, PipelineConfig
from pipelines.normalize import exact_key, normalize_text
from pipelines.sources import Record, check_source, read_source, source_fingerprint
from pipelines.workspace import StageResult, Workspace, run_stage, stage_key

STAGE, VERSION = "ingest", "2"
BATCH = 2000


def key(cfg: PipelineConfig) -> str:
    fingerprint = [source_fingerprint(s) for s in cfg.ingest.sources]
    return stage_key(STAGE, VERSION, cfg.ingest, extra=fingerprint)


def preflight(cfg: PipelineConfig) -> None:
    """Before any work: every source and every eval set of dedup.decontaminate can be read."""
    for src in cfg.ingest.sources:
        check_source(src)
    decontam.preflight(cfg.dedup.decontaminate)


def run(cfg: PipelineConfig, ws: Workspace, force: bool = False) -> StageResult:
    snapshot = key(cfg)

    def build(out: Path) -> dict:
        counts: dict[str, int] = {"read": 0, "documents": 0, "quarantined": 0}
        reasons: dict[str, int] = {}
        with ws.duckdb() as con:
            catalog.ensure_schema(con)
            con.begin()
            con.execute("DELETE FROM documents WHERE snapshot = ?", [snapshot])
            con.execute("DELETE FROM quarantine WHERE snapshot = ?", [snapshot])
            for src in cfg.ingest.sources:
                records = read_source(src, ws.downloads)
                while batch := list(islice(records, BATCH)):
                    docs, refused = _screen(batch, cfg.ingest.min_chars, cfg.ingest.max_chars, cfg.ingest.normalize)
                    _insert(con, snapshot, docs, refused)
                    counts["read"] += len(batch)
                    counts["documents"] += len(docs)
                    counts["quarantined"] += len(refused)
                    for r in refused:
                        reasons[r.reason] = reasons.get(r.reason, 0) + 1
            stored = catalog.scalar(con, "SELECT count(*) FROM documents WHERE snapshot = ?", [snapshot])
            if counts["documents"] == 0:
                con.rollback()
                raise ConfigError(f"the corpus is empty: no source produced a document ({reasons or 'no records'}); "
                                 "check ingest.sources")
            if stored != counts["documents"] or counts["read"] != counts["documents"] + counts["quarantined"]:
                con.rollback()
                raise RuntimeError(f"ingest accounting broke: {counts}, stored {stored}")
            n_bytes = catalog.scalar(con, "SELECT sum(n_bytes) FROM documents WHERE snapshot = ?", [snapshot])
            con.commit()
        report = {"snapshot": snapshot, **counts, "bytes": int(n_bytes), "quarantine_reasons": reasons}
        (out / "report.json").write_text(json.dumps(report, indent=2))
        return report

    return run_stage(ws, STAGE, snapshot, build, force)


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


def _insert(con, snapshot: str, docs: list[Record], refused: list[Record]) -> None:
    if docs:
        doc_batch = pa.table({"source": [d.source for d in docs], "uri": [d.uri for d in docs], "text": [d.text for d in docs],
                              "norm_hash": [exact_key(d.text) for d in docs]})
        con.register("doc_batch", doc_batch)
        con.execute(
            """INSERT INTO documents (snapshot, doc_id, source, uri, text, n_bytes, content_hash, norm_hash)
               SELECT ?, substr(md5(source || '|' || uri), 1, 16), source, uri, text, strlen(text), md5(text), norm_hash
               FROM doc_batch""",
            [snapshot],
        )
        con.unregister("doc_batch")
    if refused:
        bad = pa.table({"source": [r.source for r in refused], "uri": [r.uri for r in refused],
                        "reason": [r.reason for r in refused], "snippet": [r.snippet for r in refused]})
        con.register("bad_batch", bad)
        con.execute("INSERT INTO quarantine SELECT ?, source, uri, reason, snippet FROM bad_batch", [snapshot])
        con.unregister("bad_batch")
