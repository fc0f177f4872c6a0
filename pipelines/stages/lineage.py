"""What a model carries back to its data: config hash, stage keys and the code version."""

from __future__ import annotations

import subprocess
from functools import lru_cache
from importlib import metadata
from pathlib import Path

from pipelines.config import PipelineConfig
from pipelines.workspace import StageResult


@lru_cache(maxsize=1)
def code_version() -> str:
    try:
        version = metadata.version("lmforge")
    except metadata.PackageNotFoundError:
        version = "0+unknown"
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        sha = ""
    return f"{version}+g{sha}" if sha else version


def lineage(cfg: PipelineConfig, results: dict[str, StageResult]) -> dict[str, str]:
    tags = {"lmforge.config_hash": cfg.config_hash(), "lmforge.config_name": cfg.name, "lmforge.code_version": code_version()}
    names = {"ingest": "data_snapshot", "dedup": "dedup_key", "split": "split_key", "tokenizer": "tokenizer_key",
             "shard": "shard_manifest_key", "pretrain": "pretrain_key", "evaluate": "evaluate_key", "export": "export_key"}
    for stage, tag in names.items():
        if stage in results:
            tags[f"lmforge.{tag}"] = results[stage].key
    if "tokenizer" in results:
        tags["lmforge.tokenizer_sha256"] = results["tokenizer"].metrics.get("sha256", "")
    return tags
