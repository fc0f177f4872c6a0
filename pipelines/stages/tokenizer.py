"""Stage 4, tokenizer: SentencePiece BPE trained on a seeded sample of the train split, streamed from DuckDB.

With `tokenizer.model_file` the stage trains nothing: it takes that model (its sha256 is part of the key)
and still measures it on the validation split, so continued training keeps the ids its model knows.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from pathlib import Path

from lm_core.shards import file_sha256
from lm_core.tokenizer import Tokenizer, train_tokenizer
from pipelines.config import ConfigError, PipelineConfig
from pipelines.data import catalog
from pipelines.workspace import StageResult, Workspace, run_stage, stage_key

STAGE, VERSION = "tokenizer", "1"
MODEL_FILE = "tokenizer.model"


def key(cfg: PipelineConfig, split: StageResult) -> str:
    fixed = file_sha256(Path(cfg.tokenizer.model_file)) if cfg.tokenizer.model_file else None
    return stage_key(STAGE, VERSION, cfg.tokenizer, [split], extra=fixed)


def preflight(cfg: PipelineConfig) -> None:
    """A fixed tokenizer must exist and have the configured vocabulary size."""
    if not cfg.tokenizer.model_file:
        return
    path = Path(cfg.tokenizer.model_file)
    if not path.is_file():
        raise ConfigError(f"tokenizer.model_file={str(path)!r} does not exist; point it at a tokenizer.model "
                          "(e.g. an export's) or unset it to train a tokenizer")
    vocab = Tokenizer(path).vocab_size
    if vocab != cfg.tokenizer.vocab_size:
        raise ConfigError(f"tokenizer.model_file has {vocab} pieces but tokenizer.vocab_size={cfg.tokenizer.vocab_size}; "
                          f"set tokenizer.vocab_size={vocab}")


def run(cfg: PipelineConfig, ws: Workspace, split: StageResult, force: bool = False) -> StageResult:
    def build(out: Path) -> dict:
        started = time.perf_counter()
        with ws.duckdb() as con:
            # a seeded order, so when the split is larger than sample_bytes the sample is a fair one
            order = f"md5(d.doc_id || ':{int(cfg.tokenizer.seed)}')"
            if cfg.tokenizer.model_file:
                shutil.copyfile(cfg.tokenizer.model_file, out / MODEL_FILE)
            else:
                train_tokenizer(cfg.tokenizer, _lines(catalog.split_texts(con, split.key, "train", order=order)), out / MODEL_FILE)
            train_s = time.perf_counter() - started
            tok = Tokenizer(out / MODEL_FILE)
            byte_piece = tok.byte_pieces()
            n_bytes = n_tokens = n_byte_tokens = 0
            for batch in catalog.split_texts(con, split.key, "val"):
                texts = [text for _, text in batch]
                n_bytes += sum(len(t.encode("utf-8")) for t in texts)
                for ids in tok.encode_arrays(texts, cfg.tokenizer.num_threads):
                    n_tokens += ids.size
                    n_byte_tokens += int(byte_piece[ids].sum())
        # numeric metrics reach MLflow through the register stage (as tokenizer.<name>)
        return {"vocab_size": tok.vocab_size, "sha256": tok.sha256, "train_seconds": round(train_s, 3),
                "fixed_model_file": cfg.tokenizer.model_file or None,
                "val_bytes": n_bytes, "val_tokens": n_tokens,
                "val_bytes_per_token": n_bytes / max(1, n_tokens),
                # share of val tokens that are raw bytes: high means the vocabulary misses the val text
                "val_byte_fallback_share": n_byte_tokens / max(1, n_tokens)}

    return run_stage(ws, STAGE, key(cfg, split), build, force)


def model_path(result: StageResult) -> Path:
    return result.dir / MODEL_FILE


def _lines(batches: Iterator[list[tuple[str, str]]]) -> Iterator[str]:
    for batch in batches:
        for _, text in batch:
            yield from text.splitlines(keepends=True)
