"""The data stages under Prefect with `flow.task_runner=dask`: ingest's per-file partitions run as
Prefect tasks on a local Dask cluster (worker processes that never open the catalog), and the result is
the plain run's, row for row."""

from __future__ import annotations

import inspect
import json
import shutil
import textwrap

import pytest

from pipelines.config import load_config
from pipelines.data import catalog
from pipelines.stages.runner import run_pipeline
from pipelines.workspace import Workspace

pytestmark = [pytest.mark.integration, pytest.mark.slow]

TEXTS = {f"t{i}.txt": inspect.getdoc(f) for i, f in enumerate(
    (json.dumps, json.loads, shutil.copytree, textwrap.wrap, textwrap.dedent, textwrap.fill))}


def config(root, ws, *overrides):
    sources = (f"[{{kind: text_dir, name: docs, path: {root / 'texts'}, doc_chars: 0}}, "
               f"{{kind: jsonl, name: lines, path: {root / 'lines.jsonl'}}}]")
    # one partition per file, so the fan-out shows one task per file
    return load_config("tiny", [f"workspace={ws}", f"ingest.sources={sources}", "ingest.partition_bytes=1", *overrides])


def snapshot_rows(cfg, snapshot: str) -> set[tuple]:
    with Workspace(cfg.workspace).duckdb(read_only=True) as con:
        return set(catalog.rows(con, "SELECT doc_id, source, uri, record_no, text FROM documents WHERE snapshot = ?",
                                [snapshot])) | set(catalog.rows(
            con, "SELECT reason, source, uri, record_no, snippet FROM quarantine WHERE snapshot = ?", [snapshot]))


def partition_task_runs(flow_run_id) -> list[str]:
    """Names of the partition task runs of the ingest subflow under this flow run."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId

    with get_client(sync_client=True) as client:
        subflows = client.read_flow_runs(flow_run_filter=FlowRunFilter(
            parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[flow_run_id])))
        ids = [r.id for r in subflows]
        tasks = client.read_task_runs(flow_run_filter=FlowRunFilter(id={"any_": ids})) if ids else []
    return sorted(t.name for t in tasks if t.state and t.state.is_completed())


def dedup_artifact(flow_run_id) -> str:
    """The Markdown the dedup task published in the Prefect UI for this flow run."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        (artifact,) = client.read_artifacts(artifact_filter=ArtifactFilter(
            key=ArtifactFilterKey(any_=["dedup-output"]), flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))
    return artifact.data


def test_dask_fan_out_equals_the_plain_run(tmp_path, prefect_harness):
    from flows.pipeline import pipeline_flow

    root = tmp_path / "corpus"
    (root / "texts").mkdir(parents=True)
    for name, text in TEXTS.items():
        (root / "texts" / name).write_text(text)
    (root / "lines.jsonl").write_text(json.dumps({"text": inspect.getdoc(shutil.rmtree)}) + "\n{broken\n")

    plain_cfg = config(root, tmp_path / "plain")
    plain = run_pipeline(plain_cfg, only="dedup")
    # one worker process (a second one only costs start-up time here): it must not open the catalog
    dask_cfg = config(root, tmp_path / "dask", "flow.task_runner=dask", "flow.dask_workers=1")
    state = pipeline_flow(config=dask_cfg.to_dict(), only="dedup", return_state=True)
    assert state.is_completed(), state
    fanned = state.result()
    assert list(fanned) == ["ingest", "dedup"]
    assert fanned["ingest"].key == plain["ingest"].key and fanned["dedup"].key == plain["dedup"].key
    assert fanned["ingest"].metrics == plain["ingest"].metrics
    assert fanned["ingest"].metrics["partitions_read"] == len(TEXTS) + 1
    assert fanned["dedup"].metrics["dropped_by_reason"] == plain["dedup"].metrics["dropped_by_reason"]
    assert snapshot_rows(dask_cfg, fanned["ingest"].key) == snapshot_rows(plain_cfg, plain["ingest"].key)
    runs = partition_task_runs(state.state_details.flow_run_id)
    assert len(runs) == len(TEXTS) + 1 and all(r.startswith("ingest ") for r in runs), runs
    assert not any((Workspace(dask_cfg.workspace).artifacts / "ingest" / ".partitions").iterdir())
    assert "| read == quarantined + kept + dropped | yes |" in dedup_artifact(state.state_details.flow_run_id)

    # a new file: the next flow run fans out that one partition and copies the rest from the catalog
    (root / "texts" / "new.txt").write_text(inspect.getdoc(textwrap.indent))
    threads = config(root, tmp_path / "dask", "flow.task_runner=dask", "flow.dask_processes=false")
    state = pipeline_flow(config=threads.to_dict(), only="dedup", return_state=True)
    assert state.is_completed(), state
    grown = state.result()["ingest"]  # not forced: only dedup is
    assert (grown.metrics["partitions_read"], grown.metrics["partitions_reused"]) == (1, len(TEXTS) + 1)
    assert partition_task_runs(state.state_details.flow_run_id) == ["ingest docs:new.txt"]


def test_an_existing_cluster_by_address_runs_ingest_and_dedup(tmp_path, prefect_harness):
    """flow.dask_address: the flow's ingest partitions and the dedup stage's MinHash tasks run on a cluster it
    did not start (a LocalCluster with two worker processes, reached by its address), with the plain result."""
    from distributed import Client, LocalCluster

    from flows.pipeline import pipeline_flow

    root = tmp_path / "corpus"
    (root / "texts").mkdir(parents=True)
    for name, text in TEXTS.items():
        (root / "texts" / name).write_text(text)
    (root / "texts" / "near.txt").write_text(TEXTS["t0.txt"].replace("Serialize", "Serialise", 1))
    (root / "lines.jsonl").write_text(json.dumps({"text": inspect.getdoc(shutil.rmtree)}) + "\n")
    plain_cfg = config(root, tmp_path / "plain")
    plain = run_pipeline(plain_cfg, only="dedup")
    assert plain["dedup"].metrics["dropped_by_reason"].get("near_duplicate") == 1
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1", dashboard_address=None) as cluster:
        cfg = config(root, tmp_path / "cluster", "flow.task_runner=dask", f"flow.dask_address={cluster.scheduler_address}")
        state = pipeline_flow(config=cfg.to_dict(), only="dedup", return_state=True)
        assert state.is_completed(), state
        with Client(cluster) as client:
            ran = client.run_on_scheduler(lambda dask_scheduler: sorted(dask_scheduler.task_prefixes))
    assert {"signature_partition", "bucket_range", "verify_chunk"} <= set(ran), ran
    assert any("ingest" in name for name in ran), ran  # the Prefect partition tasks ran there too
    got = state.result()
    assert got["dedup"].key == plain["dedup"].key
    assert snapshot_rows(cfg, got["ingest"].key) == snapshot_rows(plain_cfg, plain["ingest"].key)
    with Workspace(cfg.workspace).duckdb(read_only=True) as a, Workspace(plain_cfg.workspace).duckdb(read_only=True) as b:
        sql = "SELECT doc_id, status, reason, duplicate_of FROM doc_status ORDER BY doc_id"
        assert catalog.rows(a, sql) == catalog.rows(b, sql)
