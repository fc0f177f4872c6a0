"""Ingest partitions scale with bytes, not files: small files are grouped (per directory, ~partition_bytes
each, cut points chosen by file name), an edit regroups only its neighbourhood, a group reads as its files
do, and a large text file is cut into the same documents block by block as when read whole."""

from __future__ import annotations

import os
import random
import re

import pytest

from pipelines.config import SourceConfig
from pipelines.data import documents
from pipelines.data.sources import read_partition, read_source, source_partitions

CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u200b-\u200f\u202a-\u202e\u2060-\u2064\ufeff]")  # normalize's definition
WORDS = "the quick brown fox jumps over a lazy dog while seven wise owls watch from an old oak".split()


def paragraph(rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randrange(5, 60)))


@pytest.fixture
def many_files(tmp_path):
    """300 small files in three directories."""
    rng = random.Random(0)
    root = tmp_path / "many"
    for d in ("a", "b", "b/c"):
        (root / d).mkdir(parents=True, exist_ok=True)
        for i in range(100):
            (root / d / f"f{i:03d}.txt").write_text("\n\n".join(paragraph(rng) for _ in range(rng.randrange(1, 6))))
    return root


def groups(root, budget: int) -> list[tuple[str, ...]]:
    return [files for files, _ in source_partitions(SourceConfig(kind="text_dir", path=str(root), doc_chars=0), budget)]


def test_small_files_are_grouped_by_directory_and_size(many_files, tmp_path):
    total = sum(f.stat().st_size for f in many_files.rglob("*.txt"))
    got = groups(many_files, budget=total // 20)
    assert 6 <= len(got) <= 80  # ~20 groups of ~budget bytes, not 300 partitions
    assert all(len({os.path.dirname(f) for f in g}) == 1 for g in got)  # never across directories
    flat = [f for g in got for f in g]
    assert flat == sorted(flat, key=lambda f: tuple(f.split(os.sep))) and len(flat) == 300  # every file once, in order
    src = SourceConfig(kind="text_dir", path=str(many_files), doc_chars=300)
    by_group = [(r.uri, r.text) for files, _ in source_partitions(src, total // 20) for r in read_partition(src, files, tmp_path)]
    assert by_group == [(r.uri, r.text) for r in read_source(src, tmp_path)]


def test_an_edit_or_a_new_file_regroups_only_its_neighbourhood(many_files):
    budget = sum(f.stat().st_size for f in many_files.rglob("*.txt")) // 20
    before = groups(many_files, budget)
    (many_files / "b" / "f050.txt").write_text("an edited file, now of another size " * 5)
    (many_files / "a" / "f050b.txt").write_text("a new file among the others " * 3)
    after = groups(many_files, budget)
    changed = set(before) ^ set(after)
    assert 2 <= len(changed) <= 6, changed  # the groups holding (or next to) the two files; the rest keep their keys
    assert len(set(before) & set(after)) >= len(before) - 4


@pytest.mark.parametrize("doc_chars", [40, 500, 100_000])
def test_a_large_file_streamed_in_blocks_gives_the_whole_file_documents(tmp_path, monkeypatch, doc_chars):
    rng = random.Random(doc_chars)
    breaks = ["\n\n", "\r\n\r\n", "\n \t\n", "\n\n\n", "\r\n \n"]
    body = "".join(paragraph(rng) + rng.choice([" naïve café — ünïcode", "", "\r\nline two"]) + rng.choice(breaks)
                   for _ in range(400))
    path = tmp_path / "big.txt"
    path.write_bytes(("\n\n" + body).encode("utf-8"))
    src = SourceConfig(kind="text_dir", path=str(path), doc_chars=doc_chars)
    whole = [(r.uri, r.text, r.reason, r.record_no) for r in read_source(src, tmp_path)]
    for block in (7, 64, 4096):  # blocks that split words, \r\n pairs, paragraph breaks and UTF-8 sequences
        monkeypatch.setattr(documents, "STREAM_BYTES", 100)
        monkeypatch.setattr(documents, "STREAM_BLOCK", block)
        assert [(r.uri, r.text, r.reason, r.record_no) for r in read_source(src, tmp_path)] == whole


def test_streamed_blank_and_broken_files_are_refused_with_a_reason(tmp_path, monkeypatch):
    monkeypatch.setattr(documents, "STREAM_BYTES", 10)
    monkeypatch.setattr(documents, "STREAM_BLOCK", 16)
    (tmp_path / "blank.txt").write_text(" \n\n \t\n" * 20)
    (tmp_path / "broken.txt").write_bytes(b"first paragraph here\n\n" * 4 + b"bad \xff byte\n\nafter")
    reasons = {(os.path.basename(r.uri), r.reason) for r in read_source(SourceConfig(kind="text_dir", path=str(tmp_path), doc_chars=30),
                                                                        tmp_path) if r.text is None}
    assert reasons == {("blank.txt", "empty"), ("broken.txt#1", "bad_encoding")}  # after chunk #0


def test_ascii_fast_paths_of_normalization_equal_the_general_ones():
    """normalize_text and exact_key take byte-level shortcuts for ASCII text; they must agree with the regex
    and str.split() definitions on every ASCII character, controls and \\x1c-\\x1f included."""
    import hashlib

    from pipelines.config import NormalizeConfig
    from pipelines.data import normalize

    rng = random.Random(0)
    alphabet = [chr(i) for i in range(128)]
    for _ in range(5000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 40)))
        assert normalize.exact_key(text) == hashlib.md5(" ".join(text.lower().split()).encode()).hexdigest(), repr(text)
        assert normalize.normalize_text(text, NormalizeConfig()) == CONTROL.sub("", text), repr(text)


def test_exact_key_equals_split_and_join_on_unicode_text():
    """exact_key must equal md5(" ".join(text.lower().split())) over every character str.split() splits on,
    runs of spaces and letters whose case changes."""
    import hashlib
    import sys

    from pipelines.data import normalize

    spaces = [chr(i) for i in range(sys.maxunicode + 1) if chr(i).isspace()]
    cased = list("\u00e9\u00c5\u00df\u0130\u03a3\u03c2\u2019\u201c\u20ac\u01c5\u1e9e")
    alphabet = [chr(i) for i in range(128)] + spaces + cased + [" "] * 20
    rng = random.Random(1)
    for _ in range(5000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 60)))
        assert normalize.exact_key(text) == hashlib.md5(" ".join(text.lower().split()).encode()).hexdigest(), repr(text)
