"""Links between a Prefect flow run and the MLflow run its register stage made, both ways.

Each stage's task writes its `<stage>-output` artifact (the table of what it produced) once, when it
finishes. The MLflow run and registered model are known only once the register stage has run, so the flow
then gives every stage's task run an `<stage>-mlflow` artifact with the links (a separate artifact: the
output artifact is never written a second time), and the flow run an `mlflow-run` link artifact. The other
direction is a tag: the MLflow run and the registered version carry `prefect.flow_run_url`.

The URLs point at the UIs `lmforge ui` starts (127.0.0.1:4200 and :5000); set LMFORGE_PREFECT_UI_URL
or LMFORGE_MLFLOW_UI_URL when yours live elsewhere.
"""

from __future__ import annotations

import os
from uuid import UUID

from pipelines.workspace import StageResult

PREFECT_UI_DEFAULT, MLFLOW_UI_DEFAULT = "http://127.0.0.1:4200", "http://127.0.0.1:5000"


def prefect_flow_run_url(flow_run_id: str) -> str:
    """The flow run's page: Prefect's own UI URL when a server is configured, else `lmforge ui`'s."""
    from prefect.settings import PREFECT_UI_URL

    base = os.environ.get("LMFORGE_PREFECT_UI_URL") or PREFECT_UI_URL.value() or PREFECT_UI_DEFAULT
    return f"{base.rstrip('/')}/runs/flow-run/{flow_run_id}"


def mlflow_run_url(experiment_id: str, run_id: str) -> str:
    base = os.environ.get("LMFORGE_MLFLOW_UI_URL") or MLFLOW_UI_DEFAULT
    return f"{base.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"


def mlflow_model_url(name: str, version: str) -> str:
    base = os.environ.get("LMFORGE_MLFLOW_UI_URL") or MLFLOW_UI_DEFAULT
    return f"{base.rstrip('/')}/#/models/{name}/versions/{version}"


def stage_markdown(result: StageResult) -> str:
    rows = "\n".join(f"| {k} | {v} |" for k, v in result.metrics.items() if not isinstance(v, (dict, list)))
    return f"### {result.stage} `{result.key}`\n\nOutput: `{result.path}`\n\n| metric | value |\n|---|---|\n{rows}\n"


def link_stages_to_mlflow(results: dict[str, StageResult], task_runs: dict[str, UUID], flow_run_id: UUID) -> str:
    """Publish the MLflow links on every stage's task run and on the flow run; returns the run's URL."""
    from prefect.artifacts import create_link_artifact
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import ArtifactCreate

    registration = results["register"].metrics
    run_url = mlflow_run_url(str(registration["experiment_id"]), str(registration["run_id"]))
    model_url = mlflow_model_url(str(registration["model_name"]), str(registration["version"]))
    links = (f"MLflow run: [{registration['run_id']}]({run_url}) · registered model: "
             f"[{registration['model_name']} v{registration['version']}]({model_url})\n")
    with get_client(sync_client=True) as client:
        for name, result in results.items():
            if name not in task_runs:
                continue
            client.create_artifact(ArtifactCreate(
                key=f"{name}-mlflow", type="markdown", data=f"### {name} `{result.key}` in MLflow\n\n{links}",
                description=f"the MLflow run and model version this {name} output went into",
                flow_run_id=flow_run_id, task_run_id=task_runs[name]))
    create_link_artifact(link=run_url, link_text=f"MLflow run {registration['run_id']}", key="mlflow-run",
                         description="the MLflow run that records this flow run's model")
    return run_url
