"""Unit tests for pipelines.data.sources on files in a temp dir (and the offline stdlib source); no network."""

from __future__ import annotations

import json

import pytest

from pipelines.config import ConfigError, SourceConfig
from pipelines.data.sources import WHOLE_SOURCE, check_source, read_partition, read_source, source_fingerprint, source_partitions


def read(src: SourceConfig, tmp_path) -> list:
    return list(read_source(src, tmp_path / "downloads"))


def text_dir(path, **kw) -> SourceConfig:
    return SourceConfig(kind="text_dir", path=str(path), **kw)


def jsonl(path, **kw) -> SourceConfig:
    return SourceConfig(kind="jsonl", path=str(path), **kw)


PARAGRAPHS = [f"paragraph {i} " + "word " * 12 for i in range(10)]  # ~70 chars each


@pytest.fixture
def corpus(tmp_path):
    root = tmp_path / "corpus"
    (root / "nested").mkdir(parents=True)
    (root / "a.txt").write_text("\n\n".join(PARAGRAPHS))
    (root / "nested" / "b.txt").write_text("second file\r\nwith windows line ends\n")
    (root / "ignored.md").write_text("not a .txt file")
    return root


def test_text_dir_one_document_per_file(corpus, tmp_path):
    records = read(text_dir(corpus, doc_chars=0), tmp_path)
    assert [r.uri for r in records] == [str(corpus / "a.txt"), str(corpus / "nested" / "b.txt")]
    assert all(r.reason is None and r.source == "text_dir" for r in records)
    assert records[0].text == "\n\n".join(PARAGRAPHS)
    assert records[1].text == "second file\nwith windows line ends\n"  # line ends normalised


def test_text_dir_chunks_keep_all_text(corpus, tmp_path):
    records = read(text_dir(corpus, doc_chars=200, name="mine"), tmp_path)
    a = [r for r in records if r.uri.startswith(str(corpus / "a.txt"))]
    assert len(a) > 2
    assert [r.uri for r in a] == [f"{corpus / 'a.txt'}#{i}" for i in range(len(a))]
    assert all(r.source == "mine" for r in records)
    # chunks are cut at blank lines only, and together hold every paragraph in order
    assert "\n\n".join(r.text for r in a) == "\n\n".join(PARAGRAPHS)
    assert all(len(r.text) >= 200 - 2 for r in a[:-1])  # "about" doc_chars: the last separator is not counted


def test_text_dir_single_file_and_glob(corpus, tmp_path):
    assert len(read(text_dir(corpus / "a.txt", doc_chars=0), tmp_path)) == 1
    records = read(text_dir(corpus, doc_chars=0, glob="*.md"), tmp_path)
    assert [r.text for r in records] == ["not a .txt file"]


def test_bad_encoding_and_binary_files_are_refused(tmp_path):
    root = tmp_path / "bad"
    root.mkdir()
    (root / "latin1.txt").write_bytes("caf\xe9 au lait".encode("latin-1"))
    (root / "blob.txt").write_bytes(b"\x7fELF\x00\x01\x02 binary")
    (root / "ok.txt").write_text("fine text")
    records = {r.uri.rsplit("/", 1)[-1]: r for r in read(text_dir(root, doc_chars=0), tmp_path)}
    assert records["latin1.txt"].text is None and records["latin1.txt"].reason == "bad_encoding"
    assert "caf" in records["latin1.txt"].snippet
    assert records["blob.txt"].text is None and records["blob.txt"].reason == "binary"
    assert records["ok.txt"].text == "fine text" and records["ok.txt"].reason is None


def test_jsonl_records_and_refusals(tmp_path):
    path = tmp_path / "data.jsonl"
    lines = [
        json.dumps({"text": "first document", "id": 1}),
        '{"text": "unterminated',
        "",
        json.dumps({"body": "no text field"}),
        json.dumps({"text": 5}),
        json.dumps(["not", "an", "object"]),
        json.dumps({"text": "héllo 漢字"}),
    ]
    path.write_bytes(("\n".join(lines) + "\n").encode("utf-8") + b'{"text": "\xff\xfe"}\n')
    records = read(jsonl(path), tmp_path)
    got = [(r.uri.rsplit(":", 1)[-1], r.text, r.reason) for r in records]
    assert got == [
        ("1", "first document", None),
        ("2", None, "malformed_json"),
        ("4", None, "missing_field"),
        ("5", None, "wrong_type"),
        ("6", None, "missing_field"),
        ("7", "héllo 漢字", None),
        ("8", None, "malformed_json"),
    ]


