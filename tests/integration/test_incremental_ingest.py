"""Incremental ingest: a new snapshot reads only the files it has not seen; the rows of the others are
copied from the catalog. Provenance per record, and `read == documents + quarantined` per snapshot."""

from __future__ import annotations

import inspect
import json
import os
import shutil
import textwrap

import pytest

from pipelines.config import load_config
from pipelines.data import catalog, data_report
from pipelines.stages import dedup, ingest
from pipelines.workspace import Workspace

pytestmark = pytest.mark.integration

TEXTS = {f"t{i}.txt": inspect.getdoc(f) for i, f in enumerate(
    (json.dumps, json.loads, shutil.copytree, textwrap.wrap, textwrap.dedent))}
LINES = [json.dumps({"text": inspect.getdoc(shutil.rmtree)}), "{not json", json.dumps({"text": inspect.getdoc(textwrap.fill)})]


def make_corpus(root):
    (root / "texts").mkdir(parents=True)
    for name, text in TEXTS.items():
        (root / "texts" / name).write_text(text)
    (root / "lines").mkdir()
    (root / "lines" / "a.jsonl").write_text("\n".join(LINES) + "\n")


def config(root, ws, partition_bytes: int = 1, *overrides):
    """partition_bytes=1: every file is its own partition (the per-file test below counts them)."""
    sources = (f"[{{kind: text_dir, name: docs, path: {root / 'texts'}, doc_chars: 0}}, "
               f"{{kind: jsonl, name: lines, path: {root / 'lines'}}}]")
    return load_config("tiny", [f"workspace={ws}", f"ingest.sources={sources}", f"ingest.partition_bytes={partition_bytes}",
                                *overrides])


def rows(cfg, snapshot) -> set[tuple]:
    with Workspace(cfg.workspace).duckdb(read_only=True) as con:
        docs = catalog.rows(con, """SELECT 'doc', source, uri, record_no, content_hash, text, doc_id FROM documents
                                    WHERE snapshot = ?""", [snapshot])
        bad = catalog.rows(con, "SELECT 'bad', source, uri, record_no, reason, snippet, NULL FROM quarantine WHERE snapshot = ?",
                           [snapshot])
    return set(docs) | set(bad)


