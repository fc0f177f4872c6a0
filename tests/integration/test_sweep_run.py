"""`lmforge sweep` on the tiny config: two model widths in one workspace, plainly and as a Prefect flow.

The second point must reuse the data stages the first one built (same keys, `reused` / `Cached`),
train its own model, and the comparison must reach MLflow as a table, a CSV and a PNG.
"""

from __future__ import annotations

import os

import pytest

from pipelines.apps import sweep
from pipelines.workspace import Workspace

pytestmark = [pytest.mark.integration, pytest.mark.slow]

DATA_STAGES = ("ingest", "dedup", "split", "tokenizer", "shard")
GRID = ["model.n_embd=32,64"]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep")
    (root / "cwd").mkdir()
    old = os.getcwd()
    os.chdir(root / "cwd")  # anything written relative to the working directory stays out of the repo
    try:
        yield root
    finally:
        os.chdir(old)


def _overrides(ws) -> list[str]:
    return [f"workspace={ws}", "train.max_steps=10"]


@pytest.fixture(scope="module")
def plain(root):
    plan = sweep.plan("tiny", GRID, _overrides(root / "ws"))
    outcomes = sweep.run_sweep(plan)
    return plan, outcomes, sweep.compare_and_log(plan, outcomes)


def _mlflow(ws: Workspace):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=ws.mlflow_uri, registry_uri=ws.mlflow_uri)


def test_second_point_reuses_the_data_stages_and_trains_its_own_model(plain):
    _, (first, second), _ = plain
    for stage in DATA_STAGES:
        assert not first.results[stage].reused, f"{stage} was reused in a fresh workspace"
        assert second.results[stage].reused, f"the second point rebuilt {stage}"
        assert second.results[stage].key == first.results[stage].key
    for stage in ("pretrain", "evaluate", "export", "register"):
        assert not second.results[stage].reused
        assert second.results[stage].key != first.results[stage].key


def test_rows_hold_size_compute_and_bpb(plain):
    _, outcomes, summary = plain
    small, large = summary.rows
    assert [r["model.n_embd"] for r in summary.rows] == ["32", "64"]
    assert large["params"] > small["params"] and large["non_embedding_params"] > small["non_embedding_params"]
    assert small["tokens"] == large["tokens"] == 10 * 16 * 64  # steps x global batch x block
    for row, outcome in zip(summary.rows, outcomes):
        assert row["compute_flops"] == outcome.point.cfg.model.flops_per_token() * row["tokens"]
        assert row["val_bpb"] == outcome.results["evaluate"].metrics["val_bpb"] > 0
        assert row["pretrain_key"] == outcome.results["pretrain"].key
    assert [r["upstream_reused"] for r in summary.rows] == [False, True]
    assert summary.fit is None and "2 distinct compute" in summary.fit_note  # two points make no law


def test_comparison_run_has_the_table_and_the_plot(plain):
    plan, _, summary = plain
    ws = plan.workspace
    client = _mlflow(ws)
    run = client.get_run(summary.run_id)
    assert client.get_experiment(run.info.experiment_id).name == sweep.SWEEP_EXPERIMENT
    assert run.data.params["grid.model.n_embd"] == "32,64"
    assert run.data.tags["lmforge.sweep_id"] == plan.sweep_id
    assert run.data.metrics[f"best_{sweep.FIT_METRIC}"] == min(r["val_bpb"] for r in summary.rows)
    files = {a.path for a in client.list_artifacts(summary.run_id)}
    assert {sweep.TABLE_FILE, sweep.CSV_FILE, sweep.PLOT_FILE, sweep.FIT_FILE} <= files
    png = client.download_artifacts(summary.run_id, sweep.PLOT_FILE, str(ws.root / "downloaded"))
    assert open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    children = client.search_runs([run.info.experiment_id], f"tags.mlflow.parentRunId = '{summary.run_id}'")
    assert sorted(c.data.params["model.n_embd"] for c in children) == ["32", "64"]
    # each point's registered model says which sweep and point made it
    for row in summary.rows:
        tags = client.get_model_version("lmforge-tiny", row["model_version"]).tags
        assert tags["lmforge.sweep_id"] == plan.sweep_id and tags["lmforge.sweep_point"] == row["point"]


def test_cli_sweep_prints_the_table_and_why_there_is_no_fit(plain, capsys):
    from flows.cli import main

    plan, _, _ = plain
    assert main(["sweep", "-c", "tiny", "--grid", "model.n_embd=32,64", "--no-prefect", *_overrides(plan.workspace.root)]) == 0
    out = capsys.readouterr().out
    assert "sweep: 2 points" in out and "n_embd" in out and "no fit: 2 distinct compute" in out
    assert f"experiment {sweep.SWEEP_EXPERIMENT}" in out
    assert main(["sweep", "-c", "tiny", "--grid", "model.n_embd=32,33", "--no-prefect"]) == 2
    assert "sweep point 'model.n_embd=33'" in capsys.readouterr().err


def test_sweep_flow_runs_points_as_subflows_sharing_cached_data_stages(root, prefect_harness):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, FlowRunFilterParentFlowRunId

    from flows.sweep import sweep_flow

    state = sweep_flow(grid=GRID, config_name="tiny", overrides=_overrides(root / "ws-flow"), return_state=True)
    assert state.is_completed(), state
    summary, flow_run_id = state.result(), str(state.state_details.flow_run_id)
    assert [r["upstream_reused"] for r in summary.rows] == [False, True]
    with get_client(sync_client=True) as client:
        subflows = client.read_flow_runs(
            flow_run_filter=FlowRunFilter(parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[flow_run_id])))
        by_name = {f.name: f for f in subflows}
        assert sorted(by_name) == ["sweep model.n_embd=32", "sweep model.n_embd=64"]
        second = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[by_name["sweep model.n_embd=64"].id])))
        states = {t.name: t.state.name for t in second}
        artifacts = client.read_artifacts()
    assert {states[s] for s in DATA_STAGES} == {"Cached"}, states
    assert states["pretrain"] == "Completed"
    assert any(a.key == "sweep-comparison" for a in artifacts)
    run = _mlflow(Workspace(root / "ws-flow")).get_run(summary.run_id)
    assert run.data.tags["prefect.flow_run_id"] == flow_run_id
