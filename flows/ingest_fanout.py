"""Ingest fanned out: one Prefect task per new partition (a group of input files), on the task runner that
`flow.task_runner` names (`dask`: prefect-dask's DaskTaskRunner on the cluster at flow.dask_address or
flow.dask_scheduler_file, else on a LocalCluster it starts).

A partition task writes Parquet files under the workspace and never the catalog (DuckDB allows one
writer process); the ingest stage task that follows loads them, in the flow's own process. This module
imports only the ingest stage, so a Dask worker process that unpickles the task stays light.
"""

from __future__ import annotations

from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from pipelines.config import PipelineConfig, from_dict
from pipelines.data.task_pool import connect, scheduler_address
from pipelines.stages import ingest
from pipelines.workspace import Workspace


@task(cache_policy=NO_CACHE, persist_result=False)
def ingest_partition_task(cfg: PipelineConfig, partition: ingest.Partition) -> dict:
    return ingest.ingest_partition(cfg, Workspace(cfg.workspace), partition)


@flow(name="lmforge-ingest-partitions")
def ingest_partitions_flow(config: dict, keys: list[str]) -> dict[str, dict]:
    """Stage the partitions with these keys; returns key -> counts (read, documents, quarantined)."""
    cfg = from_dict(config)
    todo = [p for p in ingest.partitions(cfg) if p.key in set(keys)]
    futures = {p.key: ingest_partition_task.with_options(task_run_name=f"ingest {p.name}").submit(cfg, p) for p in todo}
    return {k: f.result() for k, f in futures.items()}


def task_runner(cfg: PipelineConfig):
    """The task runner `flow.task_runner` names, or None for Prefect's default (threads in this process)."""
    if cfg.flow.task_runner != "dask":
        return None
    try:
        from prefect_dask import DaskTaskRunner
    except ImportError:
        raise ImportError("flow.task_runner=dask needs prefect-dask: pip install -c constraints.txt prefect-dask") from None
    address = scheduler_address(cfg.flow.dask_address, cfg.flow.dask_scheduler_file)
    if address:
        connect(address).close()  # unreachable: one line that names the key, before Prefect's own retries
        return DaskTaskRunner(address=address)
    cluster = {"n_workers": cfg.flow.dask_workers, "threads_per_worker": 1, "processes": cfg.flow.dask_processes,
               "dashboard_address": None}
    if cfg.flow.dask_processes:
        cluster["host"] = "127.0.0.1"  # the scheduler and workers talk on this machine only
    return DaskTaskRunner(cluster_kwargs=cluster)


def fan_out_ingest(cfg: PipelineConfig, ws: Workspace, force: bool) -> int:
    """Stage the partitions the next ingest would read, in parallel; returns how many there were."""
    runner = task_runner(cfg)
    pending = ingest.pending_partitions(cfg, ws, force)
    if runner is None or not pending:
        return 0
    ingest_partitions_flow.with_options(task_runner=runner)(config=cfg.to_dict(), keys=[p.key for p in pending])
    return len(pending)
