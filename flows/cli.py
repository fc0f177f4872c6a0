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

    gen = sub.add_parser("generate", help="sample text from the latest export, an export directory, or models:/NAME@ALIAS")
    gen.add_argument("--model", help="export directory or MLflow models:/ URI (default: the workspace's latest export)")
    gen.add_argument("--workspace", default="workspace", help="workspace directory (default: ./workspace)")
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--max-new-tokens", type=int, default=100)
    gen.add_argument("--temperature", type=float, default=0.8)
    gen.add_argument("--top-k", type=int, default=50)
    gen.add_argument("--seed", type=int, default=None)
    gen.set_defaults(func=_cmd_generate)

    show = sub.add_parser("config", help="print the resolved config (YAML + overrides) and its hash")
    _config_args(show)
    show.set_defaults(func=_cmd_config)
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


def _cmd_generate(args: argparse.Namespace) -> int:
    from lm_core.generate import SamplingConfig, generate_tokens
    from lm_core.tokenizer import Tokenizer
    from lm_core.weights import TOKENIZER_FILE, load_model_dir

    model_dir = _resolve_model(args.model, Path(args.workspace))
    model, _ = load_model_dir(model_dir)
    tok = Tokenizer(model_dir / TOKENIZER_FILE)
    sampling = SamplingConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k, seed=args.seed)
    sampling.validate()  # before anything is printed
    ids: list[int] = []
    printed = ""
    print(args.prompt, end="", flush=True)
    for token in generate_tokens(model, tok.encode(args.prompt, bos=True), sampling, eos_id=tok.eos_id):
        ids.append(token)
        text = tok.decode(ids)
        if not text.endswith("\ufffd"):  # hold back a partial UTF-8 character until it completes
            print(text[len(printed):], end="", flush=True)
            printed = text
    print()
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
