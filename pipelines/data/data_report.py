"""What happened to the data, read back from the catalog: per snapshot (when it was made, the latest
marked), records read, quarantined by reason, and per dedup run kept / dropped by reason, duplicate clusters,
a breakdown per source, a length histogram, and examples of quarantined records and of duplicate pairs
(pipelines.data.report_details).

`lmforge data report [--json] [--examples N]` prints it; tests use `accounting` to check the invariant
`read == documents + quarantined` and `documents == kept + sum(dropped by reason)` for every snapshot.
The dedup stage also leaves its own run's report beside its output (`write_stage_report`): JSON, a
Markdown table (the Prefect UI shows it as the stage's artifact) and a PNG plot; `log_to_mlflow` logs
them to the active MLflow run as tables and an image.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pipelines.data import catalog, report_details
from pipelines.data.neardup import NearDupConfig
from pipelines.workspace import StageResult, Workspace

REPORT_JSON, REPORT_MD, REPORT_PNG = "data_report.json", "data_report.md", "data_report.png"

LENGTH_BINS = (0, 200, 1000, 2000, 4000, 8000, 16000)


def accounting(con: Any) -> list[dict]:
    """One entry per (snapshot, dedup run) in the catalog; a snapshot not yet deduplicated has dedup_key None."""
    out = []
    snapshots = catalog.rows(con, """
        SELECT snapshot, sum(docs)::BIGINT, sum(quarantined)::BIGINT FROM (
            SELECT snapshot, count(*) AS docs, 0 AS quarantined FROM documents GROUP BY ALL
            UNION ALL SELECT snapshot, 0, count(*) FROM quarantine GROUP BY ALL) GROUP BY ALL ORDER BY 1""")
    for snapshot, _docs, _quarantined in snapshots:
        keys = [k for (k,) in catalog.rows(con, "SELECT DISTINCT dedup_key FROM doc_status WHERE snapshot = ? ORDER BY 1", [snapshot])]
        out.extend(entry(con, snapshot, dedup_key) for dedup_key in keys or [None])
    return out


def entry(con: Any, snapshot: str, dedup_key: str | None) -> dict:
    """The accounting of one snapshot and (unless None) one dedup run of it."""
    docs = catalog.scalar(con, "SELECT count(*) FROM documents WHERE snapshot = ?", [snapshot])
    q_reasons = dict(catalog.rows(con, "SELECT reason, count(*) FROM quarantine WHERE snapshot = ? GROUP BY ALL ORDER BY 1",
                                  [snapshot]))
    quarantined = sum(q_reasons.values())
    out = {"snapshot": snapshot, "read": docs + quarantined, "documents": docs, "quarantined": quarantined,
           "quarantined_by_reason": q_reasons, "dedup_key": dedup_key}
    if dedup_key is not None:
        by = dict(catalog.rows(con, """SELECT coalesce(reason, 'kept'), count(*) FROM doc_status
                                       WHERE dedup_key = ? GROUP BY ALL ORDER BY 1""", [dedup_key]))
        out["kept"] = by.pop("kept", 0)
        out["dropped_by_reason"] = by
        out["duplicate_clusters"] = catalog.scalar(con, """SELECT count(DISTINCT duplicate_of) FROM doc_status
                                                           WHERE dedup_key = ? AND duplicate_of IS NOT NULL""", [dedup_key])
    return out


def balanced(e: dict) -> bool:
    return e["read"] == e["quarantined"] + e["kept"] + sum(e["dropped_by_reason"].values())


def length_histogram(con: Any, dedup_key: str) -> list[tuple[str, int, int]]:
    """(bin label, kept documents, dropped documents) by length in characters."""
    edges = list(LENGTH_BINS)
    cases = " ".join(f"WHEN d.n_bytes < {hi} THEN {i}" for i, hi in enumerate(edges[1:]))
    rows = dict(((b, s), n) for b, s, n in catalog.rows(con, f"""
        SELECT CASE {cases} ELSE {len(edges) - 1} END AS bin, s.status, count(*)
        FROM doc_status s JOIN documents d USING (snapshot, doc_id) WHERE s.dedup_key = ? GROUP BY ALL""", [dedup_key]))
    labels = [f"{lo}-{hi}" for lo, hi in zip(edges, edges[1:])] + [f">={edges[-1]}"]
    return [(label, rows.get((i, "kept"), 0), rows.get((i, "dropped"), 0)) for i, label in enumerate(labels)]


def full_report(con: Any, ws: Workspace, examples: int = 3) -> dict:
    """Everything `lmforge data report` shows, as JSON-ready data: snapshots newest first, each with its
    dedup runs' accounting, per-source breakdown, length histogram and examples."""
    entries = accounting(con)
    times = report_details.snapshot_times(ws, sorted({e["snapshot"] for e in entries}))
    newest = report_details.latest(times)
    for e in entries:
        made = times.get(e["snapshot"])
        e["created_at"], e["latest"] = made and made[0], e["snapshot"] == newest
        e["per_source"] = report_details.per_source(con, e["snapshot"], e["dedup_key"])
        e["quarantine_examples"] = report_details.quarantine_examples(con, e["snapshot"], examples)
        if e["dedup_key"] is not None:
            e["balanced"] = balanced(e)
            e["length_histogram"] = [{"bin": b, "kept": k, "dropped": d} for b, k, d in length_histogram(con, e["dedup_key"])]
            ngram = run_ngram(ws, e["dedup_key"])
            e["similarity"] = f"Jaccard of {ngram}-word shingles"
            e["duplicate_examples"] = report_details.duplicate_examples(con, e["dedup_key"], examples, ngram)
    entries.sort(key=lambda e: (e["snapshot"] == newest, (times.get(e["snapshot"]) or ("", 0))[1]), reverse=True)
    return {"latest_snapshot": newest, "entries": entries}


