"""What a finished run prints."""

from __future__ import annotations

import resource
import shlex

from pipelines.config import PipelineConfig
from pipelines.workspace import StageResult, Workspace


def print_summary(cfg: PipelineConfig, ws: Workspace, results: dict[str, StageResult], seconds: float) -> None:
    prompt = (cfg.eval.prompts or ["The"])[0].rstrip("\n")  # a prompt of this run's own corpus
    peak_mb = max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss) / 1024
    print(f"\nlmforge run '{cfg.name}' finished in {seconds:.1f} s (peak RSS {peak_mb:.0f} MB); workspace {ws.root}\n")
    headline = {
        "ingest": ("read", "documents", "quarantined"), "dedup": ("read", "kept", "dropped"),
        "split": ("train_docs", "val_docs"), "tokenizer": ("vocab_size", "val_bytes_per_token"),
        "shard": ("train_num_tokens", "val_num_tokens"), "pretrain": ("steps", "final_train_loss", "tokens_per_s"),
        "evaluate": ("val_bpb", "untrained_val_bpb", "val_perplexity", "init_val_bpb"), "export": (),
        "register": ("model_name", "version", "alias", "promoted"),
    }
    for name, result in results.items():
        keys = list(headline.get(name, ()))
        if name == "evaluate":  # per-source validation scores and extra texts, when there are any
            keys += sorted(k for k in result.metrics
                           if k.startswith(("val_bpb.", "init_val_bpb.")) or (k.startswith("text.") and k.endswith(".bpb")))
        facts = ", ".join(f"{k}={_fmt(result.metrics.get(k))}" for k in keys if k in result.metrics)
        state = "reused" if result.reused else "ran"
        print(f"  {name:<10} {state:<6} {result.key}  {facts}")
    if "export" in results:
        print(f"\n  export: {results['export'].path}")
    print(
        "\nLook inside:\n"
        f"  All three:   .venv/bin/lmforge ui --workspace {ws.root}   (Prefect :4200, MLflow :5000, TensorBoard :6006)\n"
        f"  Prefect UI:  PREFECT_HOME={ws.prefect_home} .venv/bin/prefect server start --host 127.0.0.1 --port 4200\n"
        f"  MLflow UI:   .venv/bin/mlflow ui --backend-store-uri {ws.mlflow_uri} --host 127.0.0.1 --port 5000 --workers 1\n"
        f"  TensorBoard: .venv/bin/tensorboard --logdir {ws.tensorboard} --host 127.0.0.1 --port 6006\n"
        f"  Sample:      .venv/bin/lmforge generate --workspace {ws.root} --prompt {shlex.quote(prompt)}"
    )


def _fmt(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
