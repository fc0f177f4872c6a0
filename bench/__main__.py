"""`python -m bench` lists the benchmarks; `python -m bench NAME [options]` runs one.

Each writes bench/results/NAME.json whose top-level `ratio` compares it with its baseline.
"""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

BENCHMARKS = {
    "pipeline": ("bench.pipeline", "stage timings of the whole flow; ratio = warm rerun / cold run"),
}
RESULTS = Path(__file__).resolve().parent / "results"


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help", "list"):
        print("benchmarks (python -m bench NAME):")
        for name, (_, what) in BENCHMARKS.items():
            print(f"  {name:<12} {what}")
        return 0
    name, *rest = argv
    if name not in BENCHMARKS:
        print(f"unknown benchmark '{name}'; choose one of: {', '.join(BENCHMARKS)}", file=sys.stderr)
        return 2
    result = importlib.import_module(BENCHMARKS[name][0]).run(rest)
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"{name}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
