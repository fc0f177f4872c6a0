"""Near-dup as partition-parallel work gives the single-process result exactly: same dropped documents, same
survivors, same counts, for 1 worker, for local worker processes and for a Dask cluster of worker processes
(real dask.distributed), on real text (standard-library docstrings) with planted exact and near copies."""

from __future__ import annotations

import collections
import inspect
import itertools
import json
import os
import random
import re
import shutil
import textwrap

import duckdb
import numpy as np
import pyarrow as pa
import pytest

from pipelines.config import FlowConfig
from pipelines.data.neardup import MinHasher, NearDupConfig, band_table, find_near_duplicates
from pipelines.data.neardup_partitioned import find_near_duplicates_partitioned
from pipelines.data.task_pool import ConfigError, TaskPool, task_pool


def corpus(seed: int = 0) -> list[str]:
    """~250 docstrings, then near copies (a word or two changed), exact copies, copies of copies (chains)
    and documents without words, shuffled so originals and copies interleave."""
    docs = [inspect.getdoc(obj) for mod in (json, shutil, textwrap, re, os, collections, itertools, random)
            for _, obj in inspect.getmembers(mod) if callable(obj) and inspect.getdoc(obj)]
    docs = [d for d in dict.fromkeys(docs) if len(d.split()) >= 40][:250]
    rng = random.Random(seed)
    planted = []
    for d in rng.sample(docs, 60):
        words = d.split(" ")
        words[rng.randrange(len(words))] = "zebra"
        planted.append(" ".join(words))
    planted += rng.sample(docs, 20) + rng.sample(planted, 10)  # exact copies; copies of near copies
    planted += ["", "...", "x"]
    texts = docs + planted
    rng.shuffle(texts)
    return texts


def table(texts: list[str], first_idx: int = 0):
    con = duckdb.connect()
    con.register("src", pa.table({"idx": np.arange(first_idx, first_idx + len(texts)), "text": texts}))
    con.execute("CREATE TABLE docs AS SELECT * FROM src")
    con.unregister("src")
    return con


def same(a, b) -> None:
    assert np.array_equal(a.dropped, b.dropped) and np.array_equal(a.survivor, b.survivor)
    assert (a.candidates, a.verified, a.clusters) == (b.candidates, b.verified, b.clusters)


@pytest.fixture(scope="module")
def planted():
    texts = corpus()
    con = table(texts)
    reference = find_near_duplicates(con, "SELECT idx, text FROM docs", len(texts), NearDupConfig())
    assert len(reference.dropped) >= 60 and reference.clusters >= 40  # the planted copies were found
    return texts, con, reference


@pytest.mark.parametrize("rows_per_partition", [16, 10_000])
def test_one_worker_any_partitioning_gives_the_single_process_result(planted, tmp_path, rows_per_partition):
    texts, con, reference = planted
    params = NearDupConfig()
    got = find_near_duplicates_partitioned(con, "SELECT idx, text FROM docs", len(texts), params, TaskPool(1),
                                           tmp_path / "work", rows_per_partition=rows_per_partition, with_bands=True)
    same(got, reference)
    assert np.array_equal(got.band_idx, reference.band_idx) and np.array_equal(got.bands, reference.bands)


def test_reference_set_of_an_earlier_run_is_matched_the_same_way(tmp_path):
    """Incremental dedup: idx < n_reference are an earlier run's kept documents, given as stored band rows."""
    texts = corpus(seed=1)
    n_ref = 120
    hasher = MinHasher(NearDupConfig())
    con = table(texts[n_ref:], first_idx=n_ref)
    con.register("ref_src", pa.table({"idx": np.arange(n_ref), "text": texts[:n_ref]}))
    con.execute("CREATE TABLE ref_texts AS SELECT * FROM ref_src")
    from pipelines.data.neardup import read_words

    idx, words, offsets = read_words(con, "SELECT idx, text FROM ref_texts")
    sig = hasher.signatures(words, offsets)
    has = (sig != np.uint32(0xFFFFFFFF)).any(axis=1)
    con.register("ref_band_rows", band_table(idx[has], hasher.band_hashes(sig[has])))
    con.execute("CREATE TABLE ref_bands AS SELECT idx, band, bucket FROM ref_band_rows")
    refs = {"n_reference": n_ref, "reference_bands_sql": "SELECT idx, band, bucket FROM ref_bands",
            "reference_text_sql": "SELECT idx, text FROM ref_texts"}
    single = find_near_duplicates(con, "SELECT idx, text FROM docs", len(texts), NearDupConfig(), **refs)
    assert (single.survivor < n_ref).any()  # some new documents duplicate a reference document
    got = find_near_duplicates_partitioned(con, "SELECT idx, text FROM docs", len(texts), NearDupConfig(), TaskPool(1),
                                           tmp_path / "work", rows_per_partition=40, **refs)
    same(got, single)


@pytest.mark.slow
def test_local_worker_processes_give_the_single_process_result(planted, tmp_path):
    texts, con, reference = planted
    with task_pool(FlowConfig(data_workers=2)) as pool:
        got = find_near_duplicates_partitioned(con, "SELECT idx, text FROM docs", len(texts), NearDupConfig(), pool,
                                               tmp_path / "work", rows_per_partition=50)
    same(got, reference)


@pytest.mark.slow
def test_dask_cluster_by_address_gives_the_single_process_result(planted, tmp_path):
    """A real LocalCluster with two worker processes, reached by its address as an existing cluster is."""
    from distributed import LocalCluster

    texts, con, reference = planted
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1", dashboard_address=None) as cluster:
        flow = FlowConfig(task_runner="dask", dask_address=cluster.scheduler_address)
        flow.validate()
        with task_pool(flow) as pool:
            assert pool.workers == 2
            got = find_near_duplicates_partitioned(con, "SELECT idx, text FROM docs", len(texts), NearDupConfig(), pool,
                                                   tmp_path / "work", rows_per_partition=50)
    same(got, reference)


def test_an_unreachable_cluster_fails_in_one_line(monkeypatch, tmp_path):
    import socket

    from pipelines.data import task_pool as module

    monkeypatch.setattr(module, "CONNECT_TIMEOUT_S", 2)
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(ConfigError, match=r"flow.dask_address=tcp://127.0.0.1:\d+: no Dask scheduler answered") as err:
        with task_pool(FlowConfig(task_runner="dask", dask_address=f"tcp://127.0.0.1:{port}")):
            pass
    assert "\n" not in str(err.value)
    from pipelines.config import load_config
    from pipelines.stages.runner import preflight

    cfg = load_config("tiny", [f"workspace={tmp_path}", "flow.task_runner=dask", f"flow.dask_address=tcp://127.0.0.1:{port}"])
    with pytest.raises(ConfigError, match="no Dask scheduler answered"):  # before any stage runs
        preflight(cfg)


@pytest.mark.parametrize("flow, message", [
    (FlowConfig(dask_address="tcp://h:8786"), "set flow.task_runner=dask"),
    (FlowConfig(task_runner="dask", dask_address="h:8786"), "write it as tcp://HOST:8786"),
    (FlowConfig(task_runner="dask", dask_address="tcp://h:1", dask_scheduler_file="s.json"), "choose one"),
    (FlowConfig(data_workers=0), "flow.data_workers=0 must be >= 1"),
])
def test_cluster_settings_are_checked_before_work(flow, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        flow.validate()
