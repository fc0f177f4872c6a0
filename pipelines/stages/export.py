"""Stage 8, export: one self-contained directory — safetensors weights, tokenizer, config with lineage,
a model card, and (when the architecture is Llama's) the same model in the Hugging Face layout under hf/.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import yaml

from lm_core.hf_export import hf_incompatibility, save_hf_dir, tokenizer_incompatibility
from lm_core.typed_config import to_dict
from lm_core.weights import TOKENIZER_FILE, load_model_dir
from pipelines.config import PipelineConfig
from pipelines.stages import pretrain as pretrain_stage
from pipelines.stages.lineage import lineage
from pipelines.workspace import StageResult, Workspace, run_stage, stage_key

STAGE, VERSION = "export", "2"
HF_DIR = "hf"  # the Hugging Face Llama layout (config.json, model.safetensors, tokenizer.*)


def key(cfg: PipelineConfig, results: dict[str, StageResult]) -> str:
    return stage_key(STAGE, VERSION, {}, [results["pretrain"], results["evaluate"]])


def run(cfg: PipelineConfig, ws: Workspace, results: dict[str, StageResult], force: bool = False) -> StageResult:
    pretrain, evaluate = results["pretrain"], results["evaluate"]

    def build(out: Path) -> dict:
        shutil.copytree(pretrain_stage.model_dir(pretrain), out, dirs_exist_ok=True)
        config = json.loads((out / "config.json").read_text())
        config["lineage"] = lineage(cfg, results)
        config["metrics"] = evaluate.metrics
        hf_note = _write_hf_layout(cfg, out)
        config["hf_layout"] = hf_note
        (out / "config.json").write_text(json.dumps(config, indent=2))
        (out / "README.md").write_text(_model_card(cfg, config))
        return {"files": len(list(out.iterdir())), "hf_layout": hf_note}

    result = run_stage(ws, STAGE, key(cfg, results), build, force)
    tmp = ws.latest_export_file.with_suffix(f".tmp-{os.getpid()}")  # two runs exporting at once: no clash
    tmp.write_text(result.path)
    os.replace(tmp, ws.latest_export_file)
    return result


def hf_dir(result: StageResult) -> Path | None:
    """The Hugging Face Llama directory of an export, or None when the architecture did not map."""
    path = result.dir / HF_DIR
    return path if (path / "config.json").is_file() else None


def _write_hf_layout(cfg: PipelineConfig, out: Path) -> str:
    """"hf" when written; otherwise "skipped: <why>" (a GPT-2-style model has no Llama equivalent)."""
    reason = hf_incompatibility(cfg.model) or tokenizer_incompatibility(out / TOKENIZER_FILE)
    if reason:
        return f"skipped: {reason}"
    model, _ = load_model_dir(out)
    save_hf_dir(model, out / TOKENIZER_FILE, out / HF_DIR, sampling=to_dict(cfg.eval.sampling))
    return HF_DIR


def _model_card(cfg: PipelineConfig, config: dict) -> str:
    m, metrics = cfg.model, config["metrics"]
    tasks = {k: v for k, v in metrics.items() if k.startswith("mc.")}
    training = {"model": to_dict(cfg.model), "train": to_dict(cfg.train), "tokenizer": to_dict(cfg.tokenizer)}
    lines = [
        f"# {cfg.register.model_name} ({cfg.name})", "",
        f"A {m.n_layer}-layer, {m.n_embd}-wide decoder-only transformer ({m.num_params():,} parameters, "
        f"{m.pos} positions, {m.norm}, {m.mlp}), trained from scratch by lmforge.", "",
        "## Metrics (validation split)", "",
        f"- bits per byte: {metrics['val_bpb']:.4f} (untrained: {metrics['untrained_val_bpb']:.4f})",
        f"- loss: {metrics['val_loss']:.4f}, perplexity: {metrics['val_perplexity']:.2f}",
        *[f"- {k}: {v:.4f}" for k, v in tasks.items() if isinstance(v, (int, float))], "",
        "## Data lineage", "",
        "Each key names an immutable stage output in the lmforge workspace (`artifacts/<stage>/<key>/`).", "",
        *[f"- {k}: `{v}`" for k, v in config["lineage"].items()], "",
        "## Training config", "",
        "```yaml", yaml.safe_dump(training, sort_keys=False).rstrip(), "```", "",
        "## Loading", "",
        "- lmforge: `lm_core.weights.load_model_dir(<this directory>)`",
    ]
    if config.get("hf_layout") == HF_DIR:
        lines += [
            f"- Hugging Face transformers (Llama layout in `{HF_DIR}/`):",
            f"  `AutoModelForCausalLM.from_pretrained('<this directory>/{HF_DIR}')`,"
            f" `AutoTokenizer.from_pretrained('<this directory>/{HF_DIR}')`",
        ]
    else:
        lines.append(f"- No Hugging Face layout: {config.get('hf_layout', 'not written')}")
    lines.append("")
    return "\n".join(lines)
