"""The dedup stage on a small real corpus (standard-library docs) with planted duplicates and junk:
quality drops, exact copies on normalized text, near copies, chains, and the accounting invariant for
every snapshot in the catalog."""

from __future__ import annotations

import inspect
import json
import re
import shutil
import textwrap

import duckdb
import pytest

from pipelines.config import load_config
from pipelines.data import data_report
from pipelines.stages import dedup, ingest
from pipelines.workspace import Workspace

pytestmark = pytest.mark.integration

ORIGINALS = {f"a{i}.txt": inspect.getdoc(f) for i, f in enumerate(
    (json.dumps, json.loads, shutil.copytree, shutil.rmtree, textwrap.wrap, textwrap.dedent, re.sub))}
NEAR = inspect.getdoc(json.dumps).replace("If ``skipkeys`` is true", "If ``skipkeys`` is set")  # one word
assert NEAR != ORIGINALS["a0.txt"]
PLANTED = {
    "b_exact.txt": ORIGINALS["a1.txt"].upper().replace("\n", "  \n "),  # exact after case/space folding
    "c_near.txt": NEAR,
    "d_copy_of_near.txt": NEAR,  # exact copy of a near duplicate: names the kept original
    "e_junk.txt": "#sale #cheap #deal #now #buy #more #click #here #free #win",
}
EXPECTED = {"b_exact.txt": ("exact_duplicate", "a1.txt"), "c_near.txt": ("near_duplicate", "a0.txt"),
            "d_copy_of_near.txt": ("exact_duplicate", "a0.txt"), "e_junk.txt": ("quality:symbol_ratio", None)}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("dedup")
    (root / "texts").mkdir()
    for name, text in {**ORIGINALS, **PLANTED}.items():
        (root / "texts" / name).write_text(text)
    return root


def config(root, *overrides):
    return load_config("tiny", [f"workspace={root / 'ws'}",
                                f"ingest.sources=[{{kind: text_dir, path: {root / 'texts'}, doc_chars: 0}}]", *overrides])


def catalog(cfg):
    return Workspace(cfg.workspace).duckdb(read_only=True)


def statuses(cfg, result) -> dict[str, tuple]:
    with catalog(cfg) as con:
        rows = con.execute(
            """SELECT d.uri, s.status, s.reason, o.uri FROM doc_status s
               JOIN documents d USING (snapshot, doc_id)
               LEFT JOIN documents o ON o.snapshot = s.snapshot AND o.doc_id = s.duplicate_of
               WHERE s.dedup_key = ?""", [result.key]).fetchall()
    return {uri.rsplit("/", 1)[-1]: (status, reason, dup and dup.rsplit("/", 1)[-1]) for uri, status, reason, dup in rows}


def test_every_drop_has_its_reason_and_names_a_kept_original(corpus):
    cfg = config(corpus)
    ws = Workspace(cfg.workspace)
    ing = ingest.run(cfg, ws)
    result = dedup.run(cfg, ws, ing)
    got = statuses(cfg, result)
    assert {name: (reason, dup) for name, (status, reason, dup) in got.items() if status == "dropped"} == EXPECTED
    assert all(got[name] == ("kept", None, None) for name in ORIGINALS)
    m = result.metrics
    assert m["kept"] == len(ORIGINALS) and m["read"] == len(ORIGINALS) + len(PLANTED)
    assert m["dropped_by_reason"] == {"exact_duplicate": 2, "near_duplicate": 1, "quality:symbol_ratio": 1}
    assert m["near_clusters"] == 1 and m["near_verified_pairs"] == 1


def test_exact_method_keeps_near_duplicates(corpus):
    cfg = config(corpus, "dedup.method=exact")
    ws = Workspace(cfg.workspace)
    result = dedup.run(cfg, ws, ingest.run(cfg, ws))
    got = statuses(cfg, result)
    assert got["c_near.txt"] == ("kept", None, None)
    assert got["d_copy_of_near.txt"] == ("dropped", "exact_duplicate", "c_near.txt")
    assert "near_clusters" not in result.metrics


