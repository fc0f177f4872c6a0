"""No stale benchmark number: every committed result's digest matches the sources it measured, unless
bench/results/STALE.json lists it with the reason it is knowingly stale (and then it must really be stale)."""

from __future__ import annotations

import json
import os

import pytest

from bench.__main__ import BENCHMARKS, RESULTS
from bench.provenance import sources_digest, stale_list

RESULT_FILES = sorted(RESULTS.glob("*.json"))


def test_every_result_is_a_known_benchmark():
    names = {p.stem for p in RESULT_FILES} - {"STALE"}
    assert names <= set(BENCHMARKS), names - set(BENCHMARKS)
    assert set(stale_list()) <= set(BENCHMARKS)


@pytest.mark.parametrize("path", [p for p in RESULT_FILES if p.stem != "STALE"], ids=lambda p: p.stem)
def test_result_matches_the_code_it_measured(path):
    if path.stem == "ci" and os.environ.get("LMFORGE_BENCH_CI_RUN") == "1":
        pytest.skip("this run is `python -m bench ci` remeasuring ci.json itself")
    result = json.loads(path.read_text())
    stamped = result.get("provenance", {}).get("sources_sha256")
    fresh = stamped == sources_digest(path.stem)
    reason = stale_list().get(path.stem)
    if reason is not None:
        assert reason.strip(), f"{path.stem} is listed as stale without a reason"
        assert not fresh, f"{path.stem} is listed in STALE.json but matches its sources: remove it from the list"
    else:
        assert fresh, (f"{path.name} is stale: the sources it measures changed since it ran (or it has no provenance); "
                       f"rerun `python -m bench {path.stem}` or list it in bench/results/STALE.json with the reason")
