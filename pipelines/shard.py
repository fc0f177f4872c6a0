"""Stage 5, shard: encode the train and validation splits into Arrow token shards with an index."""

from __future__ import annotations

from pathlib import Path

from lm_core.shards import ShardWriter, write_index
from lm_core.tokenizer import Tokenizer
from pipelines import catalog
from pipelines import tokenizer as tokenizer_stage
from pipelines.config import PipelineConfig
from pipelines.workspace import StageResult, Workspace, run_stage, stage_key

STAGE, VERSION = "shard", "1"


def key(cfg: PipelineConfig, split: StageResult, tokenizer: StageResult) -> str:
    return stage_key(STAGE, VERSION, cfg.shard, [split, tokenizer])


def run(cfg: PipelineConfig, ws: Workspace, split: StageResult, tokenizer: StageResult, force: bool = False) -> StageResult:
    def build(out: Path) -> dict:
        tok = Tokenizer(tokenizer_stage.model_path(tokenizer))
        shards = []
        with ws.duckdb() as con:
            for name in ("train", "val"):
                writer = ShardWriter(out, name, cfg.shard.tokens_per_shard, tok.vocab_size, tok.bos_id, tok.eos_id)
                for batch in catalog.split_texts(con, split.key, name, cfg.shard.batch_docs):
                    texts = [text for _, text in batch]
                    for text, ids in zip(texts, tok.encode_batch(texts, cfg.shard.num_threads)):
                        writer.add(ids, len(text.encode("utf-8")))
                shards += writer.close()
        index = write_index(out, shards, tok.sha256, tok.vocab_size)
        return {f"{split_name}_{k}": v for split_name, totals in index["totals"].items() for k, v in totals.items()}

    return run_stage(ws, STAGE, key(cfg, split, tokenizer), build, force)
