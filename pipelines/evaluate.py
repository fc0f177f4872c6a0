"""Stage 7, evaluate: validation loss, perplexity and bits per byte, trained vs untrained, plus samples."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from lm_core.evaluation import bits_per_byte
from lm_core.generate import generate
from lm_core.model import GPT
from lm_core.shards import open_split
from lm_core.tokenizer import Tokenizer
from lm_core.weights import load_model_dir
from pipelines import pretrain as pretrain_stage
from pipelines import tokenizer as tokenizer_stage
from pipelines.config import PipelineConfig
from pipelines.workspace import StageResult, Workspace, run_stage, stage_key

STAGE, VERSION = "evaluate", "1"
SAMPLES_FILE = "samples.json"


def key(cfg: PipelineConfig, pretrain: StageResult, shard: StageResult, tokenizer: StageResult) -> str:
    return stage_key(STAGE, VERSION, cfg.eval, [pretrain, shard, tokenizer])


def run(cfg: PipelineConfig, ws: Workspace, pretrain: StageResult, shard: StageResult, tokenizer: StageResult,
        force: bool = False) -> StageResult:
    def build(out: Path) -> dict:
        tok = Tokenizer(tokenizer_stage.model_path(tokenizer))
        model, _ = load_model_dir(pretrain_stage.model_dir(pretrain))
        val = open_split(shard.dir, "val", tok.sha256)
        token_bytes = tok.token_bytes()
        args = dict(block_size=cfg.model.block_size, max_windows=cfg.eval.max_windows, batch_size=cfg.eval.batch_size)
        trained = bits_per_byte(model, val, token_bytes, **args)
        torch.manual_seed(cfg.train.seed)  # the same initial weights the training run started from
        untrained = bits_per_byte(GPT(cfg.model), val, token_bytes, **args)
        samples = [
            {"prompt": p, "completion": tok.decode(generate(model, tok.encode(p, bos=True), cfg.eval.sampling, eos_id=tok.eos_id))}
            for p in cfg.eval.prompts
        ]
        (out / SAMPLES_FILE).write_text(json.dumps(samples, indent=2))
        metrics = {
            "val_loss": trained["loss"],
            "val_perplexity": trained["perplexity"],
            "val_bpb": trained["bpb"],
            "untrained_val_loss": untrained["loss"],
            "untrained_val_bpb": untrained["bpb"],
            "val_tokens": trained["tokens"],
            "val_bytes": trained["bytes"],
        }
        (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
        return metrics

    return run_stage(ws, STAGE, key(cfg, pretrain, shard, tokenizer), build, force)


def samples(result: StageResult) -> list[dict]:
    return json.loads((result.dir / SAMPLES_FILE).read_text())
