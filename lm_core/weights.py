"""A model directory: weights as safetensors, the tokenizer, and a config.json that rebuilds the model.

This is the export format and what generation loads; nothing here unpickles anything.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

from lm_core.model import GPT, GPTConfig

WEIGHTS_FILE = "model.safetensors"
TOKENIZER_FILE = "tokenizer.model"
CONFIG_FILE = "config.json"


def save_model_dir(model: GPT, tokenizer_path: Path, out_dir: Path, extra: dict | None = None) -> Path:
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # clone: after DeepSpeed the parameters are views into one flat buffer, which safetensors refuses
    state = {name: t.detach().clone().contiguous() for name, t in model.state_dict().items()}
    if model.cfg.tie_embeddings:
        del state["lm_head.weight"]  # the same tensor as wte.weight
    save_file(state, str(out_dir / WEIGHTS_FILE))
    shutil.copyfile(tokenizer_path, out_dir / TOKENIZER_FILE)
    meta = {"format": "lmforge", "model": dataclasses.asdict(model.cfg), **(extra or {})}
    (out_dir / CONFIG_FILE).write_text(json.dumps(meta, indent=2))
    return out_dir


def load_model_dir(model_dir: Path) -> tuple[GPT, dict]:
    """(model in eval mode, config.json contents); the tokenizer is at model_dir/tokenizer.model."""
    from safetensors.torch import load_file

    model_dir = Path(model_dir)
    config_path = model_dir / CONFIG_FILE
    if not config_path.is_file():
        raise FileNotFoundError(f"{model_dir} is not an lmforge model directory (no {CONFIG_FILE}); pass an export directory")
    meta = json.loads(config_path.read_text())
    model = GPT(GPTConfig(**meta["model"]))
    state = load_file(str(model_dir / WEIGHTS_FILE))
    if model.cfg.tie_embeddings:
        state["lm_head.weight"] = state["wte.weight"]
    model.load_state_dict(state, strict=True)
    if model.cfg.tie_embeddings:  # load_state_dict copies values; keep the two names one parameter
        model.lm_head.weight = model.wte.weight
    return model.eval(), meta
