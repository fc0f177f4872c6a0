"""`lmforge`: run the pipeline (as a Prefect flow, or plainly), sample from a model, show a config."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

STAGE_NAMES = ("ingest", "dedup", "split", "tokenizer", "shard", "pretrain", "evaluate", "export", "register")


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 2
    from lm_core.typed_config import ConfigError

    try:
        return args.func(args)
    except (ConfigError, FileNotFoundError) as exc:
        print(f"lmforge: error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:
        return _stopped(exc)


def _stopped(exc: Exception) -> int:
    """SIGTERM/Ctrl-C during training: a checkpoint was written, so say how to resume instead of a traceback."""
    from lm_core.engine import TrainingInterrupted
    from lm_core.launch import EXIT_INTERRUPTED  # 75, EX_TEMPFAIL: the same command resumes

    if not isinstance(exc, TrainingInterrupted):
        raise exc
    print(f"lmforge: stopped: {exc}", file=sys.stderr)
    return EXIT_INTERRUPTED


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lmforge", description="Build a GPT-style language model from raw text, end to end.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    run = sub.add_parser("run", help="run the pipeline (ingest → … → register) as a Prefect flow")
    _config_args(run)
    which = run.add_mutually_exclusive_group()
    which.add_argument("--only", choices=STAGE_NAMES, help="rerun just this stage (upstream outputs are reused)")
    which.add_argument("--from", dest="start", choices=STAGE_NAMES, help="rerun this stage and everything after it")
    run.add_argument("--force", action="store_true", help="ignore cached outputs and rerun every stage")
    run.add_argument("--no-prefect", action="store_true", help="call the stages directly, without a Prefect flow")
    run.set_defaults(func=_cmd_run)

    dep = sub.add_parser("deploy", help="a Prefect deployment of the pipeline with a cron schedule; --serve runs it")
    _config_args(dep)
    dep.add_argument("--name", default="nightly", help="deployment name (default: nightly)")
    dep.add_argument("--cron", default="0 3 * * *", help="cron schedule, or 'none' (default: '0 3 * * *')")
    dep_which = dep.add_mutually_exclusive_group()
    dep_which.add_argument("--only", choices=STAGE_NAMES, help="each run reruns just this stage")
    dep_which.add_argument("--from", dest="start", choices=STAGE_NAMES, help="each run reruns this stage and what follows")
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

    gen = sub.add_parser("generate", help="sample text from the latest export, an export directory, or models:/NAME@ALIAS")
    gen.add_argument("--model", help="export directory or MLflow models:/ URI (default: the workspace's latest export)")
    gen.add_argument("--workspace", default="workspace", help="workspace directory (default: ./workspace)")
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--max-new-tokens", type=int, default=100)
    gen.add_argument("--temperature", type=float, default=0.8)
    gen.add_argument("--top-k", type=int, default=50, help="0: no top-k cut (default: 50)")
    gen.add_argument("--top-p", type=float, default=None, help="nucleus sampling, e.g. 0.9 (default: off)")
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--stop", action="append", default=[], metavar="TEXT",
                     help="stop before this text (repeatable); the stop text is not printed")
    gen.add_argument("--dtype", choices=("fp32", "bf16", "int8"), default="fp32",
                     help="weights for CPU inference: fp32, bf16, or int8 (weight-only, bf16 compute) (default: fp32)")
    gen.set_defaults(func=_cmd_generate)

    srv = sub.add_parser("serve", help="OpenAI-compatible HTTP server (/v1/completions, /v1/models, /health)")
    srv.add_argument("--model", help="export directory or MLflow models:/ URI (default: the workspace's latest export)")
    srv.add_argument("--workspace", default="workspace", help="workspace directory (default: ./workspace)")
    srv.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only)")
    srv.add_argument("--port", type=int, default=8000)
    srv.add_argument("--name", help="model name clients pass as `model` (default: the export directory's name)")
    srv.add_argument("--dtype", choices=("fp32", "bf16", "int8"), default="fp32",
                     help="weights for CPU inference: fp32, bf16, or int8 (weight-only, bf16 compute) (default: fp32)")
    srv.set_defaults(func=_cmd_serve)

    insp = sub.add_parser("inspect", help="what the model learned: `inspect neighbors WORD`, "
                                          "`inspect attention --prompt TEXT`")
    insp_sub = insp.add_subparsers(dest="inspect_command", metavar="WHAT", required=True)
    near = insp_sub.add_parser("neighbors", help="nearest tokens to WORD by cosine similarity of the token embeddings")
    near.add_argument("word", metavar="WORD",
                      help="a token's piece or a word that is one token (' the' or '\u2581the' for a leading space)")
    near.add_argument("--k", type=int, default=10, help="how many neighbors (default: 10)")
    attn = insp_sub.add_parser("attention", help="PNG grid of attention maps (layer x head) for a prompt, logged to MLflow")
    attn.add_argument("--prompt", required=True)
    attn.add_argument("--out", help="PNG path (default: <workspace>/inspect/attention.png)")
    attn.add_argument("--no-mlflow", action="store_true", help="only write the PNG")
    for p in (near, attn):
        p.add_argument("--model", help="export directory or MLflow models:/ URI (default: the workspace's latest export)")
        p.add_argument("--workspace", default="workspace", help="workspace directory (default: ./workspace)")
        p.set_defaults(func=_cmd_inspect)

    data = sub.add_parser("data", help="inspect the data catalog: `lmforge data report`")
    data_sub = data.add_subparsers(dest="data_command", metavar="WHAT", required=True)
    data_report = data_sub.add_parser("report", help="reads, kept, dropped by reason, clusters, lengths per snapshot")
    data_report.add_argument("--workspace", default="workspace", help="workspace directory (default: ./workspace)")
    data_report.set_defaults(func=_cmd_data_report)

    cont = sub.add_parser("continue", help="ingest new inbox files and train the champion on for a token budget; "
                                           "promoted only if it beats the champion")
    _config_args(cont)
    cont.add_argument("--inbox", required=True, help="directory where new text files are dropped")
    cont.add_argument("--tokens", type=int, required=True, help="training budget of the continued run, in tokens")
    cont.add_argument("--glob", default="**/*.txt", help="which files of the inbox to read (default: **/*.txt)")
    cont.add_argument("--no-prefect", action="store_true", help="call the stages directly, without a Prefect flow")
    cont.set_defaults(func=_cmd_continue)

    swp = sub.add_parser("sweep", help="run a grid of configs sharing the data stages; compare bpb vs compute in MLflow")
    _config_args(swp)
    swp.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2",
                     help="a config key and its values (repeatable; every combination runs), e.g. --grid model.n_embd=64,128")
    swp.add_argument("--irreducible", action="store_true", help="fit L = e + a*C^-b (needs 4+ compute values) instead of a*C^-b")
    swp.add_argument("--no-prefect", action="store_true", help="call the stages directly, without Prefect flows")
    swp.set_defaults(func=_cmd_sweep)

    show = sub.add_parser("config", help="print the resolved config (YAML + overrides) and its hash")
    _config_args(show)
    show.set_defaults(func=_cmd_config)

    models = sub.add_parser("models", help="the model registry: list versions, show one, promote one to champion")
    msub = models.add_subparsers(dest="models_command", metavar="ACTION", required=True)
    mlist = msub.add_parser("list", help="every registered version with its aliases and promotion-gate decision")
    mlist.add_argument("name", nargs="?", help="one registered model (default: all)")
    mshow = msub.add_parser("show", help="one version: gate decision, eval metrics, lineage tags")
    mshow.add_argument("ref", metavar="NAME[@ALIAS|/VERSION]")
    mpromote = msub.add_parser("promote", help="point an alias (default: champion) at a version by hand")
    mpromote.add_argument("name")
    mpromote.add_argument("version")
    mpromote.add_argument("--alias", default="champion")
    for p in (mlist, mshow, mpromote):
        p.add_argument("--workspace", default="workspace", help="workspace directory (default: ./workspace)")
        p.set_defaults(func=_cmd_models)
    return parser


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("-c", "--config", default="default", help="YAML file or a name under configs/ (default: default)")
    p.add_argument("--workspace", help="workspace directory (overrides the config's `workspace`)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides, e.g. train.max_steps=200")


def _load(args: argparse.Namespace):
    from pipelines.config import load_config

    overrides = list(args.overrides) + ([f"workspace={args.workspace}"] if args.workspace else [])
    return load_config(args.config, overrides)


def _cmd_config(args: argparse.Namespace) -> int:
    import yaml

    cfg = _load(args)
    print(yaml.safe_dump(cfg.to_dict(), sort_keys=False), end="")
    print(f"# config_hash: {cfg.config_hash()}")
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    cfg = _load(args)  # invalid configs stop here, before any work
    from pipelines.report import print_summary, quiet_environment
    from pipelines.runner import preflight

    ws = preflight(cfg)
    quiet_environment(ws)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    started = time.perf_counter()
    if args.no_prefect:
        from pipelines.runner import run_pipeline

        results = run_pipeline(cfg, only=args.only, start=args.start, force=args.force)
    else:
        from flows.pipeline import pipeline_flow

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
    cfg = _load(args)
    from pipelines.report import print_summary, quiet_environment
    from pipelines.workspace import Workspace

    ws = Workspace(cfg.workspace)
    quiet_environment(ws)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    started = time.perf_counter()
    if args.no_prefect:
        from pipelines import continue_run
        from pipelines.runner import run_pipeline

        plan = continue_run.plan(cfg, Path(args.inbox), args.tokens, args.glob)
        if isinstance(plan, str):
            print(plan)
            return 0
        results = run_pipeline(plan.cfg, tags=plan.tags)
    else:
        from flows.continue_flow import continue_flow

        outcome = continue_flow(inbox=args.inbox, tokens=args.tokens, config=cfg.to_dict(), glob=args.glob)
        if not outcome["ran"]:
            print(outcome["reason"])  # the flow logged it too (Prefect UI)
            return 0
        results = outcome["results"]
    print_summary(cfg, ws, results, time.perf_counter() - started)
    gate = results["register"].metrics["gate"]
    print(f"gate: {gate['decision']} ({gate['reason']})")
    return 0


def _cmd_sweep(args: argparse.Namespace) -> int:
    from pipelines import sweep
    from pipelines.report import quiet_environment

    overrides = list(args.overrides) + ([f"workspace={args.workspace}"] if args.workspace else [])
    plan = sweep.plan(args.config, args.grid, overrides)  # every point's config checked before any work
    quiet_environment(plan.workspace)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    if args.no_prefect:
        summary = sweep.run_and_compare(plan, irreducible=args.irreducible)
    else:
        from flows.sweep import sweep_flow

        summary = sweep_flow(grid=args.grid, config_name=args.config, overrides=overrides, irreducible=args.irreducible)
    sweep.print_comparison(summary)
    return 0


def _cmd_data_report(args: argparse.Namespace) -> int:
    from pipelines.data_report import print_report
    from pipelines.workspace import Workspace

    ws = Workspace(args.workspace)
    if not ws.catalog.is_file():
        raise FileNotFoundError(f"no catalog at {ws.catalog}; run `lmforge run --only dedup` first or pass --workspace")
    with ws.duckdb(read_only=True) as con:  # waits while a run is writing the catalog
        print_report(con)
    return 0


def _cmd_generate(args: argparse.Namespace) -> int:
    from lm_core.generate import SamplingConfig, stream_text
    from lm_core.tokenizer import Tokenizer
    from lm_core.typed_config import ConfigError
    from lm_core.weights import TOKENIZER_FILE, load_model_dir

    sampling = SamplingConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                              top_k=args.top_k or None, top_p=args.top_p, seed=args.seed)
    sampling.validate()  # before anything is loaded or printed
    if "" in args.stop:
        raise ConfigError("--stop '' would stop at once; pass a non-empty text, e.g. --stop $'\\n\\n'")
    model_dir = _resolve_model(args.model, Path(args.workspace))
    from lm_core.quantize import prepare_for_inference

    model = prepare_for_inference(load_model_dir(model_dir)[0], args.dtype)
    tok = Tokenizer(model_dir / TOKENIZER_FILE)
    print(args.prompt, end="", flush=True)
    # pieces never split a UTF-8 character and never show (part of) a stop string
    for chunk in stream_text(model, tok, [tok.encode(args.prompt, bos=True)], sampling, stop=args.stop):
        print(chunk.text, end="", flush=True)
    print()
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    from pipelines.serving import serve

    model_dir = _resolve_model(args.model, Path(args.workspace))
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"{model_dir} is not an lmforge model directory (no config.json); pass an export directory")
    serve(model_dir, host=args.host, port=args.port, model_name=args.name, dtype=args.dtype)
    return 0


def _cmd_models(args: argparse.Namespace) -> int:
    from pipelines import models_cli
    from pipelines.report import quiet_environment
    from pipelines.workspace import Workspace

    ws = Workspace(args.workspace)
    quiet_environment(ws)
    try:
        if args.models_command == "list":
            print(models_cli.format_list(models_cli.list_versions(ws, args.name)))
        elif args.models_command == "show":
            print(models_cli.format_show(models_cli.show(ws, args.ref)))
        else:
            done = models_cli.promote(ws, args.name, args.version, args.alias)
            print(f"{done['name']}@{done['alias']} -> version {done['version']} (was {done['previous'] or 'unset'})")
    except models_cli.RegistryError as exc:
        print(f"lmforge: error: {exc}", file=sys.stderr)
        return 2
    return 0


def _cmd_inspect(args: argparse.Namespace) -> int:
    from pipelines import inspect_cli
    from pipelines.report import quiet_environment
    from pipelines.workspace import Workspace

    ws = Workspace(args.workspace)
    quiet_environment(ws)
    model_dir = _resolve_model(args.model, Path(args.workspace))
    try:
        if args.inspect_command == "neighbors":
            print(inspect_cli.format_neighbors(inspect_cli.neighbors(model_dir, args.word, args.k)))
            return 0
        out = Path(args.out) if args.out else ws.root / "inspect" / "attention.png"
        drawn = inspect_cli.attention_png(model_dir, args.prompt, out)
    except ValueError as exc:  # a word that is not one token, a prompt too long, --k < 1
        print(f"lmforge: error: {exc}", file=sys.stderr)
        return 2
    print(f"attention maps ({drawn['layers']} layers x {drawn['heads']} heads, {drawn['tokens']} tokens): {out}")
    if not args.no_mlflow:
        run_id = inspect_cli.log_attention(ws, drawn, args.model or str(model_dir), args.prompt)
        print(f"logged to MLflow: experiment {inspect_cli.INSPECT_EXPERIMENT}, run {run_id} ({ws.mlflow_uri})")
    return 0


def _resolve_model(ref: str | None, workspace: Path) -> Path:
    if ref and ref.startswith("models:/"):
        from pipelines.register import configure_mlflow
        from pipelines.workspace import Workspace

        import mlflow

        from mlflow.exceptions import MlflowException
        from mlflow.models import Model

        configure_mlflow(Workspace(workspace))
        try:
            local = Path(mlflow.artifacts.download_artifacts(artifact_uri=ref))
        except MlflowException as exc:
            raise FileNotFoundError(f"{ref} not found in the registry at {Workspace(workspace).mlflow_uri} "
                                    f"({exc.message.splitlines()[0]}); check --workspace and the model name") from None
        # the pyfunc keeps the export under artifacts/<its directory name>; MLmodel says where
        artifact = Model.load(str(local)).flavors["python_function"]["artifacts"]["model_dir"]["path"]
        return local / artifact
    if ref:
        return Path(ref)
    latest = workspace / "LATEST_EXPORT"
    if not latest.is_file():
        raise FileNotFoundError(f"no export in {workspace}; run `lmforge run` first or pass --model DIR")
    return Path(latest.read_text().strip())


if __name__ == "__main__":
    raise SystemExit(main())
