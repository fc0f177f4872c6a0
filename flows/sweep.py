"""`lmforge-sweep`: each grid point a `lmforge-pipeline` subflow, then the comparison as a task.

The subflows share one workspace and one Prefect cache: a stage task's cache key is its stage key, so
the data stages (ingest … shard) run in the first subflow and show as `Cached` in the others; only
what the grid changes (pretrain onward, for a model/optimizer grid) runs again. The grid, the
comparison and the fit are `pipelines.apps.sweep`; this module only wires them into Prefect.
"""

from __future__ import annotations

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run

from flows.links import prefect_flow_run_url
from flows.pipeline import pipeline_flow
from pipelines.apps import sweep
from pipelines.workspace import StageResult


def _run_point_as_subflow(point: sweep.SweepPoint, tags: dict[str, str]) -> dict[str, StageResult]:
    subflow = pipeline_flow.with_options(flow_run_name=f"sweep {point.label}")
    return subflow(config=point.cfg.to_dict(), extra_tags=tags)


@task(name="compare", cache_policy=NO_CACHE)  # always log a fresh comparison run
def compare_task(plan: sweep.SweepPlan, outcomes: list[sweep.PointOutcome], irreducible: bool,
                 tags: dict[str, str]) -> sweep.SweepSummary:
    summary = sweep.compare_and_log(plan, outcomes, irreducible, tags)
    create_markdown_artifact(key="sweep-comparison", markdown=sweep.markdown(summary),
                             description=f"lmforge sweep {plan.sweep_id}: {sweep.FIT_METRIC} vs compute")
    return summary


@flow(name="lmforge-sweep", log_prints=True)
def sweep_flow(grid: list[str], config_name: str = "default", overrides: list[str] | None = None,
               irreducible: bool = False) -> sweep.SweepSummary:
    """`grid`: ["model.n_embd=64,128", "train.lr=1e-3,3e-3"] (every combination runs); `config_name` and
    `overrides` are the base config, resolved when the run starts (a deployment picks up YAML edits)."""
    plan = sweep.plan(config_name, grid, overrides or [])  # every point validated before any work
    print(f"sweep {plan.sweep_id}: {len(plan.points)} points over {', '.join(plan.grid)}")
    outcomes = sweep.run_sweep(plan, run_point=_run_point_as_subflow)
    tags = {"prefect.flow_run_id": str(flow_run.id), "prefect.flow_run_url": prefect_flow_run_url(str(flow_run.id))} \
        if flow_run.id else {}
    summary = compare_task(plan, outcomes, irreducible, tags)
    print(summary.fit.formula() if summary.fit else summary.fit_note)
    return summary
