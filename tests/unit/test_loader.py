"""Unit tests for lm_core.loader: window layout, the seeded order, rank partitions, epochs and resume."""

from __future__ import annotations

import json

import numpy as np
import pytest

from lm_core.loader import TokenLoader, segment_ids
from lm_core.shards import ShardError, ShardWriter, open_split, write_index

T = 4  # block_size


def shards_of(*sizes: int) -> list[np.ndarray]:
    """Shards of consecutive distinct ids, so a window's first token says where it came from."""
    out, start = [], 0
    for size in sizes:
        out.append(np.arange(start, start + size, dtype=np.uint16))
        start += size
    return out


def first_tokens(loader: TokenLoader, batches: int) -> list[int]:
    return [int(row[0]) for _ in range(batches) for row in next(loader)]


def all_window_starts(shards: list[np.ndarray]) -> list[int]:
    return sorted(int(s[0]) + i * T for s in shards for i in range((s.size - 1) // T))


def test_windows_are_strided_slices_within_one_shard():
    shards = shards_of(13, 10, 3)  # 3 + 2 + 0 windows: the 3-token shard is too short for one
    loader = TokenLoader(shards, block_size=T, batch_size=5, seed=0)
    assert loader.windows_per_epoch == 5
    batch = next(loader)
    assert batch.shape == (5, T + 1) and batch.dtype == np.int64
    assert all(np.array_equal(np.diff(row), np.ones(T)) for row in batch)  # contiguous: never crosses shards
    assert sorted(batch[:, 0].tolist()) == [0, 4, 8, 13, 17]
    # stride block_size: every token after a shard's first is a target exactly once
    targets = sorted(batch[:, 1:].ravel().tolist())
    assert targets == [*range(1, 13), *range(14, 22)]


def test_window_views_are_zero_copy():
    shards = shards_of(21)
    loader = TokenLoader(shards, block_size=T, batch_size=1, seed=0)
    view = loader.window(2)
    assert view.tolist() == [8, 9, 10, 11, 12]
    assert np.shares_memory(view, shards[0])


def test_an_epoch_visits_every_window_once_and_epochs_differ():
    shards = shards_of(41, 33, 29)  # 10 + 8 + 7 = 25 windows
    loader = TokenLoader(shards, block_size=T, batch_size=5, seed=1)
    epoch0, epoch1 = first_tokens(loader, 5), first_tokens(loader, 5)
    assert sorted(epoch0) == sorted(epoch1) == all_window_starts(shards)
    assert epoch0 != epoch1
    assert loader.epoch == 2 and loader.position == 0


def test_order_depends_on_seed_only():
    shards = shards_of(201)
    a, b = TokenLoader(shards, T, 8, seed=5), TokenLoader(shards, T, 8, seed=5)
    np.testing.assert_array_equal(np.concatenate([next(a) for _ in range(6)]), np.concatenate([next(b) for _ in range(6)]))
    other = TokenLoader(shards, T, 8, seed=6)
    assert first_tokens(TokenLoader(shards, T, 8, seed=5), 3) != first_tokens(other, 3)
    # the batch size only groups the same stream differently
    assert first_tokens(TokenLoader(shards, T, 2, seed=5), 12) == first_tokens(TokenLoader(shards, T, 3, seed=5), 8)


def test_a_batch_runs_over_the_epoch_boundary():
    shards = shards_of(29)  # 7 windows; batches of 3 end epoch 0 inside the third batch
    loader = TokenLoader(shards, T, 3, seed=2)
    stream = first_tokens(loader, 3)
    assert sorted(stream[:7]) == all_window_starts(shards)
    assert stream[7:] == [int(w) * T for w in loader.rank_order(1)[:2]]
    assert (loader.epoch, loader.position) == (1, 2)


@pytest.mark.parametrize("world_size", [2, 3])
def test_ranks_read_disjoint_equal_parts_of_the_global_order(world_size):
    shards = shards_of(81, 45)  # 20 + 11 = 31 windows
    single = TokenLoader(shards, T, 1, seed=9)
    ranks = [TokenLoader(shards, T, 2, seed=9, rank=r, world_size=world_size) for r in range(world_size)]
    per_rank = 31 // world_size
    for epoch in range(2):
        parts = [set(r.rank_order(epoch).tolist()) for r in ranks]
        assert all(len(p) == per_rank for p in parts)
        assert sum(len(p) for p in parts) == len(set().union(*parts))  # disjoint
        # together the ranks read exactly the first per_rank * world_size windows of the global order
        assert set().union(*parts) == set(single.rank_order(epoch)[: per_rank * world_size].tolist())
    # rank streams interleaved sample by sample are the single-rank stream
    streams = [first_tokens(r, 3) for r in ranks]
    assert [s[i] for i in range(6) for s in streams] == first_tokens(single, 6 * world_size)


def test_resume_yields_exactly_the_uninterrupted_batches():
    shards = shards_of(61, 40)  # 15 + 9 = 24 windows: 16 batches of 5 span four epochs
    straight = TokenLoader(shards, T, 5, seed=3)
    expected = [next(straight) for _ in range(16)]
    for stop in (0, 4, 5, 7, 13):
        first = TokenLoader(shards, T, 5, seed=3)
        for _ in range(stop):
            next(first)
        state = json.loads(json.dumps(first.state_dict()))  # it survives a checkpoint's serialisation
        resumed = TokenLoader(shards, T, 5, seed=3)
        resumed.load_state_dict(state)
        for step in range(stop, 16):
            np.testing.assert_array_equal(next(resumed), expected[step], err_msg=f"stop={stop} step={step}")


def test_resume_per_rank_and_with_another_world_size():
    shards = shards_of(161)  # 40 windows
    two = [TokenLoader(shards, T, 3, seed=4, rank=r, world_size=2) for r in range(2)]
    for loader in two:
        for _ in range(5):  # 15 samples per rank, 30 of the global order
            next(loader)
    state = two[0].state_dict()
    assert state == two[1].state_dict()  # the same on every rank
    resumed = [TokenLoader(shards, T, 3, seed=4, rank=r, world_size=2) for r in range(2)]
    for loader, original in zip(resumed, two):
        loader.load_state_dict(state)
        np.testing.assert_array_equal(next(loader), next(original))
    one = TokenLoader(shards, T, 5, seed=4)
    one.load_state_dict(state)  # 30 samples split evenly over 1 rank: the rest of the global order follows
    assert first_tokens(one, 2) == [int(w) * T for w in one.rank_order(0)[30:40]]
    three = TokenLoader(shards, T, 1, seed=4, rank=0, world_size=3)
    three.load_state_dict(state)  # 30 / 3 ranks = 10 each
    assert three.position == 10
    four = TokenLoader(shards, T, 1, seed=4, rank=0, world_size=4)
    with pytest.raises(ValueError, match="4 ranks cannot split evenly; resume with world_size=2"):
        four.load_state_dict(state)


def test_a_bare_batch_index_resumes_from_the_start_of_the_stream():
    shards = shards_of(61)  # 15 windows
    straight = TokenLoader(shards, T, 4, seed=3)
    expected = [next(straight) for _ in range(6)]
    resumed = TokenLoader(shards, T, 4, seed=3)
    resumed.load_state_dict({"index": 4})  # what a checkpoint saved before loader state existed holds
    np.testing.assert_array_equal(next(resumed), expected[4])
    assert resumed.epoch == 1


@pytest.mark.parametrize("change", [dict(seed=8), dict(block_size=3), dict(shards=shards_of(81))])
def test_resume_refuses_another_order(change):
    args = dict(shards=shards_of(161), block_size=T, batch_size=2, seed=7) | change
    state = TokenLoader(shards_of(161), T, 2, seed=7).state_dict()
    with pytest.raises(ValueError, match="resume with the same train.seed, model.block_size and shards"):
        TokenLoader(**args).load_state_dict(state)


def test_too_little_data_and_bad_arguments():
    with pytest.raises(ShardError, match=r"hold 1 windows of block_size\+1=5 tokens, fewer than world_size=2"):
        TokenLoader(shards_of(7), T, 1, seed=0, rank=0, world_size=2)
    with pytest.raises(ValueError, match=r"rank=2 must be in \[0, world_size=2\)"):
        TokenLoader(shards_of(100), T, 1, seed=0, rank=2, world_size=2)


def test_reads_memory_mapped_shards(tmp_path):
    writer = ShardWriter(tmp_path, "train", 30, vocab_size=512, bos_id=1, eos_id=2)
    for d in range(8):
        writer.add(list(range(10 + 10 * d, 20 + 10 * d)), num_bytes=10)
    write_index(tmp_path, writer.close(), "ab" * 32, 512)
    shards = open_split(tmp_path, "train", "ab" * 32)
    loader = TokenLoader(shards, T, 4, seed=0)
    assert len(shards) > 1 and all(s[0] == 1 for s in shards)  # several shards, each opening with bos
    flat = np.concatenate(shards)
    rows = np.concatenate([next(loader) for _ in range(loader.windows_per_epoch // 4)])
    views = np.lib.stride_tricks.sliding_window_view(flat, T + 1)
    for row in rows:
        assert (views == row).all(axis=1).any()


def test_segment_ids_number_documents_inside_a_window():
    BOS = 1
    batch = np.array([[7, 8, 1, 9, 9, 1, 5], [1, 4, 4, 4, 4, 4, 4]])  # (B=2, T+1=7)
    np.testing.assert_array_equal(segment_ids(batch, BOS), [[0, 0, 1, 1, 1, 2], [0, 0, 0, 0, 0, 0]])
    assert segment_ids(batch, BOS).dtype == np.int32


def test_last_window_ids_locate_the_rows_of_the_last_batch():
    shards = shards_of(30, 50)
    loader = TokenLoader(shards, T, batch_size=5, seed=3)
    for _ in range(6):  # crosses an epoch boundary (19 windows per epoch)
        batch = next(loader)
        assert len(loader.last_window_ids) == 5
        for row, window_id in zip(batch, loader.last_window_ids):
            k, start = loader.locate(window_id)
            assert (row == shards[k][start : start + T + 1]).all()


@pytest.mark.parametrize("sizes", [(201,), (41, 33, 29)], ids=["one shard: one gather", "several shards: row by row"])
def test_batches_hold_exactly_the_windows_they_name(sizes):
    shards = shards_of(*sizes)
    loader = TokenLoader(shards, T, batch_size=7, seed=4)
    for _ in range(12):  # several epochs, batches across their boundaries
        batch = next(loader)
        expected = np.stack([loader.window(w) for w in loader.last_window_ids]).astype(np.int64)
        np.testing.assert_array_equal(batch, expected)
