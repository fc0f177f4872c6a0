"""The pipeline DAG, defined once: stage order and which results feed which stage.

`run_pipeline` calls the stages as plain functions (tests, `python -m pipelines`); the Prefect flow
passes its own `call` so that every stage becomes a task, with the same wiring.
"""

from __future__ import annotations

from collections.abc import Callable
from types import ModuleType
from typing import Any

from pipelines.config import PipelineConfig
from pipelines.stages import STAGES, dedup, evaluate, export, ingest, pretrain, register, shard, split, tokenizer
from pipelines.workspace import StageResult, Workspace

MODULES: dict[str, ModuleType] = {
    "ingest": ingest, "dedup": dedup, "split": split, "tokenizer": tokenizer, "shard": shard,
    "pretrain": pretrain, "evaluate": evaluate, "export": export, "register": register,
}
# StageCall(stage name, cfg, workspace, inputs, force) -> result; every module has
# key(cfg, *inputs) and run(cfg, ws, *inputs, force=...)
StageCall = Callable[[str, PipelineConfig, Workspace, tuple, bool], StageResult]


def call_directly(name: str, cfg: PipelineConfig, ws: Workspace, inputs: tuple, force: bool) -> StageResult:
    return MODULES[name].run(cfg, ws, *inputs, force=force)


def selected_stages(only: str | None = None, start: str | None = None, force: bool = False) -> tuple[list[str], set[str]]:
    """(stages to run, stages to force). `only` reruns one stage, `start` a stage and everything after it;
    the stages upstream of them still run, and are reused from the workspace when finished."""
    for name in (only, start):
        if name is not None and name not in STAGES:
            raise ValueError(f"unknown stage '{name}'; choose one of: {', '.join(STAGES)}")
    if only and start:
        raise ValueError("give either --only or --from, not both")
    if only:
        return list(STAGES[: STAGES.index(only) + 1]), {only}
    if start:
        return list(STAGES), set(STAGES[STAGES.index(start):])
    return list(STAGES), set(STAGES) if force else set()


def preflight(cfg: PipelineConfig) -> Workspace:
    """Checks that need no work: the workspace is usable (a directory, a catalog that opens), sources exist
    and are non-empty, files the config names exist and fit. Config types were checked at load."""
    Workspace(cfg.workspace).check()
    ingest.preflight(cfg)
    tokenizer.preflight(cfg)
    pretrain.preflight(cfg)
    ws = Workspace(cfg.workspace)
    ws.check()
    ws.root.mkdir(parents=True, exist_ok=True)
    return ws


def run_pipeline(cfg: PipelineConfig, only: str | None = None, start: str | None = None, force: bool = False,
                 tags: dict[str, str] | None = None, call: StageCall = call_directly) -> dict[str, StageResult]:
    ws = preflight(cfg)
    stages, forced = selected_stages(only, start, force)
    r: dict[str, StageResult] = {}
    inputs: dict[str, Callable[[], tuple[Any, ...]]] = {
        "ingest": lambda: (),
        "dedup": lambda: (r["ingest"],),
        "split": lambda: (r["dedup"],),
        "tokenizer": lambda: (r["split"],),
        "shard": lambda: (r["split"], r["tokenizer"]),
        "pretrain": lambda: (r["shard"], r["tokenizer"], tags or {}),
        "evaluate": lambda: (r["pretrain"], r["shard"], r["tokenizer"]),
        "export": lambda: (dict(r),),
        "register": lambda: (dict(r), tags or {}),
    }
    for name in stages:
        r[name] = call(name, cfg, ws, inputs[name](), name in forced)
    return r
