"""`python -m bench ci` reads its numbers from pytest's own output; a log it cannot read is an error, not a 0."""

from __future__ import annotations

import pytest

from bench import rows
from bench.ci import parse_pytest

LOG = """\
ruff check .
All checks passed!
........s....                                                       [100%]
============================= slowest 15 durations =============================
57.20s call     tests/integration/test_lm_eval.py::test_hf_and_local_completions_agree
43.01s setup    tests/integration/test_browser.py::test_pages_render
0.50s call     tests/unit/test_model.py::test_forward
============ 626 passed, 4 skipped, 1 deselected in 934.56s (0:15:34) ============
"""


def test_counts_seconds_and_slowest_come_from_the_summary():
    parsed = parse_pytest(LOG)
    assert parsed["counts"] == {"passed": 626, "skipped": 4, "deselected": 1}
    assert parsed["pytest_s"] == 934.56
    assert parsed["slowest"][0] == {"seconds": 57.2, "phase": "call",
                                    "test": "tests/integration/test_lm_eval.py::test_hf_and_local_completions_agree"}
    assert [t["phase"] for t in parsed["slowest"]] == ["call", "setup", "call"]


def test_the_quiet_summary_line_is_read_too():
    parsed = parse_pytest(LOG.replace("============ 626 passed, 4 skipped, 1 deselected in 934.56s (0:15:34) ============",
                                      "630 passed, 4 skipped, 3 warnings in 567.71s (0:09:27)"))
    assert parsed["counts"] == {"passed": 630, "skipped": 4} and parsed["pytest_s"] == 567.71


def test_failures_are_counted():
    parsed = parse_pytest("==== 3 failed, 620 passed, 2 errors in 12.00s ====")
    assert parsed["counts"] == {"failed": 3, "passed": 620, "error": 2}


def test_a_log_without_a_summary_is_refused():
    with pytest.raises(ValueError, match="no pytest summary"):
        parse_pytest("Traceback (most recent call last):\n  ...\nImportError: no module named torch\n")


def test_the_row_marks_a_blown_budget():
    result = {"ratio": 1.04, "clone_commit": "abcdef0123", "install_s": 240.0, "test_command_s": 934.6, "pytest_s": 920.0,
              "counts": {"passed": 626, "skipped": 4}, "slowest": []}
    text, ratio = rows.ROWS["ci"](result)
    assert "626 passed, 4 skipped" in text and "15 min 35 s" in text and "**missed**" in ratio
    assert rows.MISSED["ci"](result) and not rows.MISSED["ci"]({**result, "ratio": 0.7})
