"""Ingest, dedup and split on a user corpus with every kind of bad record: each record read ends up as a
document or in quarantine with its reason, the duplicate names its original, the split covers exactly
the kept documents."""

from __future__ import annotations

import contextlib
import inspect
import json
import shutil
import textwrap
from pathlib import Path

import pytest

from pipelines.config import load_config
from pipelines.stages.runner import run_pipeline
from pipelines.workspace import Workspace

pytestmark = pytest.mark.integration

# Real prose: the standard library's own documentation.
GOOD_TEXTS = {
    "a_textwrap_wrap.txt": inspect.getdoc(textwrap.wrap),
    "b_json.txt": inspect.getdoc(json),
    "c_textwrap_fill.txt": inspect.getdoc(textwrap.fill),
    "d_textwrap_dedent.txt": inspect.getdoc(textwrap.dedent),
    "e_json_dumps.txt": inspect.getdoc(json.dumps),
    "f_shutil_copytree.txt": inspect.getdoc(shutil.copytree),
    "g_textwrap_shorten.txt": inspect.getdoc(textwrap.shorten),
    "h_json_loads.txt": inspect.getdoc(json.loads),
}
DUPLICATE = ("z_copy_of_json.txt", "b_json.txt")  # (copy, original): the survivor is the smaller uri
GOOD_RECORDS = [inspect.getdoc(textwrap.indent), inspect.getdoc(contextlib.contextmanager),
                inspect.getdoc(contextlib.suppress), inspect.getdoc(Path.glob)]
BAD_LINES = {  # jsonl line -> reason
    '{"text": "an unterminated string}': "malformed_json",
    '{"body": "the text is in another field"}': "missing_field",
    '{"text": 42}': "wrong_type",
    '{"text": ""}': "empty",
    '{"text": "too short"}': "too_short",
}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("quarantine")
    texts = root / "texts"
    texts.mkdir()
    for name, text in GOOD_TEXTS.items():
        assert text and len(text) > 200
        (texts / name).write_text(text)
    (texts / DUPLICATE[0]).write_text(GOOD_TEXTS[DUPLICATE[1]])
    (texts / "latin1.txt").write_bytes("Le caf\u00e9 est pr\u00eat; la cr\u00e8me br\u00fbl\u00e9e aussi.\n".encode("latin-1"))
    (texts / "blob.txt").write_bytes(bytes(range(256)) * 4)
    (texts / "notes.md").write_text("not matched by the glob\n" * 10)  # outside the source: never read

    lines = [json.dumps({"text": t}) for t in GOOD_RECORDS[:2]] + list(BAD_LINES) + ["", "   "] \
        + [json.dumps({"text": t, "id": i}) for i, t in enumerate(GOOD_RECORDS[2:])]
    (root / "records.jsonl").write_text("\n".join(lines) + "\n")

    expected = {
        "read": len(GOOD_TEXTS) + 1 + 2 + len(GOOD_RECORDS) + len(BAD_LINES),  # blank jsonl lines are no records
        "documents": len(GOOD_TEXTS) + 1 + len(GOOD_RECORDS),
        "quarantine": {
            (str(texts / "latin1.txt"), "bad_encoding"),
            (str(texts / "blob.txt"), "binary"),
            *{(f"{root / 'records.jsonl'}:{lines.index(line) + 1}", reason) for line, reason in BAD_LINES.items()},
        },
    }
    return root, expected


def config(root: Path, *overrides: str):
    sources = (f"[{{kind: text_dir, name: docs, path: {root / 'texts'}, doc_chars: 0}}, "
               f"{{kind: jsonl, name: records, path: {root / 'records.jsonl'}}}]")
    return load_config("tiny", [f"workspace={root / 'ws'}", f"ingest.sources={sources}", "split.val_fraction=0.3",
                                *overrides])


@pytest.fixture(scope="module")
def data(corpus):
    root, expected = corpus
    cfg = config(root)
    return cfg, run_pipeline(cfg, only="split"), expected


def catalog(cfg):
    return Workspace(cfg.workspace).duckdb(read_only=True)


def test_only_the_data_stages_ran(data):
    _, results, _ = data
    assert list(results) == ["ingest", "dedup", "split"]
    assert not any(r.reused for r in results.values())