def test_accounting_holds_for_every_snapshot(corpus):
    cfg = config(corpus)
    ws = Workspace(cfg.workspace)
    first = ingest.run(cfg, ws)
    dedup.run(cfg, ws, first)
    (corpus / "texts" / "f_new.txt").write_bytes(b"caf\xe9 in latin-1, refused at ingest")
    (corpus / "texts" / "g_new.txt").write_text(inspect.getdoc(textwrap.fill))
    second = ingest.run(cfg, ws)
    dedup.run(cfg, ws, second)
    dedup.run(config(corpus, "dedup.quality.min_words=100"), ws, second)  # a second dedup run of one snapshot
    with catalog(cfg) as con:
        entries = data_report.accounting(con)
    assert {e["snapshot"] for e in entries} == {first.key, second.key}
    assert len(entries) >= 3  # snapshot 1 x near (+ exact, from the test above), snapshot 2 x (near, min_words=100)
    for e in entries:
        assert e["read"] == e["documents"] + e["quarantined"]
        assert e["documents"] == e["kept"] + sum(e["dropped_by_reason"].values()), e
    newest = [e for e in entries if e["snapshot"] == second.key]
    assert {e["quarantined_by_reason"].get("bad_encoding") for e in newest} == {1}
    strict = [e for e in newest if "quality:min_words" in e["dropped_by_reason"]]
    assert strict and strict[0]["dropped_by_reason"]["quality:min_words"] > 0


def test_data_report_command_prints_the_accounting(corpus, capsys):
    from flows.cli import main

    cfg = config(corpus)
    ws = Workspace(cfg.workspace)
    dedup.run(cfg, ws, ingest.run(cfg, ws))
    assert main(["data", "report", "--workspace", str(ws.root)]) == 0
    out = capsys.readouterr().out
    assert "dropped: near_duplicate" in out and "dropped: quality:symbol_ratio" in out
    assert "read == quarantined + kept + dropped" in out and " NO " not in out
    assert main(["data", "report", "--workspace", str(corpus / "nowhere")]) == 2


