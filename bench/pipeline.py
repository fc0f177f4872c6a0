"""The whole pipeline, timed the way a user meets it: `lmforge run` cold in a fresh workspace, then an
immediate rerun with nothing changed (baseline: the cold run). `-c default` is the `make demo` run
(about 11 minutes on 2 vCPUs); the default, `tiny`, checks the script in about a minute.

Besides the two wall times it records what the README's demo paragraph says, all read back from the
workspace the run made: per-stage seconds and the record accounting (read, quarantined, exact and near
duplicates, quality drops, contaminated, kept) from the stage manifests; train/val tokens from the shard
index totals; training tokens/s, steps and the spike gate's vetoed steps and rollbacks from the pretrain
manifest (cross-checked against its events.jsonl); val bpb trained vs untrained from the evaluate stage.
Peak RSS is the largest of the run's processes.
"""

from __future__ import annotations

import argparse
import json
import os
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
    manifests = {}
    for path in sorted(workspace.glob("artifacts/*/*/manifest.json"), key=lambda m: m.stat().st_mtime):
        data = json.loads(path.read_text())
        manifests[data["stage"]] = {**data, "dir": path.parent}  # the newest of each stage: this run's
    metrics = manifests.get("evaluate", {}).get("metrics", {})
    return {
        "benchmark": "pipeline",
        "ratio": round(rerun_s / cold_s, 4),
        "baseline": "cold run of the same config in a fresh workspace",
        "config": args.config,
        "overrides": args.overrides,
        "cold_run_s": round(cold_s, 2),
        "rerun_s": round(rerun_s, 2),
        "stage_seconds": {stage: m["seconds"] for stage, m in sorted(manifests.items())},
        "peak_rss_mb": round(peak_rss_mb, 1),
        "val_bpb": metrics.get("val_bpb"),
        "untrained_val_bpb": metrics.get("untrained_val_bpb"),
        "val_perplexity": metrics.get("val_perplexity"),
        "accounting": _accounting(manifests),
        "tokens": _tokens(manifests),
        "training": _training(manifests, args),
        "model": _model(manifests),
        "machine": {"cpus": len(os.sched_getaffinity(0)), "python": platform.python_version(), "processor": platform.processor()},
        "date": time.strftime("%Y-%m-%d"),
    }


def _accounting(manifests: dict) -> dict:
    """Where every input record went: read -> documents (quarantined at ingest) -> kept or dropped by reason."""
    ingest = manifests["ingest"]["metrics"]
    dedup = manifests["dedup"]["metrics"]
    reasons = dedup["dropped_by_reason"]
    exact, near = reasons.get("exact_duplicate", 0), reasons.get("near_duplicate", 0)
    contaminated = sum(n for r, n in reasons.items() if r.startswith("contaminates"))
    return {"read": ingest["read"], "quarantined": ingest["quarantined"], "documents": ingest["documents"],
            "exact_duplicates": exact, "near_duplicates": near, "contaminated": contaminated,
            "quality_drops": dedup["dropped"] - exact - near - contaminated, "kept": dedup["kept"],
            "dropped_by_reason": reasons, "quarantine_reasons": ingest.get("quarantine_reasons", {})}


def _tokens(manifests: dict) -> dict:
    shard = manifests["shard"]["metrics"]
    return {"train": shard["train_num_tokens"], "val": shard["val_num_tokens"],
            "train_docs": shard["train_num_docs"], "val_docs": shard["val_num_docs"]}


def _training(manifests: dict, args) -> dict:
    from pipelines.config import load_config

    pretrain = manifests["pretrain"]
    m = pretrain["metrics"]
    events_file = pretrain["dir"] / "events.jsonl"
    events = [json.loads(line) for line in events_file.read_text().splitlines() if line.strip()] if events_file.is_file() else []
    train = load_config(args.config, args.overrides).train
    return {"params": m["params"], "steps": m["steps"], "tokens": m["tokens"], "tokens_per_s": round(m["tokens_per_s"], 1),
            "wall_seconds": m["wall_seconds"], "vetoed_steps": m["skipped_updates"], "rollbacks": m["rollbacks"],
            "events": len(events), "skip_events": sum(1 for e in events if e.get("action") == "skip_update"),
            "precision": train.precision, "zero_stage": train.zero_stage, "world_size": m.get("world_size"),
            "global_batch_size": train.global_batch_size}


def _model(manifests: dict) -> dict:
    export = manifests.get("export")
    config = export["dir"] / "config.json" if export else None
    if config is None or not config.is_file():
        return {}
    model = json.loads(config.read_text())["model"]
    return {k: model.get(k) for k in ("n_layer", "n_head", "n_embd", "block_size", "vocab_size")}


def _timed(cmd: list[str]) -> float:
    started = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
    return time.perf_counter() - started
