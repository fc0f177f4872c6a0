"""The details of `lmforge data report` beyond the accounting: when each snapshot was made and which is the
latest, the accounting per source, and examples — quarantined records with their reason and a snippet,
dropped duplicates beside the copy that was kept, with their similarity.

The similarity shown is the Jaccard index of the two documents' word n-gram shingle sets (the measure the
near-duplicate stage thresholds; exact duplicates are 1.0 after case and whitespace folding). A near
duplicate names its cluster's survivor, so a chain member can show less than the threshold.
"""

from __future__ import annotations

import json
import re
from typing import Any

from pipelines.data import catalog
from pipelines.workspace import MANIFEST, Workspace

SNIPPET_CHARS = 160
_WORD = re.compile(r"\w+")


def snapshot_times(ws: Workspace, snapshots: list[str]) -> dict[str, tuple[str, int] | None]:
    """When the ingest run that made each snapshot finished: its manifest's created_at (UTC, to the second)
    and the manifest file's mtime in ns (orders runs within one second); None if unknown."""
    out: dict[str, tuple[str, int] | None] = {}
    for snapshot in snapshots:
        manifest = ws.stage_dir("ingest", snapshot) / MANIFEST
        try:
            out[snapshot] = (json.loads(manifest.read_text())["created_at"], manifest.stat().st_mtime_ns)
        except (OSError, ValueError, KeyError):
            out[snapshot] = None
    return out


def latest(times: dict[str, tuple[str, int] | None]) -> str | None:
    """The most recently made snapshot."""
    known = {s: t[1] for s, t in times.items() if t}
    return max(known, key=known.__getitem__) if known else None


def per_source(con: Any, snapshot: str, dedup_key: str | None) -> dict[str, dict[str, int]]:
    """read / quarantined / documents / kept / dropped per source of one snapshot (kept and dropped only after
    a dedup run)."""
    out: dict[str, dict[str, int]] = {}
    for source, n in catalog.rows(con, "SELECT source, count(*) FROM quarantine WHERE snapshot = ? GROUP BY ALL", [snapshot]):
        out.setdefault(source, {"read": 0, "quarantined": 0})["quarantined"] = n
    docs = catalog.rows(con, """
        SELECT d.source, s.status, count(*) FROM documents d
        LEFT JOIN doc_status s ON s.snapshot = d.snapshot AND s.doc_id = d.doc_id AND s.dedup_key = ?
        WHERE d.snapshot = ? GROUP BY ALL""", [dedup_key, snapshot])
    for source, status, n in docs:
        row = out.setdefault(source, {"read": 0, "quarantined": 0})
        if dedup_key is not None:
            row[status] = row.get(status, 0) + n
        row["documents"] = row.get("documents", 0) + n
    for row in out.values():
        row.setdefault("documents", 0)
        row["read"] = row["documents"] + row["quarantined"]
        if dedup_key is not None:
            row.setdefault("kept", 0)
            row.setdefault("dropped", 0)
    return dict(sorted(out.items()))


def quarantine_examples(con: Any, snapshot: str, per_reason: int) -> list[dict]:
    """Up to `per_reason` quarantined records of each reason, in source order."""
    rows = catalog.rows(con, """
        SELECT reason, source, uri, record_no, snippet FROM (
            SELECT *, row_number() OVER (PARTITION BY reason ORDER BY uri, record_no) AS n FROM quarantine WHERE snapshot = ?)
        WHERE n <= ? ORDER BY reason, uri, record_no""", [snapshot, per_reason])
    return [{"reason": r, "source": s, "uri": u, "record_no": no, "snippet": _snippet(sn or "")} for r, s, u, no, sn in rows]


def duplicate_examples(con: Any, dedup_key: str, per_reason: int, ngram: int) -> list[dict]:
    """Up to `per_reason` dropped duplicates of each kind beside the kept copy they duplicate, with their
    shingle Jaccard."""
    rows = catalog.rows(con, """
        SELECT reason, uri, record_no, text, kept_uri, kept_record_no, kept_text FROM (
            SELECT s.reason, d.uri, d.record_no, d.text, o.uri AS kept_uri, o.record_no AS kept_record_no,
                   o.text AS kept_text,
                   row_number() OVER (PARTITION BY s.reason ORDER BY d.uri, d.record_no) AS n
            FROM doc_status s
            JOIN documents d ON d.snapshot = s.snapshot AND d.doc_id = s.doc_id
            JOIN documents o ON o.snapshot = s.snapshot AND o.doc_id = s.duplicate_of
            WHERE s.dedup_key = ? AND s.duplicate_of IS NOT NULL)
        WHERE n <= ? ORDER BY reason, uri, record_no""", [dedup_key, per_reason])
    return [{"reason": reason, "uri": uri, "record_no": no, "kept_uri": kuri, "kept_record_no": kno,
             "similarity": round(shingle_jaccard(text, kept, ngram), 3), "snippet": _snippet(text), "kept_snippet": _snippet(kept)}
            for reason, uri, no, text, kuri, kno, kept in rows]


def shingle_jaccard(a: str, b: str, ngram: int) -> float:
    """Jaccard index of the word n-gram sets of two texts (lower-cased words; shorter texts: their words)."""
    sa, sb = _shingles(a, ngram), _shingles(b, ngram)
    if not sa and not sb:
        return 1.0
    return len(sa & sb) / len(sa | sb)


def _shingles(text: str, ngram: int) -> set[tuple[str, ...]]:
    words = _WORD.findall(text.lower())
    if len(words) < ngram:
        return {tuple(words)} if words else set()
    return {tuple(words[i:i + ngram]) for i in range(len(words) - ngram + 1)}


def _snippet(text: str) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= SNIPPET_CHARS else flat[:SNIPPET_CHARS - 1] + "…"
