"""The lmforge pipeline as a Prefect flow: each stage a task whose cache key is the stage key.

The DAG itself is `pipelines.stages.runner.run_pipeline`; this module only says how a stage runs as a task.
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

from flows.crashed_runs import record_running
from flows.ingest_fanout import fan_out_ingest
from flows.links import link_stages_to_mlflow, prefect_flow_run_url, stage_markdown
from pipelines.config import PipelineConfig, from_dict, load_config
from pipelines.data import data_report
from pipelines.stages.runner import MODULES, run_pipeline
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
        markdown=_stage_artifact(result),
        description=f"lmforge {name} stage output",
    )
    return result


def run_as_task(name: str, cfg: PipelineConfig, ws: Workspace, inputs: tuple, force: bool,
                task_runs: dict | None = None) -> StageResult:
    """`task_runs`, when given, collects stage name -> task-run id (the flow links them to MLflow)."""
    missing = load_result(ws, name, MODULES[name].key(cfg, *inputs)) is None
    if name == "ingest" and (force or missing):
        fan_out_ingest(cfg, ws, force)  # flow.task_runner=dask: new files staged in parallel; else nothing
    task_run = stage_task.with_options(name=name, task_run_name=name, refresh_cache=force or missing)
    state = task_run(name, cfg, inputs, force, return_state=True)
    result = state.result()
    if task_runs is not None:
        task_runs[name] = state.state_details.task_run_id
    # a Prefect cache hit hands back the result of the run that did the work; say it was reused
    return dataclasses.replace(result, reused=True) if state.name == "Cached" else result


@flow(name="lmforge-pipeline", log_prints=True)
def pipeline_flow(config: dict | None = None, only: str | None = None, start: str | None = None, force: bool = False,
                  config_name: str | None = None, overrides: list[str] | None = None,
                  extra_tags: dict[str, str] | None = None) -> dict[str, StageResult]:
    """Run the pipeline for a resolved config (as a dict, so the Prefect UI can show and edit it), or for
    `config_name` (a name under configs/ or a YAML path) plus dotted `overrides`, resolved when the run
    starts: what a deployment passes, so a schedule picks up edits to the YAML."""
    cfg = resolve_config(config, config_name, overrides)
    tags = {"prefect.flow_run_id": str(flow_run.id), "prefect.flow_run_url": prefect_flow_run_url(str(flow_run.id))} \
        if flow_run.id else {}
    tags.update(extra_tags or {})  # e.g. the version a continued run started from
    task_runs: dict = {}
    note = record_running(Workspace(cfg.workspace), str(flow_run.id)) if flow_run.id else None
    try:
        results = run_pipeline(cfg, only=only, start=start, force=force, tags=tags,
                               call=lambda *args: run_as_task(*args, task_runs=task_runs))
    finally:
        if note is not None:
            note.unlink(missing_ok=True)  # ended (also by an exception Prefect records): not a crash
    if "register" in results and flow_run.id:
        link_stages_to_mlflow(results, task_runs, flow_run.id)
    return results


def resolve_config(config: dict | None, config_name: str | None, overrides: list[str] | None) -> PipelineConfig:
    if config is not None and (config_name or overrides):
        raise ValueError("pipeline_flow: pass either `config` (a resolved dict) or `config_name` + `overrides`, not both")
    if config is not None:
        return from_dict(config)
    return load_config(config_name or "default", list(overrides or []))


def _stage_artifact(result: StageResult) -> str:
    return stage_markdown(result) + data_report.stage_markdown(result)  # dedup: the accounting tables
