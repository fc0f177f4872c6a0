"""`python -m pipelines [-c CONFIG] [--only STAGE | --from STAGE] [--force] [KEY=VALUE ...]`:
the whole pipeline as plain function calls, without Prefect."""

from __future__ import annotations

import argparse
import sys
import time

from lm_core.engine import TrainingInterrupted
from lm_core.launch import EXIT_INTERRUPTED
from pipelines import environment
from pipelines.apps.summary import print_summary
from pipelines.config import load_config
from pipelines.stages import STAGES
from pipelines.stages.runner import preflight, run_pipeline


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m pipelines", description=__doc__)
    p.add_argument("-c", "--config", default="default")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--only", choices=STAGES)
    which.add_argument("--from", dest="start", choices=STAGES)
    p.add_argument("--force", action="store_true")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    args = p.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    ws = preflight(cfg)
    environment.setup(ws)
    started = time.perf_counter()
    try:
        results = run_pipeline(cfg, only=args.only, start=args.start, force=args.force)
    except TrainingInterrupted as exc:  # SIGTERM/Ctrl-C: a checkpoint was written; the same command resumes
        print(f"python -m pipelines: stopped: {exc}", file=sys.stderr)
        return EXIT_INTERRUPTED
    print_summary(cfg, ws, results, time.perf_counter() - started)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
