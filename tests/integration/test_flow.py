"""The pipeline as a Prefect flow under Prefect's test harness: one task run per stage, the flow-run id
on the registered model version, and a second flow run served entirely from the task cache."""

from __future__ import annotations

import os

import pytest

from pipelines.config import load_config
from pipelines.stages.runner import STAGES
from pipelines.workspace import Workspace

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture(scope="module")
def flow_env(tmp_path_factory, prefect_harness):
    root = tmp_path_factory.mktemp("flow")
    (root / "cwd").mkdir()
    old = os.getcwd()
    os.chdir(root / "cwd")  # keep anything written relative to the working directory out of the repo
    try:
        yield load_config("tiny", [f"workspace={root / 'ws'}"])
    finally:
        os.chdir(old)


def _flow_run_and_tasks(flow_run_id: str):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        flow_run = client.read_flow_run(flow_run_id)
        task_runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run.id])))
    return flow_run, task_runs


def _run_flow(cfg) -> tuple[dict, str]:
    """(the flow's results, its flow-run id)."""
    from flows.pipeline import pipeline_flow

    state = pipeline_flow(config=cfg.to_dict(), return_state=True)
    assert state.is_completed(), state
    return state.result(), str(state.state_details.flow_run_id)


@pytest.fixture(scope="module")
def first_flow(flow_env):
    return _run_flow(flow_env)


@pytest.fixture(scope="module")
def second_flow(flow_env, first_flow):
    return _run_flow(flow_env)


def _version_tags(cfg, version: str) -> dict[str, str]:
    from mlflow import MlflowClient

    uri = Workspace(cfg.workspace).mlflow_uri
    return MlflowClient(tracking_uri=uri, registry_uri=uri).get_model_version(cfg.register.model_name, version).tags


def test_flow_runs_every_stage_as_a_completed_task(flow_env, first_flow):
    first_flow, first_id = first_flow
    assert list(first_flow) == list(STAGES)
    assert not any(r.reused for r in first_flow.values()), "a fresh workspace reused a stage"
    for name in STAGES:
        assert first_flow[name].dir.is_dir()
    assert first_flow["evaluate"].metrics["val_bpb"] < first_flow["evaluate"].metrics["untrained_val_bpb"]

    version = first_flow["register"].metrics["version"]
    assert version == "1"
    flow_run_id = _version_tags(flow_env, version).get("prefect.flow_run_id")
    assert flow_run_id, "the registered version does not name the Prefect flow run that made it"
    flow_run, task_runs = _flow_run_and_tasks(flow_run_id)
    assert flow_run_id == first_id
    assert str(flow_run.id) == flow_run_id
    assert flow_run.state.is_completed(), flow_run.state
    assert flow_run.parameters["config"]["workspace"] == flow_env.workspace
    assert sorted(t.name for t in task_runs) == sorted(STAGES), "expected one task run per stage"
    assert {t.name: t.state.name for t in task_runs} == {name: "Completed" for name in STAGES}

    # each stage's output artifact written once; the MLflow links beside it, once per stage
    keys = [a.key for a in _artifacts(flow_run_id)]
    assert sorted(k for k in keys if k.endswith("-output")) == sorted(f"{name}-output" for name in STAGES)
    run_id = first_flow["register"].metrics["run_id"]
    links = {a.key: a.data for a in _artifacts(flow_run_id) if a.key.endswith("-mlflow")}
    assert sorted(links) == sorted(f"{name}-mlflow" for name in STAGES)
    assert all(run_id in data for data in links.values())


def _artifacts(flow_run_id: str) -> list:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with get_client(sync_client=True) as client:
        return client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))


def test_second_flow_run_is_served_from_the_cache(flow_env, first_flow, second_flow):
    (first_flow, first_id), (second_flow, second_id) = first_flow, second_flow
    assert list(second_flow) == list(STAGES)
    for name in STAGES:
        assert second_flow[name].reused, f"{name} ran again in an unchanged workspace"
        assert second_flow[name].key == first_flow[name].key
    assert second_flow["register"].metrics["version"] == "1"

    assert second_id != first_id
    # the version still names the flow run that did the work
    assert _version_tags(flow_env, "1")["prefect.flow_run_id"] == first_id
    flow_run, task_runs = _flow_run_and_tasks(second_id)
    assert flow_run.state.is_completed(), flow_run.state
    assert sorted(t.name for t in task_runs) == sorted(STAGES)
    assert {t.name: t.state.name for t in task_runs} == {name: "Cached" for name in STAGES}
    assert all(t.state.is_completed() for t in task_runs)


def test_a_deleted_output_is_rebuilt_not_served_from_the_cache(flow_env, first_flow, second_flow):
    import shutil

    (first_results, _), _ = first_flow, second_flow
    evaluate_dir = first_results["evaluate"].dir
    shutil.rmtree(evaluate_dir)
    results, flow_run_id = _run_flow(flow_env)
    assert not results["evaluate"].reused
    assert results["evaluate"].key == first_results["evaluate"].key
    assert (evaluate_dir / "manifest.json").is_file(), "the deleted evaluate output was not rebuilt"
    _, task_runs = _flow_run_and_tasks(flow_run_id)
    states = {t.name: t.state.name for t in task_runs}
    assert states == {name: "Completed" if name == "evaluate" else "Cached" for name in STAGES}


def test_a_killed_runs_flow_run_is_marked_crashed_on_the_next_start(prefect_harness, tmp_path):
    """A flow run left RUNNING by a process that died (kill -9) is marked Crashed by the next start; a run whose
    process lives is left alone."""
    import subprocess
    import sys

    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.states import Running

    from flows.crashed_runs import mark_crashed_runs, record_running

    @flow(name="lmforge-crash-probe")
    def probe() -> None:
        pass

    ws = Workspace(tmp_path / "ws")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    with get_client(sync_client=True) as client:
        runs = [client.create_flow_run(probe) for _ in range(2)]
        for run in runs:
            client.set_flow_run_state(run.id, Running(), force=True)
    record_running(ws, str(runs[0].id)).write_text(f'{{"pid": {dead.stdout.strip()}, "host": "{os.uname().nodename}"}}')
    record_running(ws, str(runs[1].id))  # this process: alive
    assert mark_crashed_runs(ws) == [str(runs[0].id)]
    with get_client(sync_client=True) as client:
        assert client.read_flow_run(runs[0].id).state.type.value == "CRASHED"
        assert client.read_flow_run(runs[1].id).state.is_running()
    assert mark_crashed_runs(ws) == []  # the note of the crashed run is gone; the live one stays
