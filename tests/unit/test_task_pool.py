"""TaskPool.batches, which ingest uses to load partitions while the workers stage the next ones: results in
submission order, lists that grow when the consumer falls behind, and the tasks not yet started cancelled
when the consumer stops early. Real worker processes (spawned), no mocks."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from pipelines.data.neardup import numpy_of
from pipelines.data.task_pool import TaskPool, task_pool


def two_workers():
    """flow.data_workers=2. Imported here, not at the top: the spawned workers import this module to run
    echo_after, and pipelines.config would make them import torch (seconds, under CI's load)."""
    from pipelines.config import FlowConfig

    return FlowConfig(data_workers=2)


def echo_after(value: int, seconds: float, marker: str | None = None) -> int:
    """Task: `value`, after `seconds` (and a marker file, to see which tasks ran)."""
    time.sleep(seconds)
    if marker:
        Path(marker).write_text(str(value))
    return value


def test_inline_batches_run_most_at_a_time():
    pool = TaskPool(1)
    got = list(pool.batches(echo_after, [(i, 0.0) for i in range(7)], 3))
    assert got == [[0, 1, 2], [3, 4, 5], [6]]


@pytest.mark.slow
def test_worker_batches_come_in_order_and_grow_when_the_consumer_is_slow():
    # the first task is the slowest: the others finish before it, yet come after it
    args = [(0, 2.0)] + [(i, 0.01) for i in range(1, 9)]
    with task_pool(two_workers()) as pool:
        got = list(pool.batches(echo_after, args, 4))
    assert [v for batch in got for v in batch] == list(range(9))
    assert all(1 <= len(batch) <= 4 for batch in got)
    assert len(got[0]) == 4, f"{got}: the tasks done while the first ran should have joined its list"


@pytest.mark.slow
def test_a_consumer_that_stops_early_cancels_the_tasks_not_started(tmp_path):
    args = [(i, 0.3, str(tmp_path / f"ran-{i}")) for i in range(12)]
    with task_pool(two_workers()) as pool:
        for batch in pool.batches(echo_after, args, 1):
            assert batch == [0]
            break
    time.sleep(1.0)  # the workers finish what they had started
    ran = len(list(tmp_path.glob("ran-*")))
    assert 1 <= ran < 12, f"{ran} of 12 tasks ran after the consumer stopped at the first"


def test_numpy_of_reads_arrow_integers_without_importing_pandas():
    """pyarrow's own to_numpy imports pandas (~0.3 s in every fresh near-dup worker); numpy_of does not."""
    arrays = [pa.Array.from_buffers(pa.int64(), 5, [None, pa.py_buffer(np.arange(5, dtype=np.int64))]).slice(1, 3),
              pa.chunked_array([pa.Array.from_buffers(pa.uint64(), 2, [None, pa.py_buffer(np.array([7, 2**63], np.uint64))])]),
              pa.Array.from_buffers(pa.int32(), 3, [None, pa.py_buffer(np.array([0, 4, 9], np.int32))])]
    expected = [np.array([1, 2, 3]), np.array([7, 2**63], np.uint64), np.array([0, 4, 9], np.int32)]
    for array, want in zip(arrays, expected):
        got = numpy_of(array)
        assert got.dtype == want.dtype and np.array_equal(got, want)
    with pytest.raises(ValueError, match="1 nulls"):
        numpy_of(pa.Array.from_buffers(pa.int64(), 2, [pa.py_buffer(np.packbits([1, 0], bitorder="little")),
                                                        pa.py_buffer(np.zeros(2, np.int64))]))
    # in a fresh process: this one may have imported pandas already (MLflow, Prefect)
    probe = ("import sys, duckdb; from pipelines.data.neardup import numpy_of; "
             "t = duckdb.connect().sql('SELECT range::BIGINT AS i FROM range(5)').to_arrow_table(); "
             "assert list(numpy_of(t.column('i'))) == [0, 1, 2, 3, 4]; print('pandas' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "False", "numpy_of imported pandas"
