"""The "continue" flow: new inbox files -> a new snapshot -> the champion trains on -> gate -> maybe promoted.

The planning lives in `pipelines.apps.continue_run`; this flow only runs the plan as the ordinary pipeline
flow (a subflow, so every stage is a task with its cache key, and upstream outputs are reused by key).
With nothing new in the inbox it returns the reason and runs nothing.
"""

from __future__ import annotations

from prefect import flow

from flows.pipeline import pipeline_flow, resolve_config
from pipelines.apps import continue_run


@flow(name="lmforge-continue", log_prints=True)
def continue_flow(inbox: str, tokens: int, config: dict | None = None, config_name: str | None = None,
                  overrides: list[str] | None = None, glob: str = "**/*.txt") -> dict:
    """Parameters as a deployment passes them: the base config (name + overrides), the inbox, the budget."""
    cfg = resolve_config(config, config_name, overrides)
    plan = continue_run.plan(cfg, inbox, tokens, glob)
    if isinstance(plan, str):
        print(plan)
        return {"ran": False, "reason": plan}
    print(f"continuing {cfg.register.model_name} v{plan.champion_version} on {len(plan.new_files)} new file(s) "
          f"for {plan.steps} steps")
    results = pipeline_flow(config=plan.cfg.to_dict(), extra_tags=plan.tags)
    return {"ran": True, "new_files": plan.new_files, "steps": plan.steps, "results": results,
            "gate": results["register"].metrics.get("gate")}