def test_every_record_is_a_document_or_quarantined(data):
    cfg, results, expected = data
    m = results["ingest"].metrics
    assert m["read"] == expected["read"]
    assert m["documents"] == expected["documents"]
    assert m["read"] == m["documents"] + m["quarantined"]
    with catalog(cfg) as con:
        snapshot = results["ingest"].key
        quarantined = con.execute("SELECT uri, reason, snippet, source FROM quarantine WHERE snapshot = ?", [snapshot]).fetchall()
        documents = con.execute("SELECT source, uri, text FROM documents WHERE snapshot = ?", [snapshot]).fetchall()
    assert {(uri, reason) for uri, reason, _, _ in quarantined} == expected["quarantine"]
    assert len(quarantined) == m["quarantined"] == len(expected["quarantine"])
    assert m["quarantine_reasons"] == {r: sum(1 for _, reason in expected["quarantine"] if reason == r)
                                       for _, r in expected["quarantine"]}
    for uri, reason, snippet, source in quarantined:
        assert source == ("records" if ".jsonl" in uri else "docs")
        assert snippet is not None
        if reason != "empty":  # an empty text has nothing to show
            assert snippet.strip(), f"{reason} at {uri} has no snippet"
    snippets = {reason: snippet for _, reason, snippet, _ in quarantined}
    assert "too short" in snippets["too_short"]
    assert "another field" in snippets["missing_field"]
    assert "42" in snippets["wrong_type"]
    assert "unterminated" in snippets["malformed_json"]
    # documents keep their text exactly; the jsonl ones are the good lines
    texts = {uri: text for _, uri, text in documents}
    root = Path(cfg.workspace).parent
    for name, text in GOOD_TEXTS.items():
        assert texts[str(root / "texts" / name)] == text
    assert sorted(t for s, _, t in documents if s == "records") == sorted(GOOD_RECORDS)
    assert not any(uri.endswith("notes.md") for uri in texts)


def test_the_duplicate_names_its_original(data):
    cfg, results, _ = data
    m = results["dedup"].metrics
    assert m["read"] == results["ingest"].metrics["documents"]
    assert (m["kept"], m["dropped"]) == (m["read"] - 1, 1)
    assert m["dropped_by_reason"] == {"exact_duplicate": 1}
    root = Path(cfg.workspace).parent
    copy_uri, original_uri = (str(root / "texts" / name) for name in DUPLICATE)
    with catalog(cfg) as con:
        ids = dict(con.execute("SELECT uri, doc_id FROM documents WHERE snapshot = ?", [results["ingest"].key]).fetchall())
        dropped = con.execute("SELECT doc_id, reason, duplicate_of FROM doc_status WHERE dedup_key = ? AND status = 'dropped'",
                              [results["dedup"].key]).fetchall()
        original_status = con.execute("SELECT status FROM doc_status WHERE dedup_key = ? AND doc_id = ?",
                                      [results["dedup"].key, ids[original_uri]]).fetchall()
    assert dropped == [(ids[copy_uri], "exact_duplicate", ids[original_uri])]
    assert original_status == [("kept",)]


def test_split_covers_exactly_the_kept_documents(data):
    cfg, results, _ = data
    m = results["split"].metrics
    assert m["train_docs"] >= 1 and m["val_docs"] >= 1
    assert m["train_docs"] + m["val_docs"] == results["dedup"].metrics["kept"]
    with catalog(cfg) as con:
        split_rows = con.execute("SELECT doc_id, split FROM splits WHERE split_key = ?", [results["split"].key]).fetchall()
        kept = con.execute("SELECT doc_id FROM doc_status WHERE dedup_key = ? AND status = 'kept'",
                           [results["dedup"].key]).fetchall()
        n_bytes = dict(con.execute(
            """SELECT s.split, sum(d.n_bytes) FROM splits s JOIN documents d USING (snapshot, doc_id)
               WHERE s.split_key = ? GROUP BY ALL""", [results["split"].key]).fetchall())
    assert len(split_rows) == len({doc_id for doc_id, _ in split_rows}), "a document is in both splits"
    assert {doc_id for doc_id, _ in split_rows} == {doc_id for (doc_id,) in kept}
    assert {"train": m["train_bytes"], "val": m["val_bytes"]} == n_bytes


