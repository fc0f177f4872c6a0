"""The README's results table, demo figures and missed targets are what bench/results/*.json say
(bench/readme.py), and the generator tolerates benchmarks it has no wording for."""

from __future__ import annotations

import json
import sys
import types

from bench import readme, rows
from bench.__main__ import BENCHMARKS


def test_readme_blocks_equal_what_the_results_give():
    text = readme.README.read_text()
    assert readme.render(text) == text, "README.md's generated blocks are out of date: run `python -m bench readme`"


def test_every_benchmark_has_one_table_row_in_order():
    table = readme.render_table(readme.load_results(), {})
    names = [line.split(" | ")[0].lstrip("| ").split(" ")[0] for line in table.splitlines()[2:] if line.startswith("|")]
    assert names == list(BENCHMARKS)


def test_a_benchmark_without_wording_falls_back_to_its_readme_row_then_its_description(tmp_path, monkeypatch):
    monkeypatch.setitem(BENCHMARKS, "with_row", ("bench._test_with_row", "what with_row measures"))
    monkeypatch.setitem(BENCHMARKS, "without_row", ("bench._test_missing_module", "what without_row measures"))
    monkeypatch.setitem(BENCHMARKS, "never_run", ("bench._test_missing_module", "what never_run measures"))
    module = types.ModuleType("bench._test_with_row")
    module.readme_row = lambda r: (f"{r['n']} things a second", f"{r['ratio']}× the old way")
    monkeypatch.setitem(sys.modules, "bench._test_with_row", module)
    (tmp_path / "with_row.json").write_text(json.dumps({"ratio": 2.5, "n": 7}))
    (tmp_path / "without_row.json").write_text(json.dumps({"ratio": 1.25}))

    table = readme.render_table(readme.load_results(tmp_path), {"without_row": "code changed since"})
    lines = {line.split(" | ")[0].lstrip("| "): line for line in table.splitlines()[2:] if line.startswith("|")}
    assert "| 7 things a second | 2.5× the old way |" in lines["with_row"]
    assert lines["without_row *(stale)*"].endswith("| what without_row measures | 1.25× |")
    assert "not run: no bench/results/never_run.json" in lines["never_run"]
    assert "- without_row: code changed since" in table  # the reason a stale row is stale


def test_a_result_older_than_its_row_says_so_instead_of_failing():
    cells = readme.row_cells("dedup", {"ratio": 7.75, "lmforge": {}})
    assert "rerun it" in cells[0] and cells[1].startswith("7.75× (as it then meant")


def test_rows_name_the_baseline_and_mark_a_missed_target():
    result = {"ratio": 0.9, "ratio_1_thread": 1.01, "threads": 2, "repeats": 5,
              "mb_per_s": {"shard_stage": 9.0, "raw_encode": 10.0, "shard_stage_1_thread": 5.05, "raw_encode_1_thread": 5.0},
              "text": {"mb": 8.0}, "tokenizer": {"vocab_size": 4096}}
    text, ratio = rows.ROWS["tokenize"](result)
    assert ratio.startswith("0.9× raw SentencePiece at equal threads") and "**missed**" in ratio
    assert rows.MISSED["tokenize"](result) and not rows.MISSED["tokenize"]({**result, "ratio": 1.0})


def test_the_demo_block_says_which_config_it_comes_from():
    result = json.loads((readme.RESULTS / "pipeline.json").read_text())
    block = rows.demo_block(result)
    assert f"-c {result['config']}" in block
    assert ("not the demo's `default`" in block) == (result["config"] != "default")


def test_bench_all_runs_every_benchmark_and_skips_the_cuda_ones_without_a_gpu(capsys):
    import torch

    from bench.__main__ import NEEDS_CUDA, main

    assert main(["all", "--dry-run", "--skip", "serve"]) == 0
    out = capsys.readouterr().out
    for name in BENCHMARKS:
        line = next(line for line in out.splitlines() if line.startswith(f"== {name}:"))
        if name == "serve":
            assert "skipped (--skip)" in line
        elif name in NEEDS_CUDA and not torch.cuda.is_available():
            assert "skipped, no CUDA device" in line
        else:
            assert f"python -m bench {name}" in line
    assert "python -m bench pipeline -c default" in out  # the demo's figures come from the default config
