"""The lmforge pipeline as a Prefect flow: each stage a task whose cache key is the stage key.

The DAG itself is `pipelines.runner.run_pipeline`; this module only says how a stage runs as a task.
A task's cache key is the stage's own key (config + input keys + code version); when the stage's
output is not on disk the task refreshes its cache instead of reading it, so a deleted workspace
artifact is rebuilt, never "cached".
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Any

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact
from prefect.runtime import flow_run

from pipelines.config import PipelineConfig, from_dict
from pipelines.runner import MODULES, run_pipeline
from pipelines.workspace import StageResult, Workspace, load_result


def _cache_key(context: Any, parameters: dict[str, Any]) -> str:
    name, cfg, inputs = parameters["name"], parameters["cfg"], parameters["inputs"]
    root = Workspace(cfg.workspace).root
    return hashlib.sha256(f"{root}|{name}|{MODULES[name].key(cfg, *inputs)}".encode()).hexdigest()


@task(cache_key_fn=_cache_key, persist_result=True)
def stage_task(name: str, cfg: PipelineConfig, inputs: tuple, force: bool) -> StageResult:
    result = MODULES[name].run(cfg, Workspace(cfg.workspace), *inputs, force=force)
    create_markdown_artifact(
        key=f"{name}-output",
        markdown=_markdown(result),
        description=f"lmforge {name} stage output",
    )
    return result


def run_as_task(name: str, cfg: PipelineConfig, ws: Workspace, inputs: tuple, force: bool) -> StageResult:
    missing = load_result(ws, name, MODULES[name].key(cfg, *inputs)) is None
    task_run = stage_task.with_options(name=name, task_run_name=name, refresh_cache=force or missing)
    state = task_run(name, cfg, inputs, force, return_state=True)
    result = state.result()
    # a Prefect cache hit hands back the result of the run that did the work; say it was reused
    return dataclasses.replace(result, reused=True) if state.name == "Cached" else result


@flow(name="lmforge-pipeline", log_prints=True)
def pipeline_flow(config: dict, only: str | None = None, start: str | None = None, force: bool = False) -> dict[str, StageResult]:
    """Run the pipeline for a resolved config (as a dict, so the Prefect UI can show and edit it)."""
    cfg = from_dict(config)
    tags = {"prefect.flow_run_id": str(flow_run.id)} if flow_run.id else {}
    return run_pipeline(cfg, only=only, start=start, force=force, tags=tags, call=run_as_task)


def _markdown(result: StageResult) -> str:
    rows = "\n".join(f"| {k} | {v} |" for k, v in result.metrics.items() if not isinstance(v, (dict, list)))
    return f"### {result.stage} `{result.key}`\n\nOutput: `{result.path}`\n\n| metric | value |\n|---|---|\n{rows}\n"
