"""Unit tests for lm_core.shards: writing, the index, verified zero-copy reads, and evaluation windows."""

from __future__ import annotations

import json

import numpy as np
import pytest

from lm_core.shards import (
    INDEX_FILE,
    ShardError,
    ShardWriter,
    document_tokens,
    evaluation_windows,
    open_documents,
    open_split,
    read_index,
    token_dtype,
    write_index,
)

BOS, EOS, SHA = 1, 2, "ab" * 32


def docs(n: int, length: int, offset: int = 10) -> list[list[int]]:
    """n documents of distinct ids, so any window can be located in the shards."""
    return [[offset + d * length + i for i in range(length)] for d in range(n)]


def write_split(out, split, documents, tokens_per_shard=10_000, vocab_size=4096):
    writer = ShardWriter(out, split, tokens_per_shard, vocab_size, BOS, EOS)
    for d, ids in enumerate(documents):
        writer.add(ids, num_bytes=3 * len(ids), doc_id=f"{split}-{d:03d}")
    return writer.close()


@pytest.fixture
def shard_dir(tmp_path):
    """train: 6 docs of 20 ids in shards of >= 50 tokens; val: 2 docs in one shard."""
    out = tmp_path / "shards"
    infos = write_split(out, "train", docs(6, 20), tokens_per_shard=50)
    infos += write_split(out, "val", docs(2, 20, offset=1000))
    write_index(out, infos, SHA, 4096)
    return out


def test_token_dtype():
    assert token_dtype(512) == np.uint16
    assert token_dtype(65536) == np.uint16
    assert token_dtype(65537) == np.uint32
    assert token_dtype(70000) == np.uint32


def test_round_trip_layout_and_dtype(shard_dir):
    train = open_split(shard_dir, "train", SHA)
    assert all(a.dtype == np.uint16 for a in train)
    expected = np.concatenate([[BOS, *ids, EOS] for ids in docs(6, 20)])
    np.testing.assert_array_equal(np.concatenate(train), expected)
    val = open_split(shard_dir, "val")
    np.testing.assert_array_equal(val[0], np.concatenate([[BOS, *ids, EOS] for ids in docs(2, 20, offset=1000)]))


def test_small_tokens_per_shard_gives_several_shards(shard_dir):
    index = read_index(shard_dir)
    train = [s for s in index["shards"] if s["split"] == "train"]
    # 22 tokens per doc; a shard is written once it holds >= 50 tokens, so docs are never cut
    assert [s["file"] for s in train] == ["train_00000.arrow", "train_00001.arrow"]
    assert [(s["num_tokens"], s["num_docs"], s["num_bytes"]) for s in train] == [(66, 3, 180), (66, 3, 180)]
    assert sorted(p.name for p in shard_dir.iterdir()) == [INDEX_FILE, "train_00000.arrow", "train_00000.docs.arrow",
                                                           "train_00001.arrow", "train_00001.docs.arrow",
                                                           "val_00000.arrow", "val_00000.docs.arrow"]


def test_index_records_doc_id_range_and_tokenizer_per_shard(shard_dir):
    shards = read_index(shard_dir)["shards"]
    assert [(s["file"], s["first_doc_id"], s["last_doc_id"]) for s in shards] == [
        ("train_00000.arrow", "train-000", "train-002"),
        ("train_00001.arrow", "train-003", "train-005"),
        ("val_00000.arrow", "val-000", "val-001"),
    ]
    assert all(s["tokenizer_sha256"] == SHA for s in shards)
    assert read_index(shard_dir)["format"] == 3


@pytest.mark.parametrize("batch_docs", [1, 2, 5, 64])
def test_add_batch_lays_out_shards_like_adding_one_by_one(tmp_path, batch_docs):
    rng = np.random.default_rng(0)
    documents = [rng.integers(4, 500, size=int(n)).astype(np.int32) for n in rng.integers(0, 40, size=37)]
    one = write_split(tmp_path / "one", "train", [d.tolist() for d in documents], tokens_per_shard=100)
    writer = ShardWriter(tmp_path / "batched", "train", 100, 4096, BOS, EOS)
    for i in range(0, len(documents), batch_docs):
        chunk = documents[i : i + batch_docs]
        writer.add_batch(chunk, [3 * d.size for d in chunk], [f"train-{d:03d}" for d in range(i, i + len(chunk))])
    batched = writer.close()
    assert len(one) > 3
    assert batched == one  # same files, counts, doc id ranges and checksums
    write_index(tmp_path / "batched", batched, SHA, 4096)
    flat = np.concatenate(open_split(tmp_path / "batched", "train"))
    np.testing.assert_array_equal(flat, np.concatenate([[BOS, *d, EOS] for d in documents]))


