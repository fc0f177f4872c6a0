"""The README's results table, demo figures and the data stages' 1B-document projection, written from
bench/results/*.json, never typed by hand.

`python -m bench readme` rewrites what stands between the markers in README.md; `python -m bench NAME`
does it after writing NAME.json, and `python -m bench all` after running every benchmark.
tests/unit/test_bench_readme.py fails when the README's blocks differ from what the JSONs give.

A row's cells come from `bench.rows.ROWS[name](result) -> (result cell, ratio cell)`. The row functions
live there, not in the benchmark modules, because a benchmark module is part of the sources its result
is stamped with: a wording change must not make a measured number stale. A benchmark with no entry in
ROWS may define `readme_row(result)` in its own module; without either, the row is its description
and its ratio.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path

from bench.provenance import ROOT, stale_list

README = ROOT / "README.md"
RESULTS = ROOT / "bench" / "results"
TABLE = ("<!-- bench-table:start -->", "<!-- bench-table:end -->")
DEMO = ("<!-- bench-demo:start -->", "<!-- bench-demo:end -->")
MISSED = ("<!-- bench-missed:start -->", "<!-- bench-missed:end -->")
DATA_SCALE = ("<!-- bench-data-scale:start -->", "<!-- bench-data-scale:end -->")


def load_results(results: Path = RESULTS) -> dict[str, dict]:
    from bench.__main__ import BENCHMARKS

    return {name: json.loads((results / f"{name}.json").read_text())
            for name in BENCHMARKS if (results / f"{name}.json").is_file()}


def row_cells(name: str, result: dict) -> tuple[str, str]:
    """(result cell, ratio cell) of one benchmark's result."""
    from bench import rows
    from bench.__main__ import BENCHMARKS

    fn = rows.ROWS.get(name)
    if fn is None:
        try:
            fn = getattr(importlib.import_module(BENCHMARKS[name][0]), "readme_row", None)
        except ImportError:
            fn = None
    ratio = result.get("ratio")
    fallback = BENCHMARKS[name][1], "—" if ratio is None else f"{ratio}×"
    if fn is None:
        return fallback
    try:
        return fn(result)
    except (KeyError, TypeError, IndexError, ValueError):  # a result written before the fields its row reads
        meaning = result.get("ratio_means") or result.get("baseline") or "see the JSON"
        return (f"this result predates the fields its README row reads, and its ratio may mean something else than "
                f"today's benchmark: rerun it ({BENCHMARKS[name][1]})", f"{fallback[1]} (as it then meant: {meaning})")


def command(name: str, result: dict | None) -> str:
    from bench import rows

    return (result or {}).get("command") or rows.COMMANDS.get(name) or f"python -m bench {name}"


def render_table(results: dict[str, dict], stale: dict[str, str]) -> str:
    from bench.__main__ import BENCHMARKS

    lines = ["| benchmark | command | result | ratio (baseline) |", "|---|---|---|---|"]
    for name, (_, what) in BENCHMARKS.items():
        result = results.get(name)
        if result is None:
            cells = (f"not run: no bench/results/{name}.json ({what})", "—")
        else:
            cells = row_cells(name, result)
        label = f"{name} *(stale)*" if name in stale and result is not None else name
        lines.append("| " + " | ".join(_cell(c) for c in (label, f"`{command(name, result)}`", *cells)) + " |")
    notes = [f"- {name}: {_cell(reason)}" for name, reason in stale.items() if name in results]
    if notes:
        lines += ["", "Why the *(stale)* rows are stale (bench/results/STALE.json):", "", *notes]
    return "\n".join(lines)


def render_missed(results: dict[str, dict], stale: dict[str, str]) -> str:
    """One bullet per missed target, from the same row module (rows.MISSED[name](result) -> list of lines)."""
    from bench import rows
    from bench.__main__ import BENCHMARKS

    lines = []
    for name in BENCHMARKS:
        if name in results and name in rows.MISSED:
            mark = " *(stale result)*" if name in stale else ""
            try:
                missed = rows.MISSED[name](results[name])
            except (KeyError, TypeError, IndexError, ValueError):
                missed = ["its result predates the fields this list reads: rerun it to see its targets"]
            lines += [f"- `{name}`{mark}: {text}" for text in missed]
    if "gpu" not in results:
        lines.append("- `gpu`: no result yet (no GPU was lent to the session that ran the benchmarks), so there are "
                     "no CUDA numbers; `python -m bench gpu` and `python -m bench generate --device cuda` are prepared.")
    return "\n".join(lines) if lines else "- none"


def render_demo(results: dict[str, dict], stale: dict[str, str]) -> str:
    from bench import rows

    pipeline = results.get("pipeline")
    if pipeline is None:
        return "No demo figures: bench/results/pipeline.json is missing; run `python -m bench pipeline -c default`."
    text = rows.demo_block(pipeline)
    if "pipeline" in stale:
        text = f"*(stale: {stale['pipeline']})*\n\n{text}"
    return text


def render_data_scale(results: dict[str, dict], stale: dict[str, str]) -> str:
    from bench import rows

    result = results.get("data_scale")
    if result is None:
        return "No measurement: bench/results/data_scale.json is missing; run `python -m bench data_scale`."
    text = rows.data_scale_projection(result)
    return f"*(stale: {stale['data_scale']})*\n\n{text}" if "data_scale" in stale else text


def render(readme_text: str, results_dir: Path = RESULTS) -> str:
    """README text with every marked block regenerated from the results."""
    results, stale = load_results(results_dir), stale_list()
    text = readme_text
    for markers, body in ((TABLE, render_table(results, stale)), (DEMO, render_demo(results, stale)),
                          (MISSED, render_missed(results, stale)), (DATA_SCALE, render_data_scale(results, stale))):
        text = _replace_between(text, markers, body)
    return text


def rewrite(readme: Path = README, results_dir: Path = RESULTS) -> bool:
    """Regenerate the README's blocks in place; True when anything changed."""
    old = readme.read_text()
    new = render(old, results_dir)
    if new != old:
        readme.write_text(new)
    return new != old


def _replace_between(text: str, markers: tuple[str, str], body: str) -> str:
    start, end = markers
    i, j = text.find(start), text.find(end)
    if i < 0 or j < i:
        raise ValueError(f"README.md lacks the markers {start} ... {end}; put them where the generated block goes")
    return text[: i + len(start)] + "\n" + body + "\n" + text[j:]


def _cell(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")
