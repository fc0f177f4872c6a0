"""What happened to the data, read back from the catalog: per snapshot, records read, quarantined by
reason, and per dedup run kept / dropped by reason, duplicate clusters and a length histogram.

`lmforge data report` prints it; tests use `accounting` to check the invariant
`read == documents + quarantined` and `documents == kept + sum(dropped by reason)` for every snapshot.
"""

from __future__ import annotations

from typing import Any

from pipelines import catalog

LENGTH_BINS = (0, 200, 1000, 2000, 4000, 8000, 16000)


def accounting(con: Any) -> list[dict]:
    """One entry per (snapshot, dedup run) in the catalog; a snapshot not yet deduplicated has dedup_key None."""
    out = []
    snapshots = catalog.rows(con, """
        SELECT snapshot, sum(docs)::BIGINT, sum(quarantined)::BIGINT FROM (
            SELECT snapshot, count(*) AS docs, 0 AS quarantined FROM documents GROUP BY ALL
            UNION ALL SELECT snapshot, 0, count(*) FROM quarantine GROUP BY ALL) GROUP BY ALL ORDER BY 1""")
    for snapshot, docs, quarantined in snapshots:
        q_reasons = dict(catalog.rows(con, "SELECT reason, count(*) FROM quarantine WHERE snapshot = ? GROUP BY ALL ORDER BY 1",
                                      [snapshot]))
        base = {"snapshot": snapshot, "read": docs + quarantined, "documents": docs, "quarantined": quarantined,
                "quarantined_by_reason": q_reasons}
        keys = [k for (k,) in catalog.rows(con, "SELECT DISTINCT dedup_key FROM doc_status WHERE snapshot = ? ORDER BY 1", [snapshot])]
        for dedup_key in keys or [None]:
            entry = dict(base, dedup_key=dedup_key)
            if dedup_key is not None:
                by = dict(catalog.rows(con, """SELECT coalesce(reason, 'kept'), count(*) FROM doc_status
                                               WHERE dedup_key = ? GROUP BY ALL ORDER BY 1""", [dedup_key]))
                entry["kept"] = by.pop("kept", 0)
                entry["dropped_by_reason"] = by
                entry["duplicate_clusters"] = catalog.scalar(con, """SELECT count(DISTINCT duplicate_of) FROM doc_status
                                                                     WHERE dedup_key = ? AND duplicate_of IS NOT NULL""", [dedup_key])
            out.append(entry)
    return out


def length_histogram(con: Any, dedup_key: str) -> list[tuple[str, int, int]]:
    """(bin label, kept documents, dropped documents) by length in characters."""
    edges = list(LENGTH_BINS)
    cases = " ".join(f"WHEN d.n_bytes < {hi} THEN {i}" for i, hi in enumerate(edges[1:]))
    rows = dict(((b, s), n) for b, s, n in catalog.rows(con, f"""
        SELECT CASE {cases} ELSE {len(edges) - 1} END AS bin, s.status, count(*)
        FROM doc_status s JOIN documents d USING (snapshot, doc_id) WHERE s.dedup_key = ? GROUP BY ALL""", [dedup_key]))
    labels = [f"{lo}-{hi}" for lo, hi in zip(edges, edges[1:])] + [f">={edges[-1]}"]
    return [(label, rows.get((i, "kept"), 0), rows.get((i, "dropped"), 0)) for i, label in enumerate(labels)]


def print_report(con: Any) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    entries = accounting(con)
    if not entries:
        console.print("the catalog holds no snapshot yet; run `lmforge run --only dedup` first")
        return
    for e in entries:
        t = Table(title=f"snapshot {e['snapshot']}  dedup {e['dedup_key'] or '(not run)'}")
        t.add_column("what")
        t.add_column("documents", justify="right")
        t.add_row("read", str(e["read"]))
        for reason, n in e["quarantined_by_reason"].items():
            t.add_row(f"  quarantined: {reason}", str(n))
        if e["dedup_key"] is not None:
            t.add_row("kept", str(e["kept"]), style="green")
            for reason, n in e["dropped_by_reason"].items():
                t.add_row(f"  dropped: {reason}", str(n))
            t.add_row("duplicate clusters", str(e["duplicate_clusters"]))
            balanced = e["read"] == e["quarantined"] + e["kept"] + sum(e["dropped_by_reason"].values())
            t.add_row("read == quarantined + kept + dropped", "yes" if balanced else "NO", style=None if balanced else "red")
        console.print(t)
        if e["dedup_key"] is not None:
            h = Table(title="length (bytes)")
            for col in ("bin", "kept", "dropped"):
                h.add_column(col, justify="right")
            for label, kept, dropped in length_histogram(con, e["dedup_key"]):
                h.add_row(label, str(kept), str(dropped))
            console.print(h)
