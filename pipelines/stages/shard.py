"""Stage 5, shard: encode the train and validation splits into Arrow token shards with an index."""

from __future__ import annotations

import time
from pathlib import Path

from lm_core.shards import ShardWriter, encode_documents, write_index
from lm_core.tokenizer import Tokenizer
from pipelines.config import PipelineConfig
from pipelines.data import catalog
from pipelines.stages import tokenizer as tokenizer_stage
from pipelines.workspace import StageResult, Workspace, run_stage, stage_key

STAGE, VERSION = "shard", "3"  # 2: per-shard doc id range and tokenizer hash; 3: per-shard document tables


def key(cfg: PipelineConfig, split: StageResult, tokenizer: StageResult) -> str:
    return stage_key(STAGE, VERSION, cfg.shard, [split, tokenizer])


def run(cfg: PipelineConfig, ws: Workspace, split: StageResult, tokenizer: StageResult, force: bool = False) -> StageResult:
    def build(out: Path) -> dict:
        tok = Tokenizer(tokenizer_stage.model_path(tokenizer))
        shards = []
        started = time.perf_counter()
        with ws.duckdb() as con:
            for name in ("train", "val"):
                writer = ShardWriter(out, name, cfg.shard.tokens_per_shard, tok.vocab_size, tok.bos_id, tok.eos_id)
                batches = catalog.split_texts(con, split.key, name, cfg.shard.batch_docs)  # in doc_id order
                encode_documents(tok, writer, batches, cfg.shard.num_threads)
                shards += writer.close()
        seconds = time.perf_counter() - started
        index = write_index(out, shards, tok.sha256, tok.vocab_size)
        metrics = {f"{split_name}_{k}": v for split_name, totals in index["totals"].items() for k, v in totals.items()}
        text_mb = sum(totals["num_bytes"] for totals in index["totals"].values()) / 1e6
        return {**metrics, "encode_seconds": round(seconds, 3), "encode_mb_per_s": round(text_mb / max(seconds, 1e-9), 3)}

    return run_stage(ws, STAGE, key(cfg, split, tokenizer), build, force)
