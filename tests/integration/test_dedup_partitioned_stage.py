"""The dedup stage with its quality and near-dup steps as partition tasks (local worker processes) writes the
plain stage's verdicts row for row, also for an incremental second snapshot. (On a Dask cluster reached by
address: tests/integration/test_dask_runner.py.)"""

from __future__ import annotations

import inspect
import json
import random
import re
import shutil
import textwrap

import pytest

from pipelines.config import load_config
from pipelines.data import catalog
from pipelines.stages import dedup, ingest
from pipelines.workspace import Workspace

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def write_corpus(root, seed: int, n_originals: int) -> None:
    """Docstrings as files, near copies (one word changed) and exact copies of some, in shuffled names."""
    docs = [inspect.getdoc(obj) for mod in (json, shutil, textwrap, re, random) for _, obj in inspect.getmembers(mod)
            if callable(obj) and inspect.getdoc(obj)]
    docs = [d for d in dict.fromkeys(docs) if len(d.split()) >= 40][:n_originals]
    rng = random.Random(seed)
    texts = list(docs)
    for d in rng.sample(docs, len(docs) // 3):
        words = d.split(" ")
        words[rng.randrange(len(words))] = "zebra"
        texts.append(" ".join(words))
    texts += rng.sample(docs, len(docs) // 5)
    texts += ["#sale #cheap #deal #now #buy #more #click #here #free #win",  # fails the quality rules
              "the same line again\n" * 20, "1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 21 22"]
    (root / "texts").mkdir(parents=True, exist_ok=True)
    for i, text in enumerate(texts):
        (root / "texts" / f"{seed}-{rng.randrange(10**6):06d}-{i}.txt").write_text(text)


def config(root, ws: str, *overrides):
    return load_config("tiny", [f"workspace={root / ws}", f"ingest.sources=[{{kind: text_dir, path: {root / 'texts'}, doc_chars: 0}}]",
                                *overrides])


def verdicts(cfg, result) -> set[tuple]:
    with Workspace(cfg.workspace).duckdb(read_only=True) as con:
        return set(catalog.rows(con, "SELECT doc_id, status, reason, duplicate_of FROM doc_status WHERE dedup_key = ?",
                                [result.key]))


def run(cfg):
    ws = Workspace(cfg.workspace)
    return dedup.run(cfg, ws, ingest.run(cfg, ws))


def test_partitioned_stage_writes_the_plain_stages_verdicts(tmp_path):
    write_corpus(tmp_path, seed=0, n_originals=60)
    incremental = "dedup.incremental=true"
    plain_cfg = config(tmp_path, "plain", incremental)
    plain = run(plain_cfg)
    assert plain.metrics["dropped_by_reason"].get("near_duplicate", 0) >= 10
    assert sum(n for reason, n in plain.metrics["dropped_by_reason"].items() if reason.startswith("quality:")) >= 3
    procs_cfg = config(tmp_path, "procs", incremental, "flow.data_workers=2")
    procs = run(procs_cfg)
    assert procs.key == plain.key and verdicts(procs_cfg, procs) == verdicts(plain_cfg, plain)
    assert procs.metrics["near_candidates"] == plain.metrics["near_candidates"]
    png = (procs.dir / "data_report.png").read_bytes()  # drawn by a worker process
    assert png.startswith(b"\x89PNG") and len(png) > 5000
    assert not any((Workspace(procs_cfg.workspace).artifacts / "dedup" / ".work").iterdir())  # scratch removed

    write_corpus(tmp_path, seed=1, n_originals=30)  # a second snapshot: judged against what the first kept
    plain2, procs2 = run(plain_cfg), run(procs_cfg)
    assert procs2.metrics["incremental_base"] == procs.key and procs2.metrics["inherited"] > 0
    assert verdicts(procs_cfg, procs2) == verdicts(plain_cfg, plain2)
