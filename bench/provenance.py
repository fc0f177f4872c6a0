"""Where a benchmark result comes from: the commit, a digest of the source files it measures, the machine
and its load while it ran. `python -m bench NAME` stamps every result with it, and a test fails when a
result's digest no longer matches its sources (a stale number) unless bench/results/STALE.json lists the
result with the reason it is knowingly stale."""

from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STALE_FILE = ROOT / "bench" / "results" / "STALE.json"
_TRAINING = ["lm_core/engine.py", "lm_core/zero_adapter.py", "lm_core/gated_adamw.py", "lm_core/stability.py",
             "lm_core/step_hooks.py", "lm_core/run_state.py", "lm_core/train_report.py", "lm_core/train_metrics.py",
             "lm_core/train_config.py", "lm_core/checkpoints.py", "lm_core/loader.py", "lm_core/model.py",
             "lm_core/evaluation.py"]
_GENERATION = ["lm_core/generate.py", "lm_core/generation_engine.py", "lm_core/generation_rows.py", "lm_core/decode_step.py",
               "lm_core/kv_cache.py", "lm_core/sampling.py", "lm_core/model.py"]
# the files each benchmark measures (its own module included): a change to one makes its result stale
SOURCES: dict[str, list[str]] = {
    "pipeline": ["lm_core/*.py", "pipelines/**/*.py", "flows/*.py", "configs/tiny.yaml"],
    "train_step": _TRAINING,
    "zero_memory": _TRAINING + ["lm_core/launch.py"],
    "gpu": _TRAINING,
    "stability": _TRAINING + ["pipelines/stages/*.py", "pipelines/data/*.py", "configs/tiny.yaml", "configs/default.yaml"],
    "generate": _GENERATION + ["lm_core/hf_export.py"],
    "generate_cuda": _GENERATION + ["lm_core/hf_export.py", "lm_core/quantize.py", "bench/generate.py", "bench/generate_device.py"],
    "serve": _GENERATION + ["pipelines/apps/serving.py", "pipelines/apps/openai_*.py"],
    "quantize": _GENERATION + ["lm_core/quantize.py", "lm_core/evaluation.py"],
    "tokenize": ["lm_core/tokenizer.py", "lm_core/shards.py", "pipelines/stages/shard.py"],
    "loader": ["lm_core/loader.py", "lm_core/shards.py"],
    "dedup": ["pipelines/data/neardup.py", "pipelines/stages/dedup.py", "pipelines/data/quality.py"],
    "data_scale": ["pipelines/data/neardup.py", "pipelines/data/neardup_partitioned.py", "pipelines/data/task_pool.py",
                   "pipelines/data/sources.py", "pipelines/data/documents.py", "pipelines/data/file_groups.py",
                   "pipelines/data/normalize.py", "pipelines/data/quality.py", "pipelines/data/staging.py",
                   "pipelines/data/source_config.py",
                   "pipelines/data/catalog.py", "pipelines/workspace.py",
                   "pipelines/stages/dedup.py", "pipelines/stages/ingest.py"],
    # CI's time is the time of everything it installs, lints and tests
    "ci": ["lm_core/*.py", "pipelines/**/*.py", "flows/*.py", "bench/*.py", "tests/**/*.py", "configs/*.yaml",
           "Makefile", "pyproject.toml", "constraints.txt", ".ci/run"],
}


def source_files(name: str) -> list[Path]:
    files = {p for pattern in SOURCES.get(name, []) for p in ROOT.glob(pattern) if p.is_file()}
    files.add(ROOT / "bench" / f"{name}.py")
    return sorted(f for f in files if f.is_file())


def sources_digest(name: str) -> str:
    digest = hashlib.sha256()
    for path in source_files(name):
        digest.update(str(path.relative_to(ROOT)).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def stamp(name: str, load_before: tuple[float, float, float]) -> dict:
    """The provenance block of a result produced just now."""
    import torch

    def git(*args: str) -> str:
        done = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True)
        return done.stdout.strip() if done.returncode == 0 else ""

    changed = git("status", "--porcelain", "--", *[str(p.relative_to(ROOT)) for p in source_files(name)])
    try:
        import deepspeed

        ds = deepspeed.__version__
    except ImportError:
        ds = None
    return {
        "commit": git("rev-parse", "HEAD"),
        "sources_uncommitted": bool(changed),  # measured code that differs from the commit
        "sources_sha256": sources_digest(name),
        "sources": [str(p.relative_to(ROOT)) for p in source_files(name)],
        "machine": {"cpu": _cpu_model(), "cores": os.cpu_count(), "platform": platform.platform(),
                    "python": platform.python_version(), "torch": torch.__version__, "deepspeed": ds,
                    "torch_threads": torch.get_num_threads(), "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
                    "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None},
        "load_average": {"before": [round(x, 2) for x in load_before], "after": [round(x, 2) for x in os.getloadavg()]},
    }


def stale_list() -> dict[str, str]:
    return json.loads(STALE_FILE.read_text()) if STALE_FILE.is_file() else {}


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()