def test_index_totals(shard_dir):
    index = read_index(shard_dir)
    assert index["tokenizer_sha256"] == SHA and index["vocab_size"] == 4096 and index["dtype"] == "uint16"
    assert index["totals"] == {
        "train": {"num_tokens": 132, "num_docs": 6, "num_bytes": 360, "num_shards": 2},
        "val": {"num_tokens": 44, "num_docs": 2, "num_bytes": 120, "num_shards": 1},
    }


def test_uint32_for_large_vocab(tmp_path):
    ids = [65_000, 69_999, 5]
    infos = write_split(tmp_path, "train", [ids], vocab_size=70_000)
    write_index(tmp_path, infos, SHA, 70_000)
    (arr,) = open_split(tmp_path, "train")
    assert arr.dtype == np.uint32
    assert arr.tolist() == [BOS, *ids, EOS]
    assert read_index(tmp_path)["dtype"] == "uint32"


def test_reads_are_zero_copy_and_read_only(shard_dir):
    for arr in open_split(shard_dir, "train"):
        assert not arr.flags.owndata and arr.base is not None
        assert not arr.flags.writeable
        with pytest.raises(ValueError):
            arr[0] = 7


def test_flipped_byte_is_detected(shard_dir):
    path = shard_dir / "train_00001.arrow"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ShardError) as err:
        open_split(shard_dir, "train")
    assert "train_00001.arrow" in str(err.value) and "corrupted" in str(err.value)
    open_split(shard_dir, "val")  # the other split is untouched


def test_truncated_file_is_detected(shard_dir):
    path = shard_dir / "train_00000.arrow"
    path.write_bytes(path.read_bytes()[:-16])
    with pytest.raises(ShardError, match=r"train_00000\.arrow is corrupted or truncated"):
        open_split(shard_dir, "train")


def test_missing_file_is_detected(shard_dir):
    (shard_dir / "val_00000.arrow").unlink()
    with pytest.raises(ShardError, match=r"shard file missing: .*val_00000\.arrow"):
        open_split(shard_dir, "val")


def test_token_count_mismatch_is_detected(shard_dir):
    index = json.loads((shard_dir / INDEX_FILE).read_text())
    index["shards"][0]["num_tokens"] += 1
    (shard_dir / INDEX_FILE).write_text(json.dumps(index))
    with pytest.raises(ShardError, match="holds 66 tokens, manifest says 67"):
        open_split(shard_dir, "train")


def test_tokenizer_mismatch(shard_dir):
    with pytest.raises(ShardError) as err:
        open_split(shard_dir, "train", tokenizer_sha256="cd" * 32)
    assert "rerun the shard stage" in str(err.value)
    assert SHA[:12] in str(err.value) and ("cd" * 6) in str(err.value)


def test_a_shard_from_another_tokenizer_is_named(shard_dir):
    index = json.loads((shard_dir / INDEX_FILE).read_text())
    index["shards"][1]["tokenizer_sha256"] = "cd" * 32  # a shard slipped in from another run
    (shard_dir / INDEX_FILE).write_text(json.dumps(index))
    with pytest.raises(ShardError, match=r"made with tokenizer cdcdcdcdcdcd \(train_00001\.arrow\)"):
        open_split(shard_dir, "val", SHA)


def test_a_newer_format_is_refused(shard_dir):
    index = json.loads((shard_dir / INDEX_FILE).read_text())
    index["format"] = 99
    (shard_dir / INDEX_FILE).write_text(json.dumps(index))
    with pytest.raises(ShardError, match="shard format 99, newer than this code reads"):
        read_index(shard_dir)


def test_missing_index_and_missing_split(tmp_path, shard_dir):
    with pytest.raises(ShardError, match="no shard index"):
        open_split(tmp_path / "empty", "train")
    with pytest.raises(ShardError, match="split 'test' has no shards"):
        open_split(shard_dir, "test")


