"""Stage 8, export: one self-contained directory — safetensors weights, tokenizer, config with lineage."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from pipelines import pretrain as pretrain_stage
from pipelines.config import PipelineConfig
from pipelines.lineage import lineage
from pipelines.workspace import StageResult, Workspace, run_stage, stage_key

STAGE, VERSION = "export", "1"


def key(cfg: PipelineConfig, results: dict[str, StageResult]) -> str:
    return stage_key(STAGE, VERSION, {}, [results["pretrain"], results["evaluate"]])


def run(cfg: PipelineConfig, ws: Workspace, results: dict[str, StageResult], force: bool = False) -> StageResult:
    pretrain, evaluate = results["pretrain"], results["evaluate"]

    def build(out: Path) -> dict:
        shutil.copytree(pretrain_stage.model_dir(pretrain), out, dirs_exist_ok=True)
        config = json.loads((out / "config.json").read_text())
        config["lineage"] = lineage(cfg, results)
        config["metrics"] = evaluate.metrics
        (out / "config.json").write_text(json.dumps(config, indent=2))
        (out / "README.md").write_text(_model_card(cfg, config))
        return {"files": len(list(out.iterdir()))}

    result = run_stage(ws, STAGE, key(cfg, results), build, force)
    tmp = ws.latest_export_file.with_suffix(".tmp")
    tmp.write_text(result.path)
    os.replace(tmp, ws.latest_export_file)
    return result


def _model_card(cfg: PipelineConfig, config: dict) -> str:
    m, metrics = cfg.model, config["metrics"]
    lines = [
        f"# {cfg.register.model_name} ({cfg.name})", "",
        f"A {m.n_layer}-layer, {m.n_embd}-wide decoder-only transformer ({m.num_params():,} parameters, "
        f"{m.pos} positions, {m.norm}, {m.mlp}), trained from scratch by lmforge.", "",
        "## Metrics (validation split)", "",
        f"- bits per byte: {metrics['val_bpb']:.4f} (untrained: {metrics['untrained_val_bpb']:.4f})",
        f"- loss: {metrics['val_loss']:.4f}, perplexity: {metrics['val_perplexity']:.2f}", "",
        "## Lineage", "",
        *[f"- {k}: `{v}`" for k, v in config["lineage"].items()], "",
        "Load with `lm_core.weights.load_model_dir(<this directory>)`.", "",
    ]
    return "\n".join(lines)
