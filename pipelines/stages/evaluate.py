"""Stage 7, evaluate: validation loss, perplexity and bits per byte, trained vs untrained; the same on
extra text files; multiple-choice tasks (accuracy with a 95% interval, plus how much of each task
overlaps the training data); samples for fixed prompts, each drawn with its own seed (`prompt_sampling`).

Validation scores use `eval.max_windows` windows sampled with a fixed seed over the whole split (or all of
them), and record which (`val_windows_sha256`): the promotion gate compares models on identical windows.
Metric names are stable across runs (the MLflow compare view lines them up): val_*, untrained_val_*,
val_{bpb,loss}.<source> (when the split holds several sources), text.<name>.{loss,bpb},
mc.<task>.{acc,acc_norm,acc_ci_low,acc_ci_high,chance,n,overlap_fraction}.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from lm_core.engine import load_init_weights
from lm_core.evaluation import bits_per_byte
from lm_core.generate import SamplingConfig, generate
from lm_core.model import GPT
from lm_core.multiple_choice import evaluate_task, load_task
from lm_core.shards import document_tokens, open_documents, open_split
from lm_core.tokenizer import Tokenizer
from lm_core.weights import load_model_dir
from pipelines.config import EvalTaskConfig, PipelineConfig
from pipelines.data import bigbench, decontam
from pipelines.stages import pretrain as pretrain_stage
from pipelines.stages import projector
from pipelines.stages import tokenizer as tokenizer_stage
from pipelines.workspace import StageResult, Workspace, run_stage, stage_key

STAGE, VERSION = "evaluate", "3"  # 2: a fixed-seed sample of windows over the whole split; per source
# 3: a seed per prompt; the starting model of a continued run scored per source too
SAMPLES_FILE, TASKS_FILE = "samples.json", "tasks.json"


def key(cfg: PipelineConfig, pretrain: StageResult, shard: StageResult, tokenizer: StageResult) -> str:
    # the content of task and text files, not just their paths, decides the scores
    files = [t.path for t in cfg.eval.tasks if t.path] + list(cfg.eval.texts)
    extra = {p: _sha256(Path(p)) for p in files} or None
    return stage_key(STAGE, VERSION, cfg.eval, [pretrain, shard, tokenizer], extra=extra)


def run(cfg: PipelineConfig, ws: Workspace, pretrain: StageResult, shard: StageResult, tokenizer: StageResult,
        force: bool = False) -> StageResult:
    for task in cfg.eval.tasks:  # a missing file fails before any work; BIG-bench tasks are fetched in build
        if task.path and not Path(task.path).is_file():
            raise FileNotFoundError(f"eval.tasks[{task.label}].path={task.path} does not exist; "
                                    "point it at a .jsonl or BIG-bench task.json file")
    for path in cfg.eval.texts:
        if not Path(path).is_file():
            raise FileNotFoundError(f"eval.texts: {path} does not exist; list UTF-8 text files to score")

    def build(out: Path) -> dict:
        task_files = _task_files(cfg, ws)
        tok = Tokenizer(tokenizer_stage.model_path(tokenizer))
        model, _ = load_model_dir(pretrain_stage.model_dir(pretrain))
        val = open_split(shard.dir, "val", tok.sha256)
        token_bytes = tok.token_bytes()
        args = dict(block_size=cfg.model.block_size, max_windows=cfg.eval.max_windows, batch_size=cfg.eval.batch_size)
        trained = bits_per_byte(model, val, token_bytes, **args)
        torch.manual_seed(cfg.train.seed)  # the same initial weights the training run started from
        untrained = bits_per_byte(GPT(cfg.model), val, token_bytes, **args)
        samples = []
        for p in cfg.eval.prompts:  # each prompt its own seed, derived from eval.sampling.seed and its text
            sampling = prompt_sampling(cfg.eval.sampling, p)
            ids = generate(model, tok.encode(p, bos=True), sampling, eos_id=tok.eos_id)
            samples.append({"prompt": p, "seed": sampling.seed, "completion": tok.decode(ids)})
        (out / SAMPLES_FILE).write_text(json.dumps(samples, indent=2))
        metrics = {
            "val_loss": trained["loss"],
            "val_perplexity": trained["perplexity"],
            "val_bpb": trained["bpb"],
            "untrained_val_loss": untrained["loss"],
            "untrained_val_bpb": untrained["bpb"],
            "val_tokens": trained["tokens"],
            "val_bytes": trained["bytes"],
            "val_windows": trained["windows"],
            # the exact token windows scored: the promotion gate compares two models only on the same ones
            "val_windows_sha256": trained["windows_sha256"],
            **_per_source(ws, model, val, shard, tok, token_bytes, args),
        }
        if cfg.train.init_from:  # continued training: the model it started from, on the same validation data
            init_model = load_init_weights(cfg.train.init_from, cfg.model)
            start = bits_per_byte(init_model, val, token_bytes, **args)
            metrics.update({"init_val_loss": start["loss"], "init_val_bpb": start["bpb"]})
            # and on each source's documents apart: init_val_bpb.inbox beside val_bpb.inbox, the new documents
            metrics.update({f"init_{k}": v for k, v in _per_source(ws, init_model, val, shard, tok, token_bytes, args).items()})
        metrics.update(text_scores(model, tok, [Path(p) for p in cfg.eval.texts], cfg.model.block_size, cfg.eval.batch_size))
        if task_files:
            rows = _score_tasks(cfg, model, tok, shard, task_files)
            (out / TASKS_FILE).write_text(json.dumps(rows, indent=2))
            metrics.update(task_metrics(rows))
        (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
        tb_dir = pretrain.metrics.get("tensorboard_dir")
        if tb_dir:  # the embeddings in TensorBoard's projector, labelled with pieces, beside the training scalars
            projector.write_projector(model, tok, Path(tb_dir) / projector.PROJECTOR_DIR)
        return metrics

    return run_stage(ws, STAGE, key(cfg, pretrain, shard, tokenizer), build, force)


def prompt_sampling(sampling: SamplingConfig, prompt: str) -> SamplingConfig:
    """The sampling settings for one of several prompts sampled under one configured seed: a seed of the
    prompt's own, derived from (seed, prompt text), so the prompts do not share one noise stream and a
    prompt's sample stays the same when prompts are added or reordered. Unseeded settings stay unseeded."""
    if sampling.seed is None:
        return sampling
    digest = hashlib.sha256(f"{sampling.seed}\0{prompt}".encode()).digest()
    return dataclasses.replace(sampling, seed=int.from_bytes(digest[:4], "little"))


