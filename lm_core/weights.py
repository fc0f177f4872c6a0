"""A model directory: weights as safetensors, the tokenizer, a config.json that rebuilds the model, and the
chat template `lmforge serve` uses for /v1/chat/completions.

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
CHAT_TEMPLATE_FILE = "chat_template.jinja"

# A Jinja template in Hugging Face's convention (messages, add_generation_prompt; rendered with trim_blocks and
# lstrip_blocks). lmforge models are base models: they were never trained on conversations, so this can only
# lay a conversation out as a transcript and let the model continue it. Replies read like the training text,
# not like an instruction-tuned assistant. The server stops a reply where the model starts a new "User:" line.
CHAT_TEMPLATE = """{#- lmforge's chat template. The model is a base model trained on plain text, not instruction-tuned: this lays
    the conversation out as a transcript (the system text, then "User: ..." and "Assistant: ..." lines) and asks the
    model to continue as the assistant. lmforge serve ends the reply at a new "User:" line. -#}
{%- for message in messages -%}
{%- if message['role'] == 'system' -%}
{{ message['content'] }}{{ '\\n\\n' }}
{%- else -%}
{{ message['role'] | capitalize }}: {{ message['content'] }}{{ '\\n' }}
{%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}Assistant:{%- endif -%}"""
CHAT_STOP = ("\nUser:",)  # where a reply ends: the transcript's next turn


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
    (out_dir / CHAT_TEMPLATE_FILE).write_text(CHAT_TEMPLATE)
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