def test_an_empty_file_is_accounted_for_whatever_doc_chars(corpus, tmp_path):
    root, _ = corpus
    texts = tmp_path / "texts"
    texts.mkdir()
    (texts / "a.txt").write_text(GOOD_TEXTS["b_json.txt"])
    (texts / "b.txt").write_text(GOOD_TEXTS["e_json_dumps.txt"])
    (texts / "blank.txt").write_text("  \n\n \n")
    cfg = load_config("tiny", [f"workspace={tmp_path / 'ws'}",
                               f"ingest.sources=[{{kind: text_dir, path: {texts}, doc_chars: 400}}]"])
    from pipelines.stages import ingest

    result = ingest.run(cfg, Workspace(cfg.workspace))
    with catalog(cfg) as con:
        reasons = con.execute("SELECT uri, reason FROM quarantine WHERE snapshot = ?", [result.key]).fetchall()
    assert (str(texts / "blank.txt"), "empty") in reasons


def test_rerun_reuses_and_a_new_file_makes_a_new_snapshot(data, corpus):
    cfg, first, expected = data
    again = run_pipeline(cfg, only="split")  # split is forced; what it reads is reused
    assert again["ingest"].reused and again["dedup"].reused and not again["split"].reused
    assert again["split"].metrics == first["split"].metrics
    assert {k: r.key for k, r in again.items()} == {k: r.key for k, r in first.items()}

    root, _ = corpus
    (root / "texts" / "i_new.txt").write_text(inspect.getdoc(shutil.rmtree) + "\n\nAdded later.")
    # a near copy of a jsonl record (textwrap.indent's doc, one line added): a near duplicate of it
    (root / "texts" / "j_near.txt").write_text(inspect.getdoc(textwrap.indent) + "\n\nAdded later.")
    grown = run_pipeline(cfg, only="split")
    assert not grown["ingest"].reused and grown["ingest"].key != first["ingest"].key
    assert grown["ingest"].metrics["read"] == expected["read"] + 2
    assert grown["ingest"].metrics["documents"] == expected["documents"] + 2
    assert grown["dedup"].metrics["kept"] == first["dedup"].metrics["kept"] + 1
    assert grown["dedup"].metrics["dropped_by_reason"] == {"exact_duplicate": 1, "near_duplicate": 1}
    # the old snapshot's rows are still there, untouched
    with catalog(cfg) as con:
        old = con.execute("SELECT count(*) FROM documents WHERE snapshot = ?", [first["ingest"].key]).fetchall()[0][0]
    assert old == expected["documents"]


def test_a_malformed_line_in_a_zst_file_is_quarantined(tmp_path):
    import zstandard

    lines = [json.dumps({"text": GOOD_RECORDS[0]}), '{"text": "an unterminated string}', json.dumps({"text": GOOD_RECORDS[1]})]
    path = tmp_path / "records.jsonl.zst"
    path.write_bytes(zstandard.ZstdCompressor().compress(("\n".join(lines) + "\n").encode()))
    cut = tmp_path / "cut.jsonl.zst"  # a download that stopped half way
    cut.write_bytes(zstandard.ZstdCompressor().compress((json.dumps({"text": GOOD_RECORDS[2]}) + "\n").encode() * 50)[:40])
    cfg = load_config("tiny", [f"workspace={tmp_path / 'ws'}", f"ingest.sources=[{{kind: jsonl, path: {tmp_path}}}]"])
    from pipelines.stages import ingest

    ingest.preflight(cfg)
    result = ingest.run(cfg, Workspace(cfg.workspace))
    m = result.metrics
    assert (m["read"], m["documents"], m["quarantined"]) == (4, 2, 2)
    with catalog(cfg) as con:
        bad = con.execute("SELECT uri, record_no, reason, snippet FROM quarantine WHERE snapshot = ? ORDER BY uri",
                          [result.key]).fetchall()
    assert [(uri, no, reason) for uri, no, reason, _ in bad] == [
        (f"{cut}:1", 1, "unreadable"), (f"{path}:2", 2, "malformed_json")]
    assert "unterminated" in bad[1][3] and "truncated" in bad[0][3]