def _per_source(ws: Workspace, model, val: list[np.ndarray], shard: StageResult, tok: Tokenizer, token_bytes,
                args: dict) -> dict[str, float]:
    """val_bpb.<source> and val_loss.<source> over each source's own validation documents, when the split
    holds several sources (a continued run's new inbox documents are scored apart from the old ones)."""
    documents = open_documents(shard.dir, "val", tok.sha256)
    if documents is None:
        return {}
    ids = sorted({str(d) for ids, _ in documents.tables for d in ids})
    with ws.duckdb(read_only=True) as con:
        con.register("val_ids", pa.table({"doc_id": ids}))
        sources = con.execute("""SELECT any_value(d.source), d.doc_id FROM documents d JOIN val_ids USING (doc_id)
                                 GROUP BY d.doc_id""").fetchall()
    by_source: dict[str, set[str]] = {}
    for source, doc_id in sources:
        by_source.setdefault(source, set()).add(doc_id)
    if len(by_source) < 2:
        return {}
    out = {}
    for source, doc_ids in sorted(by_source.items()):
        runs = document_tokens(val, documents, doc_ids)
        if sum(r.size for r in runs) > args["block_size"]:
            scores = bits_per_byte(model, [np.concatenate(runs)], token_bytes, **args)
            out.update({f"val_bpb.{source}": scores["bpb"], f"val_loss.{source}": scores["loss"]})
    return out


def _task_files(cfg: PipelineConfig, ws: Workspace) -> dict[str, tuple[EvalTaskConfig, Path]]:
    named = [t.bigbench for t in cfg.eval.tasks if t.bigbench]
    prepared = bigbench.prepare(ws, named) if named else {}
    files = {}
    for task in cfg.eval.tasks:
        path = prepared[task.bigbench] if task.bigbench else Path(task.path)
        files[task.label.replace("/", ".")] = (task, path)
    return files


def text_scores(model, tok: Tokenizer, paths: list[Path], block_size: int, batch_size: int = 8) -> dict[str, float]:
    """text.<stem>.{loss,bpb} of each UTF-8 text file, scored whole (bos + text + eos)."""
    out = {}
    for path in paths:
        ids = np.array([tok.bos_id, *tok.encode(Path(path).read_text(encoding="utf-8")), tok.eos_id], dtype=np.uint16)
        scores = bits_per_byte(model, [ids], tok.token_bytes(), block_size=block_size, batch_size=batch_size)
        out.update({f"text.{Path(path).stem}.loss": scores["loss"], f"text.{Path(path).stem}.bpb": scores["bpb"]})
    return out


def score_tasks(model, tok: Tokenizer, task_files: dict[str, Path], max_examples: int | None = None) -> list[dict]:
    """One row per multiple-choice task file (JSONL or BIG-bench task.json): accuracies, interval, chance."""
    rows = []
    for name, path in task_files.items():
        scores = evaluate_task(model, tok.encode, load_task(path)[:max_examples], bos_id=tok.bos_id)
        rows.append({"task": name, "source": str(path), **{k: v for k, v in scores.items() if k != "examples"}})
    return rows


def task_metrics(rows: list[dict]) -> dict[str, float]:
    keys = ("acc", "acc_norm", "acc_ci_low", "acc_ci_high", "chance", "n", "overlap_fraction")
    return {f"mc.{row['task']}.{k}": row[k] for row in rows for k in keys if k in row}


def _score_tasks(cfg: PipelineConfig, model, tok: Tokenizer, shard: StageResult,
                 task_files: dict[str, tuple[EvalTaskConfig, Path]]) -> list[dict]:
    """One row per task: accuracies with intervals, chance level, and the training-data overlap (word
    n-grams of context + correct choice, hashed as the dedup stage's decontamination hashes them)."""
    n = cfg.eval.decontam_ngram
    train_text = (tok.decode(array[start : start + 200_000].tolist())  # the training text, decoded from its tokens
                  for array in open_split(shard.dir, "train", tok.sha256) for start in range(0, array.size, 200_000))
    reference = decontam.reference_ngrams(train_text, n)
    rows = []
    for name, (task, path) in task_files.items():
        row = score_tasks(model, tok, {name: path}, task.max_examples)[0]
        examples = load_task(path)[: task.max_examples]
        texts = [ex.context + " " + " ".join(ex.choices[i] for i in sorted(ex.correct)) for ex in examples]
        checkable, hit = decontam.overlapping(texts, reference, n)
        checked = int(checkable.sum())
        rows.append({**row, "overlap_fraction": int(hit.sum()) / checked if checked else 0.0,
                     "overlapping_examples": int(hit.sum()), "ngram": n})
    return rows


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "missing"


def samples(result: StageResult) -> list[dict]:
    return json.loads((result.dir / SAMPLES_FILE).read_text())


def task_rows(result: StageResult) -> list[dict]:
    path = result.dir / TASKS_FILE
    return json.loads(path.read_text()) if path.is_file() else []
