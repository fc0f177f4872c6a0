"""The whole pipeline, timed the way a user meets it: `lmforge run` cold in a fresh workspace, then an
immediate rerun with nothing changed (baseline: the cold run). Per-stage seconds come from the stage
manifests; peak RSS is the largest of the run's processes.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def run(argv: list[str]) -> dict:
    p = argparse.ArgumentParser(prog="python -m bench pipeline")
    p.add_argument("-c", "--config", default="tiny")
    p.add_argument("--workspace", help="default: a fresh temporary directory")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args(argv)
    workspace = Path(args.workspace or tempfile.mkdtemp(prefix="lmforge-bench-"))
    cmd = [sys.executable, "-m", "flows.cli", "run", "-c", args.config, "--workspace", str(workspace), *args.overrides]

    cold_s = _timed(cmd)
    peak_rss_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    rerun_s = _timed(cmd)
    stages = {}
    for manifest in sorted(workspace.glob("artifacts/*/*/manifest.json")):
        data = json.loads(manifest.read_text())
        stages[data["stage"]] = data["seconds"]
    evaluate = next(workspace.glob("artifacts/evaluate/*/metrics.json"), None)
    metrics = json.loads(evaluate.read_text()) if evaluate else {}
    return {
        "benchmark": "pipeline",
        "ratio": round(rerun_s / cold_s, 4),
        "baseline": "cold run of the same config in a fresh workspace",
        "config": args.config,
        "overrides": args.overrides,
        "cold_run_s": round(cold_s, 2),
        "rerun_s": round(rerun_s, 2),
        "stage_seconds": stages,
        "peak_rss_mb": round(peak_rss_mb, 1),
        "val_bpb": metrics.get("val_bpb"),
        "untrained_val_bpb": metrics.get("untrained_val_bpb"),
        "machine": {"cpus": _cpus(), "python": platform.python_version(), "processor": platform.processor()},
        "date": time.strftime("%Y-%m-%d"),
    }


def _timed(cmd: list[str]) -> float:
    started = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
    return time.perf_counter() - started


def _cpus() -> int:
    import os

    return len(os.sched_getaffinity(0))