def test_evaluation_windows_cover_every_token_once():
    T = 4
    shards = [np.arange(0, 7, dtype=np.uint16), np.arange(7, 13, dtype=np.uint16)]  # 13 tokens = 3*T + 1
    windows = evaluation_windows(shards, T)
    assert [w.tolist() for w in windows] == [[0, 1, 2, 3, 4], [4, 5, 6, 7, 8], [8, 9, 10, 11, 12]]
    assert all(w.dtype == np.int64 for w in windows)
    # consecutive windows share exactly one token, and every token after the first is a target once
    targets = np.concatenate([w[1:] for w in windows])
    np.testing.assert_array_equal(targets, np.arange(1, 13))


def test_evaluation_windows_drop_the_partial_tail_and_respect_max_windows():
    flat = np.arange(12, dtype=np.uint16)  # 2 full windows of T=4 (needs 9 tokens), tail of 3 dropped
    assert len(evaluation_windows([flat], 4)) == 2
    assert len(evaluation_windows([flat], 4, max_windows=1)) == 1
    assert evaluation_windows([flat[:4]], 4) == []  # shorter than one window


def test_a_window_sample_spreads_over_the_whole_split_and_is_fixed():
    flat = np.arange(4001, dtype=np.uint16)  # 1000 windows of T=4
    sample = evaluation_windows([flat], 4, max_windows=50)
    starts = [int(w[0]) for w in sample]
    assert len(starts) == 50 and starts == sorted(starts) and len(set(starts)) == 50
    assert starts[0] < 400 and starts[-1] > 3600  # not the first 50 windows: the tail counts too
    assert [int(w[0]) for w in evaluation_windows([flat], 4, max_windows=50)] == starts  # the same every time


def test_document_tokens_are_the_spans_of_the_named_documents():
    from lm_core.shards import ShardDocuments

    shards = [np.arange(10, dtype=np.uint16), np.arange(100, 106, dtype=np.uint16)]
    docs = ShardDocuments([(np.array(["a", "b", "c"], dtype=object), np.array([0, 4, 7])),
                           (np.array(["d", "e"], dtype=object), np.array([0, 3]))])
    runs = document_tokens(shards, docs, {"b", "c", "e"})
    assert [r.tolist() for r in runs] == [[4, 5, 6, 7, 8, 9], [103, 104, 105]]
    assert document_tokens(shards, docs, set()) == []


def test_document_tables_name_the_documents_of_any_token_span(tmp_path):
    """Documents of several lengths, added one by one and in batches, across shard boundaries."""
    out = tmp_path / "shards"
    rng = np.random.default_rng(0)
    documents = [list(range(10, 10 + int(n))) for n in rng.integers(1, 30, size=40)]
    writer = ShardWriter(out, "train", 60, 4096, BOS, EOS)
    writer.add_batch([np.array(d) for d in documents[:25]], [1] * 25, [f"doc-{i:02d}" for i in range(25)])
    for i, d in enumerate(documents[25:], 25):
        writer.add(d, 1, doc_id=f"doc-{i:02d}")
    write_index(out, writer.close(), SHA, 4096)
    shards, tables = open_split(out, "train"), open_documents(out, "train", SHA)
    assert len(shards) > 3 and len(tables.tables) == len(shards)
    for k, tokens in enumerate(shards):
        ids, starts = tables.tables[k]
        assert (tokens[starts] == BOS).all() and np.count_nonzero(tokens == BOS) == len(starts)
        # brute force: the document of every token is the last bos at or before it
        owner = np.cumsum(tokens == BOS) - 1
        for start, stop in [(0, 1), (0, tokens.size), (5, 17), (tokens.size - 3, tokens.size)]:
            expected = [str(ids[i]) for i in sorted(set(owner[start:stop].tolist()))]
            assert tables.doc_ids(k, start, stop) == expected
    all_ids = [str(d) for ids, _ in tables.tables for d in ids]
    assert all_ids == [f"doc-{i:02d}" for i in range(40)]


def test_document_table_checksum_and_absence(shard_dir, tmp_path):
    assert open_documents(shard_dir, "val") is not None
    index = read_index(shard_dir)
    table = shard_dir / index["shards"][0]["docs_file"]
    table.write_bytes(table.read_bytes()[:-8])
    with pytest.raises(ShardError, match="rerun the shard stage"):
        open_documents(shard_dir, "train")
    plain = tmp_path / "plain"  # shards written without document ids have no tables
    writer = ShardWriter(plain, "train", 100, 4096, BOS, EOS)
    writer.add([5, 6, 7], 3)
    write_index(plain, writer.close(), SHA, 4096)
    assert open_documents(plain, "train") is None