def test_a_new_file_is_the_only_one_read(tmp_path):
    root = tmp_path / "corpus"
    make_corpus(root)
    cfg = config(root, tmp_path / "ws")
    ws = Workspace(cfg.workspace)
    first = ingest.run(cfg, ws)
    m = first.metrics
    assert (m["partitions"], m["partitions_read"], m["partitions_reused"]) == (len(TEXTS) + 1, len(TEXTS) + 1, 0)
    assert (m["read"], m["documents"], m["quarantined"]) == (len(TEXTS) + 3, len(TEXTS) + 2, 1)
    listing = json.loads((first.dir / "partitions.json").read_text())
    assert sorted(p["uri"] for p in listing) == sorted([str(root / "texts" / n) for n in TEXTS] + [str(root / "lines" / "a.jsonl")])

    # provenance: line numbers, content hashes, the snapshot id, the partition
    with ws.duckdb(read_only=True) as con:
        got = catalog.rows(con, """SELECT uri, record_no, content_hash = md5(text), snapshot, partition_key IS NOT NULL
                                   FROM documents WHERE source = 'lines' ORDER BY record_no""")
        bad = catalog.rows(con, "SELECT uri, record_no, reason FROM quarantine")
    jsonl = str(root / "lines" / "a.jsonl")
    assert got == [(f"{jsonl}:1", 1, True, first.key, True), (f"{jsonl}:3", 3, True, first.key, True)]
    assert bad == [(f"{jsonl}:2", 2, "malformed_json")]

    # an old file rewritten with the same size and mtime has the same partition key: its rows are copied
    # from the catalog, so the old text shows that the file was not read again
    old = root / "texts" / "t0.txt"
    stat = old.stat()
    old.write_text(TEXTS["t0.txt"].swapcase())
    os.utime(old, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    (root / "texts" / "new.txt").write_text(inspect.getdoc(textwrap.indent))
    second = ingest.run(cfg, ws)
    m2 = second.metrics
    assert second.key != first.key
    assert (m2["partitions_read"], m2["partitions_reused"]) == (1, len(TEXTS) + 1)
    assert (m2["read"], m2["documents"], m2["quarantined"]) == (m["read"] + 1, m["documents"] + 1, 1)
    with ws.duckdb(read_only=True) as con:
        (text,), = catalog.rows(con, "SELECT text FROM documents WHERE snapshot = ? AND uri = ?", [second.key, str(old)])
    assert text == TEXTS["t0.txt"]
    old.write_text(TEXTS["t0.txt"])
    os.utime(old, ns=(stat.st_atime_ns, stat.st_mtime_ns))

    # the reused snapshot holds exactly what a fresh workspace reading every file holds
    fresh_cfg = config(root, tmp_path / "fresh")
    fresh = ingest.run(fresh_cfg, Workspace(fresh_cfg.workspace))
    assert fresh.key == second.key and fresh.metrics["partitions_reused"] == 0
    assert rows(cfg, second.key) == rows(fresh_cfg, fresh.key)

    # a changed file is read again, a removed file is gone; the old snapshots stay as they were
    (root / "texts" / "t1.txt").write_text(TEXTS["t1.txt"] + "\n\nA paragraph added later on.")
    (root / "texts" / "t2.txt").unlink()
    third = ingest.run(cfg, ws)
    m3 = third.metrics
    assert (m3["partitions_read"], m3["partitions_reused"]) == (1, len(TEXTS))  # t1 read; t0, t3, t4, new, a.jsonl copied
    assert m3["documents"] == m2["documents"] - 1
    assert len(rows(cfg, first.key)) == m["read"] and len(rows(cfg, second.key)) == m2["read"]

    before = rows(cfg, third.key)
    forced = ingest.run(cfg, ws, force=True)  # reads every file again, and finds the same rows
    assert forced.key == third.key and forced.metrics["partitions_reused"] == 0
    assert rows(cfg, forced.key) == before
    assert not any((ws.artifacts / "ingest" / ".partitions").iterdir()), "staged partitions left behind"

    dedup.run(cfg, ws, third)
    with ws.duckdb(read_only=True) as con:
        entries = data_report.accounting(con)
    assert {e["snapshot"] for e in entries} == {first.key, second.key, third.key}
    for e in entries:
        assert e["read"] == e["documents"] + e["quarantined"]


def test_grouped_small_files_reread_only_the_group_that_changed(tmp_path):
    """600 small files in groups of ~4 KB: an edit and a new file re-read their groups only, and the snapshot
    holds what a fresh workspace reading every file holds."""
    root = tmp_path / "corpus"
    make_corpus(root)
    docs = list(TEXTS.values())
    for i in range(600):
        (root / "texts" / f"s{i:04d}.txt").write_text(f"small file {i}: " + docs[i % len(docs)][: 40 + i % 200])
    cfg = config(root, tmp_path / "ws", partition_bytes=4096)
    ws = Workspace(cfg.workspace)
    first = ingest.run(cfg, ws).metrics
    assert 10 <= first["partitions"] <= 150 and first["documents"] == 600 + len(TEXTS) + 2
    (root / "texts" / "s0300.txt").write_text("an edited small file with other words in it")
    (root / "texts" / "s0450b.txt").write_text("a new small file between the others, long enough")
    second = ingest.run(cfg, ws)
    m = second.metrics
    assert 1 <= m["partitions_read"] <= 4 and m["partitions_reused"] >= first["partitions"] - 4, m
    fresh_cfg = config(root, tmp_path / "fresh", partition_bytes=4096)
    fresh = ingest.run(fresh_cfg, Workspace(fresh_cfg.workspace))
    assert fresh.key == second.key and rows(cfg, second.key) == rows(fresh_cfg, fresh.key)
    with ws.duckdb(read_only=True) as con:  # every row knows its partition, and every partition its rows
        assert catalog.scalar(con, """SELECT count(*) FROM documents d ANTI JOIN ingest_partitions p
                                      ON p.snapshot = d.snapshot AND p.partition_key = d.partition_key""") == 0


def test_worker_processes_stage_the_rows_one_process_does(tmp_path):
    """flow.data_workers=2 stages the partitions in worker processes: the same rows as in one process, with the
    content hash (md5 in the worker) equal to DuckDB's md5 of the stored text and the exact key to its own rule."""
    from pipelines.data.normalize import exact_key

    root = tmp_path / "corpus"
    make_corpus(root)
    for i in range(200):
        text = f"Caf\u00e9 \u00a0{i}\u3000NA\u00cfVE  text\r\n\twith\x0bcontrols\x07 " + TEXTS["t0.txt"][: 50 + i]
        (root / "texts" / f"u{i:04d}.txt").write_text(text if i % 7 else "  \n")
    one_cfg = config(root, tmp_path / "one", 4096)
    one = ingest.run(one_cfg, Workspace(one_cfg.workspace))
    procs_cfg = config(root, tmp_path / "procs", 4096, "flow.data_workers=2")
    procs = ingest.run(procs_cfg, Workspace(procs_cfg.workspace))
    assert one.metrics["partitions"] >= 4 and one.metrics["quarantine_reasons"] == {"empty": 29, "malformed_json": 1}
    assert procs.key == one.key and rows(procs_cfg, procs.key) == rows(one_cfg, one.key)
    with Workspace(procs_cfg.workspace).duckdb(read_only=True) as con:
        assert catalog.scalar(con, "SELECT count(*) FROM documents WHERE content_hash <> md5(text)") == 0
        assert all(norm == exact_key(text) for text, norm in catalog.rows(con, "SELECT text, norm_hash FROM documents"))


def test_an_old_catalog_gains_the_provenance_columns(tmp_path):
    import duckdb

    root = tmp_path / "corpus"
    make_corpus(root)
    cfg = config(root, tmp_path / "ws")
    ws = Workspace(cfg.workspace)
    ws.root.mkdir(parents=True)
    with duckdb.connect(str(ws.catalog)) as con:  # the schema of ingest version 2
        con.execute("""CREATE TABLE documents (snapshot VARCHAR, doc_id VARCHAR, source VARCHAR, uri VARCHAR, text VARCHAR,
                       n_bytes BIGINT, content_hash VARCHAR, norm_hash VARCHAR)""")
        con.execute("CREATE TABLE quarantine (snapshot VARCHAR, source VARCHAR, uri VARCHAR, reason VARCHAR, snippet VARCHAR)")
        con.execute("INSERT INTO documents VALUES ('old', 'x', 'docs', 'u', 'an old document', 15, 'h', 'n')")
    result = ingest.run(cfg, ws)
    assert result.metrics["documents"] == len(TEXTS) + 2
    with ws.duckdb(read_only=True) as con:
        assert catalog.scalar(con, "SELECT count(*) FROM documents WHERE snapshot = 'old' AND record_no IS NULL") == 1
        assert catalog.scalar(con, "SELECT count(*) FROM documents WHERE record_no IS NULL") == 1