def run_ngram(ws: Workspace, dedup_key: str) -> int:
    """The shingle width the dedup run `dedup_key` judged near duplicates with (its stage report says; runs from
    before it was recorded used 5, the default until word 3-grams)."""
    path = ws.stage_dir("dedup", dedup_key) / "report.json"
    if path.is_file():
        return int(json.loads(path.read_text()).get("near_ngram", 5))
    return NearDupConfig().ngram  # no stage output (removed): the current default


def print_report(report: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    if not report["entries"]:
        console.print("the catalog holds no snapshot yet; run `lmforge run --only dedup` first")
        return
    for e in report["entries"]:
        made = f"made {e['created_at'] or '(time unknown)'}" + ("  (latest)" if e["latest"] else "")
        t = Table(title=f"snapshot {e['snapshot']}  {made}  dedup {e['dedup_key'] or '(not run)'}")
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
            t.add_row("read == quarantined + kept + dropped", "yes" if e["balanced"] else "NO", style=None if e["balanced"] else "red")
        console.print(t)
        counts = ("read", "quarantined", "kept", "dropped")
        console.print(_table("per source", ["source", *counts],
                             [[s, *(row.get(c, "") for c in counts)] for s, row in e["per_source"].items()]))
        if e["dedup_key"] is not None:
            console.print(_table("length (bytes)", ["bin", "kept", "dropped"],
                                 [[h["bin"], h["kept"], h["dropped"]] for h in e["length_histogram"]]))
        if e["quarantine_examples"]:
            console.print(_table("quarantined, examples", ["reason", "where", "snippet"],
                                 [[x["reason"], x["uri"], x["snippet"]] for x in e["quarantine_examples"]]))
        if e.get("duplicate_examples"):
            console.print(_table(f"duplicates, examples (similarity: {e['similarity']})",
                                 ["reason", "dropped", "kept copy", "similarity", "dropped text"],
                                 [[x["reason"], x["uri"], x["kept_uri"],
                                   f"{x['similarity']:.3f}", x["snippet"]] for x in e["duplicate_examples"]]))


def _table(title: str, columns: list[str], rows: list[list]) -> Any:
    from rich.table import Table

    t = Table(title=title)
    for c in columns:
        t.add_column(c, overflow="fold")
    for row in rows:
        t.add_row(*(str(v) for v in row))
    return t


def write_stage_report(con: Any, snapshot: str, dedup_key: str, out: Path, pool: Any = None) -> dict:
    """The dedup run's report beside its output: data_report.json, .md and .png. With a pool of worker processes
    (a pipelines.data.task_pool.TaskPool) a worker draws the plot: importing matplotlib and drawing cost ~0.5 s
    that the stage's process would spend alone at its end; the stage has its idle workers import matplotlib while
    it writes the verdicts."""
    e = entry(con, snapshot, dedup_key)
    e["length_histogram"] = [{"bin": b, "kept": k, "dropped": d} for b, k, d in length_histogram(con, dedup_key)]
    (out / REPORT_JSON).write_text(json.dumps(e, indent=2))
    (out / REPORT_MD).write_text(markdown(e))
    if pool is not None and not pool.inline:
        pool.map(_plot, [(e, out / REPORT_PNG)])
    else:
        _plot(e, out / REPORT_PNG)
    return e


def markdown(e: dict) -> str:
    """The accounting and the length histogram as Markdown tables (Prefect renders these in its UI)."""
    lines = ["#### data accounting", "", "| what | documents |", "|---|---:|", f"| read | {e['read']} |"]
    lines += [f"| quarantined: {r} | {n} |" for r, n in e["quarantined_by_reason"].items()]
    lines += [f"| **kept** | **{e['kept']}** |"] + [f"| dropped: {r} | {n} |" for r, n in e["dropped_by_reason"].items()]
    lines += [f"| duplicate clusters | {e['duplicate_clusters']} |",
              f"| read == quarantined + kept + dropped | {'yes' if balanced(e) else '**NO**'} |", "",
              "#### length (bytes)", "", "| bin | kept | dropped |", "|---|---:|---:|"]
    lines += [f"| {h['bin']} | {h['kept']} | {h['dropped']} |" for h in e["length_histogram"]]
    return "\n".join(lines) + "\n"


def stage_markdown(result: StageResult) -> str:
    """The Markdown report a stage left beside its output, or "" (only dedup writes one)."""
    path = result.dir / REPORT_MD
    return "\n" + path.read_text() if path.is_file() else ""


def _plot(e: dict, path: Path) -> None:
    from matplotlib.figure import Figure  # no pyplot: no GUI backend, no global state

    fig = Figure(figsize=(10, 4), layout="constrained")
    hist, drops = fig.subplots(1, 2)
    bins = [h["bin"] for h in e["length_histogram"]]
    kept = [h["kept"] for h in e["length_histogram"]]
    hist.bar(bins, kept, label="kept")
    hist.bar(bins, [h["dropped"] for h in e["length_histogram"]], bottom=kept, label="dropped")
    hist.set(title="documents by length (bytes)", ylabel="documents")
    hist.tick_params(axis="x", labelrotation=45)
    hist.legend()
    reasons = {**{f"quarantined: {r}": n for r, n in e["quarantined_by_reason"].items()},
               **{f"dropped: {r}": n for r, n in e["dropped_by_reason"].items()}}
    drops.bar_label(drops.barh(list(reasons) or ["(nothing dropped)"], list(reasons.values()) or [0]))
    drops.set(title=f"read {e['read']}, kept {e['kept']}", xlabel="documents")
    fig.savefig(path, dpi=80)


def log_to_mlflow(result: StageResult) -> None:
    """Log a dedup run's report to the active MLflow run: tables data/accounting.json and
    data/length_histogram.json, and the plot data/data_report.png. No-op for a stage without one."""
    path = result.dir / REPORT_JSON
    if not path.is_file():
        return
    import mlflow
    import pandas as pd

    e = json.loads(path.read_text())
    rows = [("read", "", e["read"])] + [("quarantined", r, n) for r, n in e["quarantined_by_reason"].items()] \
        + [("kept", "", e["kept"])] + [("dropped", r, n) for r, n in e["dropped_by_reason"].items()]
    mlflow.log_table(pd.DataFrame(rows, columns=["what", "reason", "documents"]), artifact_file="data/accounting.json")
    mlflow.log_table(pd.DataFrame(e["length_histogram"]), artifact_file="data/length_histogram.json")
    if (result.dir / REPORT_PNG).is_file():
        mlflow.log_artifact(str(result.dir / REPORT_PNG), "data")
