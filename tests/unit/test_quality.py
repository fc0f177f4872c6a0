"""Quality rules (DuckDB SQL) and ingest normalization: each rule's own reason, defaults that pass
verse and Python source."""

from __future__ import annotations

import inspect
import json
import sysconfig
from pathlib import Path

import duckdb
import pytest

from pipelines.config import NormalizeConfig, QualityConfig
from pipelines.data.normalize import normalize_text
from pipelines.data.quality import STATS_SQL, reason_sql

VERSE = """HAMLET.
To be, or not to be, that is the question:
Whether 'tis nobler in the mind to suffer
The slings and arrows of outrageous fortune,
Or to take arms against a sea of troubles,
And by opposing end them.

OPHELIA.
Good my lord,
How does your honour for this many a day?

HAMLET.
I humbly thank you; well, well, well."""
PROSE = inspect.getdoc(json.dumps)


def reasons(texts: list[str], cfg: QualityConfig = QualityConfig()) -> list[str | None]:
    con = duckdb.connect()
    con.execute("CREATE TABLE t (i INTEGER, text VARCHAR)")
    con.executemany("INSERT INTO t VALUES (?, ?)", list(enumerate(texts)))
    rows = con.execute(f"SELECT {reason_sql(cfg)} FROM (SELECT i, {STATS_SQL} FROM t) ORDER BY i").fetchall()
    return [r for (r,) in rows]


def test_defaults_pass_verse_prose_and_python_source():
    root = Path(sysconfig.get_paths()["stdlib"])
    sources = [(root / name).read_text()[:4000] for name in ("json/encoder.py", "textwrap.py", "shutil.py", "dataclasses.py")]
    assert reasons([VERSE, PROSE, *sources]) == [None] * 6


@pytest.mark.parametrize("text, cfg, reason", [
    ("just three words", QualityConfig(), "quality:min_words"),
    (PROSE, QualityConfig(max_words=50), "quality:max_words"),
    ("12 34 56 78 90 11 22 33 44 55 66 77 === --- +++", QualityConfig(), "quality:alpha_fraction"),
    ("a b c d e f g h i j k l m n o p", QualityConfig(), "quality:short_words"),
    ("supercalifragilisticexpialidociousandmore " * 3 + "x " * 2, QualityConfig(max_mean_word_length=20), "quality:long_words"),
    ("buy now\n" * 8 + "a real line of text here\n", QualityConfig(), "quality:dup_lines"),
    ("#tag #another #more #hashtags and #so #on ... …", QualityConfig(), "quality:symbol_ratio"),
])
def test_each_rule_has_its_own_reason(text, cfg, reason):
    assert reasons([text], cfg) == [reason]


def test_a_rule_set_to_zero_is_off():
    assert reasons(["just three words"], QualityConfig(min_words=0)) == [None]
    off = QualityConfig(min_words=0, max_words=0, min_alpha_fraction=0, min_mean_word_length=0,
                        max_mean_word_length=0, max_dup_line_fraction=0, max_symbol_word_ratio=0)
    assert reasons(["", "#a #b", "x\nx\nx"], off) == [None, None, None]


def test_normalize_nfc_controls_and_whitespace():
    decomposed = "Cafe\u0301 cre\u0300me"  # e + combining accents
    assert normalize_text(decomposed, NormalizeConfig()) == "Café crème"
    assert normalize_text("a\x00b\x07c\u200bd\ufeff\te\nf", NormalizeConfig()) == "abcd\te\nf"
    assert normalize_text(decomposed, NormalizeConfig(nfc=False)) == decomposed
    assert normalize_text("a\x07b", NormalizeConfig(strip_control=False)) == "a\x07b"
    messy = "line one   \n\n\n\n  line two\t\n"
    assert normalize_text(messy, NormalizeConfig()) == messy  # keep: code indentation matters
    assert normalize_text(messy, NormalizeConfig(whitespace="trim_lines")) == "line one\n\n  line two"
    assert normalize_text(messy, NormalizeConfig(whitespace="collapse")) == "line one line two"
