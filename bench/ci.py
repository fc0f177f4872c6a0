"""What CI costs: `bash .ci/run` on a fresh clone of the committed tree, timed, so the README's CI figures
come from a JSON like every other number instead of being copied from a log by hand.

The clone gets its own virtualenv (`make install`, timed apart: pip's local cache makes it faster than on a
machine that never installed these wheels), then `.ci/run` runs there as CI runs it (ruff + the whole
pytest suite). The result keeps the test count, the pytest summary and the slowest tests.

ratio = seconds of the test command (`.ci/run` after the install) / 900 s, the brief's "well under 15
minutes" budget for the whole test command; below 1.0 is within it.

The suite itself contains tests/unit/test_bench_results.py, which would call this very result stale while it
is being remeasured; the run sets LMFORGE_BENCH_CI_RUN=1 so that test leaves `ci` alone inside it.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BUDGET_S = 900.0
# pytest's last line: "630 passed, 4 skipped in 567.71s (0:09:27)", framed by "=" unless -q
SUMMARY = re.compile(r"^=*\s*(\d+ (?:passed|failed|errors?|skipped)\b.*?) in ([\d.]+)s\b", re.M)
COUNT = re.compile(r"(\d+) (passed|failed|skipped|errors?|xfailed|xpassed|deselected)")
DURATION = re.compile(r"^([\d.]+)s (call|setup|teardown)\s+(\S+)", re.M)


def parse_pytest(log: str) -> dict:
    """The counts, pytest's own seconds and the slowest tests from a pytest log."""
    summaries = SUMMARY.findall(log)
    if not summaries:
        raise ValueError("no pytest summary line in the CI log")
    text, seconds = summaries[-1]
    counts = {kind.rstrip("s") if kind.startswith("error") else kind: int(n) for n, kind in COUNT.findall(text)}
    slowest = [{"seconds": float(s), "phase": phase, "test": test} for s, phase, test in DURATION.findall(log)]
    return {"summary": text.strip(), "pytest_s": float(seconds), "counts": counts, "slowest": slowest[:10]}


def _env() -> dict[str, str]:
    # the clone builds its own venv: nothing of this process's environment may point into ours
    drop = {"VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME", "OMP_NUM_THREADS"}
    env = {k: v for k, v in os.environ.items() if k not in drop and not k.startswith(("PREFECT_", "MLFLOW_"))}
    env["PATH"] = ":".join(p for p in env.get("PATH", "").split(":") if ".venv" not in p)
    env["LMFORGE_BENCH_CI_RUN"] = "1"
    return env


def _timed(command: list[str], cwd: Path, log: Path) -> tuple[float, int]:
    start = time.perf_counter()
    with log.open("ab") as out:
        rc = subprocess.run(command, cwd=cwd, env=_env(), stdout=out, stderr=subprocess.STDOUT).returncode
    return time.perf_counter() - start, rc


def run(argv: list[str]) -> dict:
    parser = argparse.ArgumentParser(prog="python -m bench ci", description=__doc__.split("\n\n")[0])
    parser.add_argument("--keep", action="store_true", help="keep the clone (its path is printed) for a look at the log")
    args = parser.parse_args(argv)
    from bench.provenance import source_files

    dirty = subprocess.run(["git", "status", "--porcelain", "--", *[str(p.relative_to(ROOT)) for p in source_files("ci")]],
                           cwd=ROOT, capture_output=True, text=True).stdout.strip()
    if dirty:  # the clone measures the last commit; a digest of other files would stamp it wrongly
        raise SystemExit(f"commit first: the clone would not hold these changes:\n{dirty}")
    work = Path(tempfile.mkdtemp(prefix="lmforge-ci-"))
    clone, log = work / "clone", work / "ci.log"
    subprocess.run(["git", "clone", "--quiet", str(ROOT), str(clone)], check=True)
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=clone, capture_output=True, text=True).stdout.strip()
    print(f"fresh clone of {commit[:10]} in {clone}; log: {log}", flush=True)
    install_s, rc = _timed(["make", "install"], clone, log)
    if rc != 0:
        raise SystemExit(f"`make install` failed in the clone (exit {rc}); see {log}")
    test_s, rc = _timed(["bash", ".ci/run"], clone, log)
    text = log.read_text(errors="replace")
    if rc != 0:
        print(text[-4000:], file=sys.stderr)
        raise SystemExit(f"`bash .ci/run` failed in the fresh clone (exit {rc}): not a CI time to keep; see {log}")
    pytest = parse_pytest(text)
    if not args.keep:
        subprocess.run(["rm", "-rf", str(work)])
    return {
        "benchmark": "ci",
        "ratio": round(test_s / BUDGET_S, 3),
        "ratio_means": "seconds of `bash .ci/run` (ruff + pytest, after the install) / 900 s (the 15-minute budget)",
        "clone_commit": commit,
        "install_s": round(install_s, 1),
        "test_command_s": round(test_s, 1),
        "total_s": round(install_s + test_s, 1),
        **pytest,
        "notes": "install_s uses pip's local cache (wheels already downloaded on this machine); a machine without "
                 "that cache downloads torch and the rest first",
    }