def test_jsonl_custom_field_and_directory(tmp_path):
    root = tmp_path / "many"
    (root / "x").mkdir(parents=True)
    (root / "1.jsonl").write_text(json.dumps({"content": "one"}) + "\n")
    (root / "x" / "2.jsonl").write_text(json.dumps({"content": "two"}) + "\n")
    (root / "skip.json").write_text(json.dumps({"content": "never"}) + "\n")
    assert [r.text for r in read(jsonl(root, text_field="content"), tmp_path)] == ["one", "two"]


def test_max_docs_counts_documents_not_refusals(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(['{"text": "a"}', "not json", '{"text": "b"}', '{"text": "c"}']) + "\n")
    records = read(jsonl(path, max_docs=2), tmp_path)
    assert [(r.text, r.reason) for r in records] == [("a", None), (None, "malformed_json"), ("b", None)]


def test_check_source_missing_path(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(ConfigError) as err:
        check_source(text_dir(missing))
    assert str(missing) in str(err.value) and "does not exist" in str(err.value)


def test_check_source_no_matching_files(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.md").write_text("x")
    with pytest.raises(ConfigError) as err:
        check_source(text_dir(tmp_path / "empty"))
    assert str(tmp_path / "empty") in str(err.value) and "**/*.txt" in str(err.value)
    with pytest.raises(ConfigError, match=r"no files match \*\.jsonl"):
        check_source(jsonl(tmp_path / "empty"))


def test_check_source_all_files_empty(tmp_path):
    (tmp_path / "e").mkdir()
    (tmp_path / "e" / "a.txt").write_text("")
    with pytest.raises(ConfigError, match="every file under .* is empty"):
        check_source(text_dir(tmp_path / "e"))


def test_check_source_accepts_a_good_dir_and_builtin_sources(corpus):
    check_source(text_dir(corpus))
    check_source(SourceConfig(kind="stdlib"))


def test_fingerprint_follows_the_files(corpus):
    src = text_dir(corpus)
    before = source_fingerprint(src)
    assert [f[0] for f in before] == [str(corpus / "a.txt"), str(corpus / "nested" / "b.txt")]
    (corpus / "nested" / "b.txt").write_text("changed, and longer than before")
    assert source_fingerprint(src) != before
    assert source_fingerprint(SourceConfig(kind="stdlib")) == source_fingerprint(SourceConfig(kind="stdlib"))


def test_stdlib_source_yields_documents(tmp_path):
    records = read(SourceConfig(kind="stdlib", doc_chars=2000, max_docs=5), tmp_path)
    docs = [r for r in records if r.text is not None]
    assert len(docs) == 5
    assert all(r.uri.startswith("stdlib:") and r.source == "stdlib" for r in docs)
    assert all(r.text.strip() for r in docs)
    assert not (tmp_path / "downloads").exists()  # nothing fetched


def test_jsonl_gz(tmp_path):
    import gzip

    path = tmp_path / "d.jsonl.gz"
    with gzip.open(path, "wt") as f:
        f.write(json.dumps({"text": "zipped one"}) + "\n" + "{broken\n")
    records = read(jsonl(tmp_path), tmp_path)
    assert [(r.uri, r.text, r.reason) for r in records] == [
        (f"{path}:1", "zipped one", None), (f"{path}:2", None, "malformed_json")]
    check_source(jsonl(tmp_path))


def _table_files(tmp_path):
    import duckdb

    with duckdb.connect() as con:
        con.execute("""CREATE TABLE t AS SELECT * FROM (VALUES (1, 'first row text', 2.5), (2, NULL, 1.0),
                                                               (3, 'third row', 0.0), (4, '', 3.0)) v(id, body, score)""")
        con.execute(f"COPY t TO '{tmp_path / 'd.parquet'}' (FORMAT parquet)")
        con.execute(f"COPY t TO '{tmp_path / 'd.csv'}' (FORMAT csv, HEADER)")


@pytest.mark.parametrize("kind", ["parquet", "csv"])
def test_table_sources_rows_and_refusals(tmp_path, kind):
    _table_files(tmp_path)
    src = SourceConfig(kind=kind, path=str(tmp_path / f"d.{kind}"), text_field="body", doc_chars=0)
    check_source(src)
    got = [(r.uri.rsplit(":", 1)[-1], r.text, r.reason) for r in read(src, tmp_path)]
    # CSV has no NULL apart from the empty field, so an empty string reads back as NULL
    last = ("4", None, "empty") if kind == "parquet" else ("4", None, "missing_field")
    assert got == [("1", "first row text", None), ("2", None, "missing_field"), ("3", "third row", None), last]
    assert read(src, tmp_path)[0].uri == f"{tmp_path / f'd.{kind}'}:1"
    wrong = SourceConfig(kind=kind, path=str(tmp_path / f"d.{kind}"), text_field="score")
    assert {r.reason for r in read(wrong, tmp_path)} == {"wrong_type"}
    assert source_fingerprint(src)[0][0] == str(tmp_path / f"d.{kind}")


def test_table_source_errors_before_work(tmp_path):
    _table_files(tmp_path)
    with pytest.raises(ConfigError, match="no column 'text'.*columns: id, body, score"):
        check_source(SourceConfig(kind="parquet", path=str(tmp_path / "d.parquet")))
    with pytest.raises(ConfigError, match="does not exist"):
        check_source(SourceConfig(kind="csv", path=str(tmp_path / "missing.csv"), text_field="body"))


def test_jsonl_zst_and_a_truncated_one(tmp_path):
    import zstandard

    path = tmp_path / "d.jsonl.zst"
    data = zstandard.ZstdCompressor().compress((json.dumps({"text": "squeezed one"}) + "\n{broken\n").encode())
    path.write_bytes(data)
    records = read(jsonl(tmp_path), tmp_path)
    assert [(r.uri, r.text, r.reason, r.record_no) for r in records] == [
        (f"{path}:1", "squeezed one", None, 1), (f"{path}:2", None, "malformed_json", 2)]
    check_source(jsonl(tmp_path))
    path.write_bytes(data[: len(data) // 2])  # cut mid-frame: the rest of the file is unreadable, not a crash
    (reason,) = {r.reason for r in read(jsonl(path), tmp_path) if r.text is None}
    assert reason == "unreadable"


def test_partitions_are_groups_of_files_unless_the_source_is_whole(corpus, tmp_path):
    src = text_dir(corpus, doc_chars=0)
    parts = source_partitions(src, 1)  # a 1-byte budget: every file is its own partition
    assert [files for files, _ in parts] == [(str(corpus / "a.txt"),), (str(corpus / "nested" / "b.txt"),)]
    by_file = [r for files, _ in parts for r in read_partition(src, files, tmp_path)]
    assert [(r.uri, r.text) for r in by_file] == [(r.uri, r.text) for r in read(src, tmp_path)]
    # a large budget still never groups across directories
    assert [files for files, _ in source_partitions(src, 1 << 30)] == [files for files, _ in parts]
    for whole in (text_dir(corpus, max_docs=1), SourceConfig(kind="stdlib"),
                  SourceConfig(kind="parquet", path="s3://bucket/corpus/*.parquet")):
        assert [files for files, _ in source_partitions(whole, 1 << 20)] == [(WHOLE_SOURCE,)]


def test_remote_uris_pass_through_preflight(tmp_path):
    remote = SourceConfig(kind="parquet", path="https://example.org/corpus.parquet", text_field="body")
    check_source(remote)  # no network at preflight: DuckDB reads (and checks) it at ingest, online
    assert source_fingerprint(remote) == [remote.path]
    with pytest.raises(ConfigError, match="remote URI.*kind: parquet or csv"):
        check_source(jsonl("hf://datasets/someone/corpus/data.jsonl"))
