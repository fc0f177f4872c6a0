"""The tokenizer and shard stages on the tiny config, through to the loader: what the manifest
records, that the shards decode back to the split's documents, the tokenizer metrics, and that
shards made with another tokenizer are refused by the stages that read them."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest

from lm_core.loader import TokenLoader
from lm_core.shards import ShardError, open_split, read_index
from lm_core.tokenizer import Tokenizer
from pipelines.config import load_config
from pipelines.data import catalog
from pipelines.stages import pretrain
from pipelines.stages import tokenizer as tokenizer_stage
from pipelines.stages.runner import run_pipeline
from pipelines.workspace import Workspace

pytestmark = [pytest.mark.integration, pytest.mark.slow]  # ~3-6 s: one tiny data pipeline


@pytest.fixture(scope="module")
def cfg(tmp_path_factory):
    return load_config("tiny", [f"workspace={tmp_path_factory.mktemp('tokshards') / 'ws'}"])


@pytest.fixture(scope="module")
def results(cfg):
    return run_pipeline(cfg, only="shard")


@contextlib.contextmanager
def read_catalog(cfg):
    import duckdb

    con = duckdb.connect(str(Workspace(cfg.workspace).catalog), read_only=True)
    try:
        yield con
    finally:
        con.close()


def test_tokenizer_metrics(results):
    m = results["tokenizer"].metrics
    assert m["train_seconds"] > 0
    assert 1.5 < m["val_bytes_per_token"] < 8  # code at vocab 512: a few bytes per token
    assert m["val_bytes_per_token"] == pytest.approx(m["val_bytes"] / m["val_tokens"])
    assert 0 <= m["val_byte_fallback_share"] < 0.05  # stdlib source is nearly all ASCII the vocab covers
    assert m["val_bytes"] == results["split"].metrics["val_bytes"]


def test_shards_decode_to_the_documents_in_doc_id_order(results, cfg):
    shard_dir, split = results["shard"].dir, results["split"]
    tok = Tokenizer(tokenizer_stage.model_path(results["tokenizer"]))
    index = read_index(shard_dir, tok.sha256)
    assert index["dtype"] == "uint16"  # vocab 512 fits
    with read_catalog(cfg) as con:
        for name in ("train", "val"):
            docs = [row for batch in catalog.split_texts(con, split.key, name) for row in batch]
            records = [s for s in index["shards"] if s["split"] == name]
            arrays = open_split(shard_dir, name, tok.sha256)
            assert len(arrays) == len(records) and (name == "val" or len(records) > 1)
            seen = 0
            for record, tokens in zip(records, arrays):
                assert tokens.dtype == np.uint16
                # documents are [bos, ids..., eos]; split at the bos tokens and decode each one
                starts = np.flatnonzero(tokens == tok.bos_id)
                assert starts.size == record["num_docs"] and tokens[-1] == tok.eos_id
                shard_docs = docs[seen : seen + record["num_docs"]]
                assert (record["first_doc_id"], record["last_doc_id"]) == (shard_docs[0][0], shard_docs[-1][0])
                for (doc_id, text), ids in zip(shard_docs, np.split(tokens, starts[1:])):
                    assert tok.decode(ids[1:-1]) == text, f"{doc_id} does not round-trip"
                assert record["num_bytes"] == sum(len(t.encode("utf-8")) for _, t in shard_docs)
                assert record["tokenizer_sha256"] == tok.sha256
                seen += record["num_docs"]
            assert seen == len(docs)


def test_shard_stage_reports_encode_speed(results):
    m = results["shard"].metrics
    assert m["encode_seconds"] > 0 and m["encode_mb_per_s"] > 0


def test_loader_covers_the_train_shards(results, cfg):
    shards = open_split(results["shard"].dir, "train")
    loader = TokenLoader(shards, cfg.model.block_size, cfg.train.micro_batch_size, seed=cfg.train.seed)
    n = loader.windows_per_epoch
    assert n == sum((s.size - 1) // cfg.model.block_size for s in shards)
    epoch = np.concatenate([next(loader) for _ in range(-(-n // cfg.train.micro_batch_size))])[:n]
    every_window = np.stack([loader.window(w) for w in range(n)]).astype(np.int64)
    # one epoch is every window once, in an order that is not the file order
    np.testing.assert_array_equal(np.unique(epoch, axis=0), np.unique(every_window, axis=0))
    assert not np.array_equal(epoch, every_window)


def test_stages_refuse_shards_of_another_tokenizer(results, cfg):
    other_cfg = load_config("tiny", [f"workspace={cfg.workspace}", "tokenizer.vocab_size=600"])
    other = tokenizer_stage.run(other_cfg, Workspace(cfg.workspace), results["split"])
    assert other.metrics["sha256"] != results["tokenizer"].metrics["sha256"]
    with pytest.raises(ShardError) as err:  # before any training starts
        pretrain.run(other_cfg, Workspace(cfg.workspace), results["shard"], other)
    message = str(err.value)
    assert results["tokenizer"].metrics["sha256"][:12] in message and other.metrics["sha256"][:12] in message
    assert "rerun the shard stage with this tokenizer" in message
