"""Where the data stages' partition work runs: in this process, in local worker processes, or on a Dask
cluster (a LocalCluster started here, or an existing one by address or scheduler file).

A task is a picklable top-level function and its arguments; results come back in submission order. Tasks
exchange data through files under the workspace, so a cluster's workers must see the workspace at the
same path (a shared volume): what travels over the wire is paths and small counts only.
"""

from __future__ import annotations

import json
import multiprocessing
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from lm_core.typed_config import ConfigError

CONNECT_TIMEOUT_S = 10


class TaskPool:
    """Runs `fn(*args)` for each args tuple; `workers` says how many run at once (for sizing the work)."""

    def __init__(self, workers: int = 1, executor: Any = None, dask_client: Any = None):
        self.workers, self._executor, self._client = workers, executor, dask_client

    @property
    def inline(self) -> bool:
        return self._executor is None and self._client is None

    @property
    def distributed(self) -> bool:
        """A Dask cluster: its workers may be other machines, where this process's DuckDB threads are not."""
        return self._client is not None

    def map(self, fn: Callable, arg_tuples: Sequence[tuple]) -> list:
        if self.inline:
            return [fn(*args) for args in arg_tuples]
        futures = self._submit(fn, arg_tuples)
        return self._client.gather(futures) if self._client is not None else [f.result() for f in futures]

    def _submit(self, fn: Callable, arg_tuples: Sequence[tuple]) -> list:
        if self._client is not None:  # pure=False: never merge two submissions into one task
            return [self._client.submit(fn, *args, pure=False) for args in arg_tuples]
        return [self._executor.submit(fn, *args) for args in arg_tuples]

    def batches(self, fn: Callable, arg_tuples: Sequence[tuple], most: int) -> Iterator[list]:
        """The results of `fn(*args)` in submission order, as lists of consecutive results: each list waits for
        the next result, then takes those after it that are already done, up to `most`. A consumer that works
        on each list as it comes (ingest loading partitions into the catalog) overlaps the tasks still running,
        and its lists grow when it falls behind. Inline, the tasks run `most` at a time as the lists are asked for."""
        if self.inline:
            for i in range(0, len(arg_tuples), max(1, most)):
                yield [fn(*args) for args in arg_tuples[i:i + max(1, most)]]
            return
        futures, i = self._submit(fn, arg_tuples), 0
        try:
            while i < len(futures):
                batch = [futures[i].result()]
                i += 1
                while i < len(futures) and len(batch) < most and futures[i].done():
                    batch.append(futures[i].result())
                    i += 1
                yield batch
        finally:  # the consumer failed or stopped early: the tasks not yet started are not run
            for future in futures[i:]:
                future.cancel()

    def warm(self, *modules: str) -> None:
        """Start local worker processes now, importing `modules` in each, without waiting: a spawned worker
        otherwise starts (and imports DuckDB, pyarrow, ...) only when the first task arrives, while this
        process's serial work (exports) could have hidden it. Dask workers and the inline pool are warm."""
        if self._executor is not None:
            for _ in range(self.workers):
                self._executor.submit(import_modules, modules)


def import_modules(modules: tuple[str, ...]) -> None:
    """Task: import modules (TaskPool.warm)."""
    import importlib

    for name in modules:
        importlib.import_module(name)


def query_partition(sql: str, path: str) -> Any:
    """Task: the Arrow table of `sql` run in a fresh one-thread DuckDB, its one parameter the Parquet path
    (or glob) of a partition. Kept in this light module: a worker imports only what the task names."""
    import duckdb

    with duckdb.connect() as con:
        con.execute("SET threads = 1")
        return con.sql(sql, params=[path]).to_arrow_table()


def scheduler_address(address: str | None, scheduler_file: str | None) -> str | None:
    """The scheduler's address from flow.dask_address, or read from flow.dask_scheduler_file."""
    if address or not scheduler_file:
        return address
    path = Path(scheduler_file)
    try:
        return json.loads(path.read_text())["address"]
    except (OSError, ValueError, KeyError) as exc:
        raise ConfigError(f"flow.dask_scheduler_file={scheduler_file}: cannot read a scheduler address from it "
                          f"({type(exc).__name__}: {exc}); start the scheduler with --scheduler-file {scheduler_file}") from None


def connect(address: str) -> Any:
    """A dask.distributed Client on an existing scheduler; one line that says what to do when none answers."""
    from distributed import Client

    try:
        return Client(address, timeout=CONNECT_TIMEOUT_S)
    except (OSError, TimeoutError) as exc:
        raise ConfigError(f"flow.dask_address={address}: no Dask scheduler answered within {CONNECT_TIMEOUT_S} s "
                          f"({type(exc).__name__}); start one (infra/docker-compose.dask.yml) or unset flow.dask_address") from None


def check_cluster(flow: Any) -> None:
    """Before any work: the cluster that flow.dask_address / flow.dask_scheduler_file names answers."""
    if flow.task_runner == "dask" and (address := scheduler_address(flow.dask_address, flow.dask_scheduler_file)):
        connect(address).close()


@contextmanager
def task_pool(flow: Any) -> Iterator[TaskPool]:
    """The pool `flow` (a FlowConfig) asks for: a Dask cluster with flow.task_runner=dask (the one at
    flow.dask_address / flow.dask_scheduler_file, else a LocalCluster of flow.dask_workers), else
    flow.data_workers local processes (1: this process)."""
    if flow.task_runner == "dask":
        address = scheduler_address(flow.dask_address, flow.dask_scheduler_file)
        if address:
            client = connect(address)
            try:
                yield TaskPool(max(1, len(client.scheduler_info().get("workers", {}))), dask_client=client)
            finally:
                client.close()
            return
        from distributed import Client, LocalCluster

        kwargs = {"host": "127.0.0.1"} if flow.dask_processes else {}
        with LocalCluster(n_workers=flow.dask_workers, threads_per_worker=1, processes=flow.dask_processes,
                          dashboard_address=None, **kwargs) as cluster, Client(cluster) as client:
            yield TaskPool(flow.dask_workers, dask_client=client)
        return
    workers = flow.data_workers or 1
    if workers == 1:
        yield TaskPool(1)
        return
    from concurrent.futures import ProcessPoolExecutor

    # spawn, not fork: the parent holds DuckDB's threads, and a forked child could inherit a held lock
    executor = ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"))
    try:
        yield TaskPool(workers, executor=executor)
    finally:  # the workers exit on their own: waiting for them cost the stage ~0.1 s at its end
        executor.shutdown(wait=False, cancel_futures=True)
