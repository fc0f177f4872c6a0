"""`lmforge`: the one command line. The flow commands live here (run, deploy, ui, continue, sweep); the
commands that need no Prefect (generate, serve, inspect, data, models, config) come from
pipelines.apps.cli and never import it."""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from pipelines.apps import cli as apps_cli
from pipelines.stages import STAGES

ERROR_LOG = Path(tempfile.gettempdir()) / "lmforge-last-error.log"


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 2
    try:
        return args.func(args)
    except Exception as exc:  # noqa: BLE001 - every error ends as one line; --debug shows the traceback
        if args.debug:
            raise
        return _report(exc)


def _report(exc: Exception) -> int:
    """One line on stderr: `lmforge: error: <problem and fix>` (exit 2) for errors a user can fix, `lmforge:
    stopped:` (exit 75, the same command resumes) after SIGTERM/Ctrl-C checkpointed training, and for anything
    else its type and first line, with the traceback written to ERROR_LOG (exit 1)."""
    import traceback

    from lm_core.engine import TrainingInterrupted
    from lm_core.launch import EXIT_INTERRUPTED  # 75, EX_TEMPFAIL
    from lm_core.shards import ShardError
    from lm_core.stability import TrainingDiverged
    from lm_core.typed_config import ConfigError
    from pipelines.workspace import WorkspaceError

    if isinstance(exc, TrainingInterrupted):
        print(f"lmforge: stopped: {exc}", file=sys.stderr)
        return EXIT_INTERRUPTED
    ERROR_LOG.write_text("".join(traceback.format_exception(exc)))
    if isinstance(exc, (ConfigError, FileNotFoundError, WorkspaceError, ShardError, TrainingDiverged, LookupError)):
        print(f"lmforge: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    print(f"lmforge: error: {type(exc).__name__}: {_one_line(exc)} (traceback in {ERROR_LOG}; rerun with --debug to "
          "see it here)", file=sys.stderr)
    return 1


def _one_line(exc: Exception) -> str:
    text = str(exc.args[0]) if isinstance(exc, KeyError) and exc.args else str(exc)
    return " ".join(text.split()) or type(exc).__name__


def _no_tracebacks_for_interrupts() -> None:
    """A SIGTERM/Ctrl-C'd training ends the task and the flow with TrainingInterrupted, which Prefect logs with
    its traceback twice before our one line says how to resume: keep the lines, drop the tracebacks."""
    import logging

    class DropInterruptTraceback(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            if record.exc_info and type(record.exc_info[1]).__name__ == "TrainingInterrupted":
                record.exc_info, record.exc_text = None, None
            return True

    for handler in logging.getLogger("prefect").handlers:
        handler.addFilter(DropInterruptTraceback())


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lmforge", description="Build a GPT-style language model from raw text, end to end.")
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    run = sub.add_parser("run", help="run the pipeline (ingest → … → register) as a Prefect flow")
    apps_cli.config_args(run)
    which = run.add_mutually_exclusive_group()
    which.add_argument("--only", choices=STAGES, help="rerun just this stage (upstream outputs are reused)")
    which.add_argument("--from", dest="start", choices=STAGES, help="rerun this stage and everything after it")
    run.add_argument("--force", action="store_true", help="ignore cached outputs and rerun every stage")
    run.add_argument("--no-prefect", action="store_true", help="call the stages directly, without a Prefect flow")
    run.set_defaults(func=_cmd_run)

    dep = sub.add_parser("deploy", help="a Prefect deployment of the pipeline with a cron schedule; --serve runs it")
    apps_cli.config_args(dep)
    dep.add_argument("--name", default="nightly", help="deployment name (default: nightly)")
    dep.add_argument("--cron", default="0 3 * * *", help="cron schedule, or 'none' (default: '0 3 * * *')")
    dep_which = dep.add_mutually_exclusive_group()
    dep_which.add_argument("--only", choices=STAGES, help="each run reruns just this stage")
    dep_which.add_argument("--from", dest="start", choices=STAGES, help="each run reruns this stage and what follows")
    dep.add_argument("--force", action="store_true", help="each run ignores cached outputs")
    dep.add_argument("--paused", action="store_true", help="create the schedule paused")
    dep.add_argument("--serve", action="store_true", help="also execute the deployment's runs in this process (blocks)")
    dep.add_argument("--inbox", help="deploy the continue flow instead: each run ingests new files of this directory "
                                     "and trains the champion on them (with --tokens)")
    dep.add_argument("--tokens", type=int, help="continue flow: training budget per run, in tokens")
    dep.set_defaults(func=_cmd_deploy)

    ui = sub.add_parser("ui", help="start the Prefect UI, the MLflow UI and TensorBoard for a workspace (Ctrl-C stops)")
    ui.add_argument("--workspace", default="workspace", help="workspace directory (default: ./workspace)")
    ui.add_argument("--prefect-port", type=int, default=4200)
    ui.add_argument("--mlflow-port", type=int, default=5000)
    ui.add_argument("--tensorboard-port", type=int, default=6006)
    ui.add_argument("--timeout", type=float, default=180, help="seconds to wait for the servers to answer (default: 180)")
    ui.set_defaults(func=_cmd_ui)

    cont = sub.add_parser("continue", help="ingest new inbox files and train the champion on for a token budget; "
                                           "promoted only if it beats the champion")
    apps_cli.config_args(cont)
    cont.add_argument("--inbox", required=True, help="directory where new text files are dropped")
    cont.add_argument("--tokens", type=int, required=True, help="training budget of the continued run, in tokens")
    cont.add_argument("--glob", default="**/*.txt", help="which files of the inbox to read (default: **/*.txt)")
    cont.add_argument("--no-prefect", action="store_true", help="call the stages directly, without a Prefect flow")
    cont.set_defaults(func=_cmd_continue)

    swp = sub.add_parser("sweep", help="run a grid of configs sharing the data stages; compare bpb vs compute in MLflow")
    apps_cli.config_args(swp)
    swp.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2",
                     help="a config key and its values (repeatable; every combination runs), e.g. --grid model.n_embd=64,128")
    swp.add_argument("--irreducible", action="store_true", help="fit L = e + a*C^-b (needs 4+ compute values) instead of a*C^-b")
    swp.add_argument("--no-prefect", action="store_true", help="call the stages directly, without Prefect flows")
    swp.set_defaults(func=_cmd_sweep)

    apps_cli.add_commands(sub)
    return parser


def _cmd_run(args: argparse.Namespace) -> int:
    cfg = apps_cli.load(args)  # invalid configs stop here, before any work
    from pipelines import environment
    from pipelines.apps.summary import print_summary
    from pipelines.stages.runner import preflight

    ws = preflight(cfg)
    environment.setup(ws)
    started = time.perf_counter()
    if args.no_prefect:
        from pipelines.stages.runner import run_pipeline

        results = run_pipeline(cfg, only=args.only, start=args.start, force=args.force)
    else:
        from flows.crashed_runs import mark_crashed_runs
        from flows.pipeline import pipeline_flow

        _no_tracebacks_for_interrupts()
        mark_crashed_runs(ws)

        results = pipeline_flow(config=cfg.to_dict(), only=args.only, start=args.start, force=args.force)
    print_summary(cfg, ws, results, time.perf_counter() - started)
    return 0


def _cmd_deploy(args: argparse.Namespace) -> int:
    from flows import deploy

    return deploy.main(args)


def _cmd_ui(args: argparse.Namespace) -> int:
    from flows import ui

    return ui.main(args)


def _cmd_continue(args: argparse.Namespace) -> int:
    cfg = apps_cli.load(args)
    from pipelines import environment
    from pipelines.apps.summary import print_summary
    from pipelines.workspace import Workspace

    ws = Workspace(cfg.workspace)
    environment.setup(ws)
    started = time.perf_counter()
    if args.no_prefect:
        from pipelines.apps import continue_run
        from pipelines.stages.runner import run_pipeline

        plan = continue_run.plan(cfg, Path(args.inbox), args.tokens, args.glob)
        if isinstance(plan, str):
            print(plan)
            return 0
        results = run_pipeline(plan.cfg, tags=plan.tags)
    else:
        from flows.continue_flow import continue_flow

        _no_tracebacks_for_interrupts()

        outcome = continue_flow(inbox=args.inbox, tokens=args.tokens, config=cfg.to_dict(), glob=args.glob)
        if not outcome["ran"]:
            print(outcome["reason"])  # the flow logged it too (Prefect UI)
            return 0
        results = outcome["results"]
    print_summary(cfg, ws, results, time.perf_counter() - started)
    evaluate, register = results["evaluate"].metrics, results["register"].metrics
    gate = register["gate"]
    started_from = gate.get("champion_version") or "?"
    print(f"\ncontinued {cfg.register.model_name} v{started_from} on {results['ingest'].metrics.get('partitions_read', 0)} "
          f"new file(s) from {args.inbox}: val_bpb {evaluate.get('val_bpb', float('nan')):.4f} vs the champion's "
          f"{evaluate.get('init_val_bpb', float('nan')):.4f} on the same windows; new documents only: val_bpb "
          f"{evaluate.get('val_bpb.inbox', float('nan')):.4f}; registered v{register['version']}")
    print(f"gate: {gate['decision']} ({gate['reason']})")
    return 0


def _cmd_sweep(args: argparse.Namespace) -> int:
    from pipelines import environment
    from pipelines.apps import sweep

    overrides = list(args.overrides) + ([f"workspace={args.workspace}"] if args.workspace else [])
    plan = sweep.plan(args.config, args.grid, overrides)  # every point's config checked before any work
    environment.setup(plan.workspace)
    if args.no_prefect:
        summary = sweep.run_and_compare(plan, irreducible=args.irreducible)
    else:
        from flows.sweep import sweep_flow

        summary = sweep_flow(grid=args.grid, config_name=args.config, overrides=overrides, irreducible=args.irreducible)
    sweep.print_comparison(summary)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
