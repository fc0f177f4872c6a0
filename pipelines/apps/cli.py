"""The `lmforge` commands that need no Prefect: generate, eval, serve, inspect, data, models, config. flows/cli.py
adds them to the one parser beside the flow commands; none of them imports prefect."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pipelines.mlflow_store import resolve_model


def add_commands(sub) -> None:
    """Add this module's subcommands to the `lmforge` parser's subparsers."""
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

    ev = sub.add_parser("eval", help="score an existing model on text files and multiple-choice tasks (no pipeline run)")
    ev.add_argument("--model", help="export directory or MLflow models:/ URI (default: the workspace's latest export)")
    ev.add_argument("--workspace", default="workspace", help="workspace directory (default: ./workspace)")
    ev.add_argument("--texts", nargs="+", default=[], metavar="FILE", help="UTF-8 text files: text.<stem>.{loss,bpb}")
    ev.add_argument("--tasks", nargs="+", default=[], metavar="FILE",
                    help="multiple-choice tasks, JSONL {context, choices, answer} or BIG-bench task.json: mc.<name>.*")
    ev.add_argument("--max-examples", type=int, default=None, help="score at most this many examples per task")
    ev.add_argument("--json", action="store_true", help="print the scores as JSON")
    ev.set_defaults(func=_cmd_eval)

    srv = sub.add_parser("serve", help="OpenAI-compatible HTTP server (/v1/completions, /v1/chat/completions, "
                                       "/v1/models, /health)")
    srv.add_argument("--model", help="export directory or MLflow models:/ URI (default: the workspace's latest export)")
    srv.add_argument("--workspace", default="workspace", help="workspace directory (default: ./workspace)")
    srv.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only)")
    srv.add_argument("--port", type=int, default=8000)
    srv.add_argument("--name", help="model name clients pass as `model` (default: the export directory's name)")
    srv.add_argument("--dtype", choices=("fp32", "bf16", "int8"), default="fp32",
                     help="weights for CPU inference: fp32, bf16, or int8 (weight-only, bf16 compute) (default: fp32)")
    srv.add_argument("--device", default="cpu", help="where the model runs: cpu, cuda, cuda:1 ... (default: cpu)")
    srv.add_argument("--slots", type=int, default=16,
                     help="requests decoded together: rows of the running batch and of the KV cache (default: 16)")
    srv.add_argument("--compile", action="store_true",
                     help="CUDA only: compile the fixed-shape decode step (torch.compile reduce-overhead, CUDA graphs)")
    srv.add_argument("--max-body-mb", type=float, default=4.0, help="largest request body accepted (default: 4)")
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
    data_report = data_sub.add_parser("report", help="per snapshot (latest marked): reads, kept, dropped by reason, clusters, "
                                                     "per source, lengths, examples of quarantined records and duplicate pairs")
    data_report.add_argument("--workspace", default="workspace", help="workspace directory (default: ./workspace)")
    data_report.add_argument("--json", action="store_true", help="print the report as JSON instead of tables")
    data_report.add_argument("--examples", type=int, default=3, metavar="N",
                             help="examples of each quarantine reason and duplicate kind (default: 3)")
    data_report.set_defaults(func=_cmd_data_report)

    show = sub.add_parser("config", help="print the resolved config (YAML + overrides) and its hash")
    config_args(show)
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


def config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("-c", "--config", default="default", help="YAML file or a name under configs/ (default: default)")
    p.add_argument("--workspace", help="workspace directory (overrides the config's `workspace`)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides, e.g. train.max_steps=200")


def load(args: argparse.Namespace):
    from pipelines.config import load_config

    overrides = list(args.overrides) + ([f"workspace={args.workspace}"] if args.workspace else [])
    return load_config(args.config, overrides)


def _cmd_config(args: argparse.Namespace) -> int:
    import yaml

    cfg = load(args)
    print(yaml.safe_dump(cfg.to_dict(), sort_keys=False), end="")
    print(f"# config_hash: {cfg.config_hash()}")
    return 0


def _cmd_data_report(args: argparse.Namespace) -> int:
    import json

    from pipelines.data.data_report import full_report, print_report
    from pipelines.workspace import Workspace

    if args.examples < 0:
        raise ValueError(f"--examples {args.examples} must be >= 0")
    ws = Workspace(args.workspace)
    if not ws.catalog.is_file():
        raise FileNotFoundError(f"no catalog at {ws.catalog}; run `lmforge run --only dedup` first or pass --workspace")
    with ws.duckdb(read_only=True) as con:  # waits while a run is writing the catalog
        report = full_report(con, ws, args.examples)
    if args.json:
        print(json.dumps(report, indent=2, default=str))
    else:
        print_report(report)
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
    model_dir = resolve_model(args.model, Path(args.workspace))
    from lm_core.quantize import prepare_for_inference

    model = prepare_for_inference(load_model_dir(model_dir)[0], args.dtype)
    tok = Tokenizer(model_dir / TOKENIZER_FILE)
    print(args.prompt, end="", flush=True)
    # pieces never split a UTF-8 character and never show (part of) a stop string
    for chunk in stream_text(model, tok, [tok.encode(args.prompt, bos=True)], sampling, stop=args.stop):
        print(chunk.text, end="", flush=True)
    print()
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    import json

    from lm_core.tokenizer import Tokenizer
    from lm_core.typed_config import ConfigError
    from lm_core.weights import TOKENIZER_FILE, load_model_dir
    from pipelines.stages.evaluate import score_tasks, task_metrics, text_scores

    if not args.texts and not args.tasks:
        raise ConfigError("lmforge eval needs something to score: --texts FILE ... and/or --tasks FILE ...")
    for path in [*args.texts, *args.tasks]:
        if not Path(path).is_file():
            raise FileNotFoundError(f"{path} does not exist; pass existing text files to --texts and task files to --tasks")
    model_dir = resolve_model(args.model, Path(args.workspace))
    model, _ = load_model_dir(model_dir)
    tok = Tokenizer(model_dir / TOKENIZER_FILE)
    scores = text_scores(model, tok, [Path(p) for p in args.texts], model.cfg.block_size)
    scores.update(task_metrics(score_tasks(model, tok, {Path(p).stem: Path(p) for p in args.tasks}, args.max_examples)))
    if args.json:
        print(json.dumps({"model": str(model_dir), "scores": scores}, indent=2))
    else:
        print(f"model {model_dir}")
        for name, value in scores.items():
            print(f"  {name:<40} {value:.4f}" if isinstance(value, float) else f"  {name:<40} {value}")
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    from pipelines.apps.serving import serve

    model_dir = resolve_model(args.model, Path(args.workspace))
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"{model_dir} is not an lmforge model directory (no config.json); pass an export directory")
    from lm_core.generation_engine import EngineConfig

    engine = EngineConfig(slots=args.slots, compile=args.compile)
    serve(model_dir, host=args.host, port=args.port, model_name=args.name, dtype=args.dtype, engine=engine,
          max_body_bytes=int(args.max_body_mb * 1024 * 1024), device=args.device)
    return 0


def _cmd_models(args: argparse.Namespace) -> int:
    from pipelines.apps import models as registry
    from pipelines.environment import quiet_environment
    from pipelines.workspace import Workspace

    ws = Workspace(args.workspace)
    quiet_environment(ws)
    try:
        if args.models_command == "list":
            print(registry.format_list(registry.list_versions(ws, args.name)))
        elif args.models_command == "show":
            print(registry.format_show(registry.show(ws, args.ref)))
        else:
            done = registry.promote(ws, args.name, args.version, args.alias)
            print(f"{done['name']}@{done['alias']} -> version {done['version']} (was {done['previous'] or 'unset'})")
    except registry.RegistryError as exc:
        print(f"lmforge: error: {exc}", file=sys.stderr)
        return 2
    return 0


def _cmd_inspect(args: argparse.Namespace) -> int:
    from pipelines.apps import inspect
    from pipelines.environment import quiet_environment
    from pipelines.workspace import Workspace

    ws = Workspace(args.workspace)
    quiet_environment(ws)
    model_dir = resolve_model(args.model, Path(args.workspace))
    try:
        if args.inspect_command == "neighbors":
            print(inspect.format_neighbors(inspect.neighbors(model_dir, args.word, args.k)))
            return 0
        out = Path(args.out) if args.out else ws.root / "inspect" / "attention.png"
        drawn = inspect.attention_png(model_dir, args.prompt, out)
    except ValueError as exc:  # a word that is not one token, a prompt too long, --k < 1
        print(f"lmforge: error: {exc}", file=sys.stderr)
        return 2
    print(f"attention maps ({drawn['layers']} layers x {drawn['heads']} heads, {drawn['tokens']} tokens): {out}")
    if not args.no_mlflow:
        run_id = inspect.log_attention(ws, drawn, args.model or str(model_dir), args.prompt)
        print(f"logged to MLflow: experiment {inspect.INSPECT_EXPERIMENT}, run {run_id} ({ws.mlflow_uri})")
    return 0
