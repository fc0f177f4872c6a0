"""Quality rules as DuckDB SQL: per-document statistics in one vectorized pass, then the first rule a
document fails names its drop reason (`quality:<rule>`). Rules are checked in the order of RULES.

Words are whitespace-separated tokens (so `self.assertEqual(x,` is one word of Python source); symbols
are words that start with `#` (hashtags, comment markers), `...` and `…`.
"""

from __future__ import annotations

from typing import Any

from pipelines.config import QualityConfig

# per-document statistics, over a relation with a `text` column (runs, `+`, are removed in one step each:
# the same result as removing characters one at a time, ~2.5x faster)
STATS_SQL = r"""
    list_filter(string_split_regex(text, '\s+'), lambda w: w <> '') AS words,
    len(words) AS n_words,
    length(text) AS n_chars,
    length(regexp_replace(text, '[^\pL]+', '', 'g')) AS n_alpha,
    length(regexp_replace(text, '\s+', '', 'g')) AS n_nonspace,
    list_filter(string_split(text, chr(10)), lambda l: trim(l) <> '') AS lines,
    len(list_filter(words, lambda w: starts_with(w, '#')))
      + (length(text) - length(replace(text, '...', ''))) // 3
      + (length(text) - length(replace(text, '…', ''))) AS n_symbols
"""

# rule name -> (config field, SQL condition that FAILS the rule; {v} is the configured value)
RULES: dict[str, tuple[str, str]] = {
    "min_words": ("min_words", "n_words < {v}"),
    "max_words": ("max_words", "n_words > {v}"),
    "alpha_fraction": ("min_alpha_fraction", "n_alpha < {v} * n_chars"),
    "short_words": ("min_mean_word_length", "n_nonspace < {v} * n_words"),
    "long_words": ("max_mean_word_length", "n_nonspace > {v} * n_words"),
    "dup_lines": ("max_dup_line_fraction", "len(lines) - len(list_distinct(lines)) > {v} * len(lines)"),
    "symbol_ratio": ("max_symbol_word_ratio", "n_symbols > {v} * n_words"),
}


def reason_sql(cfg: QualityConfig) -> str:
    """A SQL expression over STATS_SQL's columns: NULL when every rule passes, else 'quality:<rule>'."""
    cases = []
    for name, (field, condition) in RULES.items():
        value = getattr(cfg, field)
        if value:  # 0 / None switch a rule off
            cases.append(f"WHEN {condition.format(v=float(value))} THEN 'quality:{name}'")
    return f"CASE {' '.join(cases)} ELSE NULL END" if cases else "CAST(NULL AS VARCHAR)"


def stats(con: Any, relation_sql: str, params: list | None = None) -> list[tuple]:
    """(n_words, alpha fraction, mean word length, dup-line fraction, symbol/word) per row: for tuning."""
    return con.execute(
        f"""SELECT n_words, n_alpha / greatest(n_chars, 1), n_nonspace / greatest(n_words, 1),
                   (len(lines) - len(list_distinct(lines))) / greatest(len(lines), 1), n_symbols / greatest(n_words, 1)
            FROM (SELECT {STATS_SQL} FROM ({relation_sql}))""", params or []).fetchall()