def test_data_report_marks_the_latest_snapshot_and_shows_sources_and_examples(tmp_path, capsys):
    from flows.cli import main

    texts = tmp_path / "texts"
    texts.mkdir()
    for name, text in {**ORIGINALS, **PLANTED}.items():
        (texts / name).write_text(text)
    (tmp_path / "more.jsonl").write_text(json.dumps({"text": ORIGINALS["a5.txt"]}) + "\n" + json.dumps({"text": 7}) + "\n")
    sources = (f"ingest.sources=[{{kind: text_dir, name: docs, path: {texts}, doc_chars: 0}}, "
               f"{{kind: jsonl, name: lines, path: {tmp_path / 'more.jsonl'}}}]")
    cfg = load_config("tiny", [f"workspace={tmp_path / 'ws'}", sources])
    ws = Workspace(cfg.workspace)
    first = ingest.run(cfg, ws)
    dedup.run(cfg, ws, first)
    (texts / "f_new.txt").write_bytes(b"caf\xe9 in latin-1, refused at ingest")
    second = ingest.run(cfg, ws)
    dedup.run(cfg, ws, second)

    assert main(["data", "report", "--workspace", str(ws.root), "--json", "--examples", "2"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["latest_snapshot"] == second.key
    newest, oldest = report["entries"][0], report["entries"][-1]
    assert (newest["snapshot"], newest["latest"], oldest["snapshot"], oldest["latest"]) == (second.key, True, first.key, False)
    assert newest["created_at"] >= oldest["created_at"]
    by_source = newest["per_source"]
    assert by_source["lines"] == {"read": 2, "quarantined": 1, "documents": 1, "kept": 0, "dropped": 1}  # a5 copy
    assert by_source["docs"]["quarantined"] == 1 and by_source["docs"]["kept"] == len(ORIGINALS)
    assert sum(row["read"] for row in by_source.values()) == newest["read"]
    assert sum(row["kept"] for row in by_source.values()) == newest["kept"]
    assert {(x["reason"], x["uri"].rsplit("/", 1)[-1]) for x in newest["quarantine_examples"]} == {
        ("bad_encoding", "f_new.txt"), ("wrong_type", "more.jsonl:2")}  # uri names the line
    pairs = {(x["reason"], x["uri"].rsplit("/", 1)[-1], x["kept_uri"].rsplit("/", 1)[-1]): x["similarity"]
             for x in newest["duplicate_examples"]}
    assert pairs[("exact_duplicate", "b_exact.txt", "a1.txt")] == 1.0
    assert 0.8 <= pairs[("near_duplicate", "c_near.txt", "a0.txt")] < 1.0
    assert newest["similarity"] == f"Jaccard of {cfg.dedup.near.ngram}-word shingles"  # the width the run judged with
    assert len([k for k in pairs if k[0] == "exact_duplicate"]) == 2  # --examples 2 of the 3 exact copies

    assert main(["data", "report", "--workspace", str(ws.root)]) == 0
    out = capsys.readouterr().out
    assert f"snapshot {second.key}" in out and "(latest)" in out and "per source" in out
    assert "duplicates, examples" in out and "bad_encoding" in out


def test_documents_overlapping_an_eval_set_are_dropped(corpus, tmp_path):
    from lm_core.typed_config import ConfigError

    copytree = ORIGINALS["a2.txt"].split()
    wrap = ORIGINALS["a4.txt"].split()
    evals = tmp_path / "evals"
    evals.mkdir()
    # 20 words lifted from copytree's doc: contaminates; 10 words of wrap's doc: below the 13-gram bar
    (evals / "q1.txt").write_text("Question: " + " ".join(copytree[30:50]) + " Answer: yes")
    (evals / "q2.txt").write_text("Another question about " + " ".join(wrap[5:15]) + " and nothing else")
    cfg = config(corpus, f"dedup.decontaminate=[{{name: mini_eval, path: {evals}}}]")
    ws = Workspace(cfg.workspace)
    ingest.preflight(cfg)
    result = dedup.run(cfg, ws, ingest.run(cfg, ws))
    got = statuses(cfg, result)
    assert got["a2.txt"] == ("dropped", "contaminates:mini_eval", None)
    assert got["a4.txt"] == ("kept", None, None)
    assert result.metrics["contaminated"] == 1
    assert result.key != dedup.key(config(corpus), ingest.run(cfg, ws))
    (evals / "q3.txt").write_text("a new eval question changes the dedup key")
    assert dedup.key(cfg, ingest.run(cfg, ws)) != result.key

    missing = config(corpus, f"dedup.decontaminate=[{{name: gone, path: {tmp_path / 'nope'}}}]")
    with pytest.raises(ConfigError, match="does not exist"):
        ingest.preflight(missing)


def test_ingest_tables_and_oversized_documents_are_accounted(tmp_path):
    import gzip

    with duckdb.connect() as con:
        con.execute("CREATE TABLE t (body VARCHAR)")
        con.executemany("INSERT INTO t VALUES (?)", [[ORIGINALS["a0.txt"]], [None], [ORIGINALS["a3.txt"] * 10]])
        con.execute(f"COPY t TO '{tmp_path / 'rows.parquet'}' (FORMAT parquet)")
    with gzip.open(tmp_path / "more.jsonl.gz", "wt") as f:
        f.write(json.dumps({"text": ORIGINALS["a5.txt"]}) + "\n" + json.dumps({"text": ["a", "list"]}) + "\n")
    sources = (f"[{{kind: parquet, name: table, path: {tmp_path / 'rows.parquet'}, text_field: body, doc_chars: 0}}, "
               f"{{kind: jsonl, name: lines, path: {tmp_path / 'more.jsonl.gz'}}}]")
    cfg = load_config("tiny", [f"workspace={tmp_path / 'ws'}", f"ingest.sources={sources}", "ingest.max_chars=5000"])
    ingest.preflight(cfg)
    m = ingest.run(cfg, Workspace(cfg.workspace)).metrics
    assert (m["read"], m["documents"]) == (5, 2)
    assert m["quarantine_reasons"] == {"missing_field": 1, "too_long": 1, "wrong_type": 1}


def test_incremental_snapshot_is_judged_against_what_was_kept(tmp_path):
    texts = tmp_path / "texts"
    texts.mkdir()
    for name, text in {**ORIGINALS, **PLANTED}.items():
        (texts / name).write_text(text)
    overrides = [f"workspace={tmp_path / 'ws'}", f"ingest.sources=[{{kind: text_dir, path: {texts}, doc_chars: 0}}]",
                 "dedup.incremental=true"]
    cfg = load_config("tiny", overrides)
    ws = Workspace(cfg.workspace)
    first = dedup.run(cfg, ws, ingest.run(cfg, ws))
    assert first.metrics["incremental_base"] is None and first.metrics["inherited"] == 0
    assert {k: v for k, v in statuses(cfg, first).items() if v[0] == "dropped"} == {
        name: ("dropped", *reason) for name, reason in EXPECTED.items()}

    # new files: one new text, a near copy of an old kept doc, an exact copy of another, and a near copy
    # of a0 whose uri sorts first (a full run would keep it and drop a0; old verdicts stand instead)
    (texts / "h_new.txt").write_text(inspect.getdoc(textwrap.fill))
    (texts / "i_near_old.txt").write_text(ORIGINALS["a2.txt"].replace("return the destination", "return that destination", 1))
    (texts / "j_exact_old.txt").write_text(ORIGINALS["a3.txt"].lower())
    (texts / "0_first.txt").write_text(ORIGINALS["a0.txt"].replace("If ``ensure_ascii``", "When ``ensure_ascii``", 1))
    second_ingest = ingest.run(cfg, ws)
    second = dedup.run(cfg, ws, second_ingest)
    m = second.metrics
    assert m["incremental_base"] == first.key
    assert m["inherited"] == len(ORIGINALS) + len(PLANTED)  # every old document keeps its verdict
    got = statuses(cfg, second)
    assert got["h_new.txt"] == ("kept", None, None)
    assert got["i_near_old.txt"] == ("dropped", "near_duplicate", "a2.txt")
    assert got["j_exact_old.txt"] == ("dropped", "exact_duplicate", "a3.txt")
    assert got["0_first.txt"] == ("dropped", "near_duplicate", "a0.txt")
    assert all(got[name] == ("kept", None, None) for name in ORIGINALS)
    assert m["read"] == m["kept"] + m["dropped"] == len(ORIGINALS) + len(PLANTED) + 4

    full = load_config("tiny", overrides[:2])  # the same snapshot judged whole: a0 loses to 0_first
    assert statuses(full, dedup.run(full, ws, second_ingest))["a0.txt"] == ("dropped", "near_duplicate", "0_first.txt")
    other = load_config("tiny", [*overrides, "dedup.near.threshold=0.7"])  # another config: no base to build on
    assert dedup.run(other, ws, second_ingest).metrics["incremental_base"] is None


@pytest.mark.slow
def test_the_data_report_goes_beside_the_output_and_to_mlflow(corpus, tmp_path):
    import mlflow
    from mlflow import MlflowClient

    cfg = config(corpus)
    ws = Workspace(cfg.workspace)
    result = dedup.run(cfg, ws, ingest.run(cfg, ws), force=True)
    report = json.loads((result.dir / data_report.REPORT_JSON).read_text())
    assert report["kept"] == result.metrics["kept"] and report["dropped_by_reason"] == result.metrics["dropped_by_reason"]
    assert sum(h["kept"] + h["dropped"] for h in report["length_histogram"]) == result.metrics["read"]
    md = data_report.stage_markdown(result)
    assert "| dropped: near_duplicate | 1 |" in md and "| read == quarantined + kept + dropped | yes |" in md
    png = (result.dir / data_report.REPORT_PNG).read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 5000

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    client = MlflowClient(tracking_uri=uri)
    experiment = client.create_experiment("data", artifact_location=(tmp_path / "artifacts").as_uri())
    with mlflow.start_run(experiment_id=experiment) as parent:
        with mlflow.start_run(experiment_id=experiment, run_name="dedup", nested=True) as run:
            data_report.log_to_mlflow(result)
    logged = {a.path for a in client.list_artifacts(run.info.run_id, "data")}
    assert logged == {"data/accounting.json", "data/length_histogram.json", "data/data_report.png"}
    table = json.loads(open(client.download_artifacts(run.info.run_id, "data/accounting.json", str(tmp_path))).read())
    counts = {(what, reason): n for what, reason, n in table["data"]}
    assert counts[("kept", "")] == result.metrics["kept"] and counts[("dropped", "near_duplicate")] == 1
    assert counts[("read", "")] == sum(n for (what, _), n in counts.items() if what != "read")
    assert not client.list_artifacts(parent.info.run_id, "data")


def test_the_earliest_copy_in_source_order_is_kept(tmp_path):
    """Line 9 of a JSONL file comes before line 10 (not after, as the strings ':10' < ':9' would have it),
    chunk #9 before chunk #10, and an earlier source in ingest.sources before a later one."""
    texts = [f"document number {i} about {w} with enough words to pass the quality rules easily today"
             for i, w in enumerate(["apples", "pears", "plums", "figs", "dates", "limes", "kiwis", "grapes"])]
    dup = "a duplicated paragraph that appears twice in the file and once in another source to test ordering"
    lines = texts + [dup, dup]  # lines 9 and 10
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in lines))
    chunks = "\n\n".join([f"chunk {i} of a long text file, different words each time: {w} {w} {w} and more filler"
                          for i, w in enumerate("abcdefghi")] + ["the same closing chunk appears twice here"] * 2)
    (tmp_path / "texts").mkdir()
    (tmp_path / "texts" / "book.txt").write_text(chunks)
    sources = (f"ingest.sources=[{{kind: jsonl, name: first, path: {tmp_path / 'a.jsonl'}}}, "
               f"{{kind: text_dir, name: later, path: {tmp_path / 'texts'}, doc_chars: 60}}, "
               f"{{kind: jsonl, name: again, path: {tmp_path / 'a.jsonl'}}}]")
    cfg = load_config("tiny", [f"workspace={tmp_path / 'ws'}", sources, "ingest.min_chars=10"])
    ws = Workspace(cfg.workspace)
    result = dedup.run(cfg, ws, ingest.run(cfg, ws))
    with catalog(cfg) as con:
        rows = dict(con.execute("""SELECT d.source || ' ' || d.uri, s.status FROM doc_status s
                                   JOIN documents d USING (snapshot, doc_id) WHERE s.dedup_key = ?""",
                                [result.key]).fetchall())
    a = tmp_path / "a.jsonl"
    assert rows[f"first {a}:9"] == "kept" and rows[f"first {a}:10"] == "dropped"
    assert rows[f"again {a}:9"] == "dropped" and rows[f"again {a}:1"] == "dropped"  # the earlier source wins
    book = [k for k in rows if k.startswith("later ") and "#" in k]
    kept = sorted(int(k.rsplit("#", 1)[1]) for k in book if rows[k] == "kept")
    assert 9 in kept and 10 not in kept, sorted(book)
