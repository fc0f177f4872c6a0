"""Write an lmforge model as a Hugging Face Llama directory (LlamaForCausalLM + a fast tokenizer).

The model maps by renaming keys alone: RoPE here already pairs dim i with i + D/2 (HF's rotate_half),
and the module names follow Llama's. Only the Llama recipe maps (RoPE, RMSNorm, SwiGLU, no biases);
`hf_incompatibility` says why another config does not.

The tokenizer is written twice: `tokenizer.model` (the SentencePiece file itself) and `tokenizer.json`
(a `tokenizers` BPE built from it), because transformers' own SentencePiece → Llama conversion assumes
Llama's settings (a dummy prefix space, no user symbols) and would encode our text differently. Ours:
identity normalization with ' ' → '▁', no dummy prefix, byte fallback, '\\n' a user symbol (an added
token, split off before BPE), and SentencePiece BPE's rule "merge the adjacent pair whose merged piece
scores highest, leftmost first" — which is `tokenizers`' BPE with merges ranked by that score.
Text holding a literal "<s>" encodes as text in both (split_special_tokens=True).

No transformers import here: the files are plain JSON and safetensors, checked by a test that loads
them with transformers.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from lm_core.model import GPT, GPTConfig
from lm_core.weights import CHAT_TEMPLATE

SPM_BPE = 2  # ModelProto.TrainerSpec.ModelType
PIECE_NORMAL, PIECE_UNKNOWN, PIECE_CONTROL, PIECE_USER_DEFINED, PIECE_UNUSED, PIECE_BYTE = 1, 2, 3, 4, 5, 6


def hf_incompatibility(cfg: GPTConfig) -> str | None:
    """None when the architecture is Llama's; otherwise the reason, e.g. "model.mlp=gelu (Llama needs swiglu)"."""
    wanted = {"pos": "rope", "norm": "rmsnorm", "mlp": "swiglu", "bias": False}
    wrong = [f"model.{k}={getattr(cfg, k)!r} (Llama needs {v!r})" for k, v in wanted.items() if getattr(cfg, k) != v]
    return "; ".join(wrong) or None


def hf_state_dict(model: GPT) -> dict[str, torch.Tensor]:
    """lmforge parameter names → LlamaForCausalLM's; a tied lm_head is left out (HF ties it on load)."""
    names = {"wte.weight": "model.embed_tokens.weight", "norm_f.weight": "model.norm.weight", "lm_head.weight": "lm_head.weight"}
    for i in range(model.cfg.n_layer):
        src, dst = f"blocks.{i}.", f"model.layers.{i}."
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            names[f"{src}attn.{proj}.weight"] = f"{dst}self_attn.{proj}.weight"
        for proj in ("gate_proj", "up_proj", "down_proj"):
            names[f"{src}mlp.{proj}.weight"] = f"{dst}mlp.{proj}.weight"
        names[f"{src}attn_norm.weight"] = f"{dst}input_layernorm.weight"
        names[f"{src}mlp_norm.weight"] = f"{dst}post_attention_layernorm.weight"
    state = model.state_dict()
    if model.cfg.tie_embeddings:
        state = {k: v for k, v in state.items() if k != "lm_head.weight"}
    unmapped = sorted(set(state) - set(names))
    if unmapped:
        raise ValueError(f"no Llama name for {unmapped}; only rope/rmsnorm/swiglu/no-bias models export to HF")
    # clone: after DeepSpeed the parameters can be views into one flat buffer, which safetensors refuses
    return {names[k]: v.detach().to(torch.float32).clone().contiguous() for k, v in state.items()}


def hf_config(cfg: GPTConfig, bos_id: int, eos_id: int, pad_id: int) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.n_embd,
        "intermediate_size": cfg.hidden_dim,
        "num_hidden_layers": cfg.n_layer,
        "num_attention_heads": cfg.n_head,
        "num_key_value_heads": cfg.kv_heads,
        "head_dim": cfg.head_dim,
        "max_position_embeddings": cfg.block_size,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,  # transformers 4.x reads this, 5.x rope_parameters
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "hidden_act": "silu",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "tie_word_embeddings": cfg.tie_embeddings,
        "initializer_range": 0.02,
        "use_cache": True,
        "bos_token_id": bos_id,
        "eos_token_id": eos_id,
        "pad_token_id": pad_id,
        "torch_dtype": "float32",
        "dtype": "float32",
    }


def _spm_proto(tokenizer_path: Path):
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(Path(tokenizer_path).read_bytes())
    return proto


def tokenizer_incompatibility(tokenizer_path: Path) -> str | None:
    """None when tokenizer.json can reproduce the SentencePiece model's ids exactly; otherwise why not."""
    proto = _spm_proto(tokenizer_path)
    norm, trainer = proto.normalizer_spec, proto.trainer_spec
    problems = []
    if trainer.model_type != SPM_BPE:
        problems.append("only SentencePiece BPE models convert (this one is unigram/char/word)")
    if norm.precompiled_charsmap:
        problems.append(f"normalization rule {norm.name!r} is not identity")
    if norm.add_dummy_prefix or norm.remove_extra_whitespaces or not norm.escape_whitespaces:
        problems.append("expects add_dummy_prefix=False, remove_extra_whitespaces=False, escape_whitespaces=True")
    if trainer.treat_whitespace_as_suffix:
        problems.append("treat_whitespace_as_suffix is not supported")
    return "; ".join(problems) or None


def hf_tokenizer_json(tokenizer_path: Path) -> dict:
    """A `tokenizers` tokenizer.json that encodes like the SentencePiece BPE model (see the module doc)."""
    reason = tokenizer_incompatibility(tokenizer_path)
    if reason:
        raise ValueError(f"{tokenizer_path}: {reason}")
    proto = _spm_proto(tokenizer_path)
    pieces = [(p.piece, p.score, p.type) for p in proto.pieces]
    vocab = {piece: i for i, (piece, _, _) in enumerate(pieces)}
    # merges: every split of a normal piece into two normal pieces, ranked by the merged piece's score
    # (higher first); SentencePiece BPE picks merges by exactly that score
    normal = {piece: (score, i) for i, (piece, score, kind) in enumerate(pieces) if kind == PIECE_NORMAL}
    ranked = []
    for piece, (score, i) in normal.items():
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in normal and right in normal:
                ranked.append((-score, i, cut, left, right))
    merges = [[left, right] for *_, left, right in sorted(ranked)]
    added = [
        {"id": i, "content": piece, "single_word": False, "lstrip": False, "rstrip": False,
         "normalized": False, "special": kind != PIECE_USER_DEFINED}
        for i, (piece, _, kind) in enumerate(pieces)
        if kind in (PIECE_UNKNOWN, PIECE_CONTROL, PIECE_USER_DEFINED)
    ]
    trainer = proto.trainer_spec
    bos = pieces[trainer.bos_id][0] if trainer.bos_id >= 0 else None
    post = None
    if bos is not None:
        post = {
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                     {"SpecialToken": {"id": bos, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {bos: {"id": bos, "ids": [trainer.bos_id], "tokens": [bos]}},
        }
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": {"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"},
        "pre_tokenizer": None,
        "post_processor": post,
        "decoder": {"type": "Sequence", "decoders": [
            {"type": "Replace", "pattern": {"String": "\u2581"}, "content": " "},
            {"type": "ByteFallback"},
            {"type": "Fuse"},
        ]},
        "model": {
            "type": "BPE", "dropout": None, "unk_token": pieces[trainer.unk_id][0], "continuing_subword_prefix": None,
            "end_of_word_suffix": None, "fuse_unk": True, "byte_fallback": trainer.byte_fallback,
            "ignore_merges": False, "vocab": vocab, "merges": merges,
        },
    }


def hf_tokenizer_config(tokenizer_path: Path, block_size: int) -> dict:
    proto = _spm_proto(tokenizer_path)
    trainer = proto.trainer_spec
    piece = lambda i: proto.pieces[i].piece if i >= 0 else None  # noqa: E731
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": trainer.bos_id >= 0,
        "add_eos_token": False,
        "bos_token": piece(trainer.bos_id),
        "eos_token": piece(trainer.eos_id),
        "unk_token": piece(trainer.unk_id),
        "pad_token": piece(trainer.pad_id),
        "clean_up_tokenization_spaces": False,
        "split_special_tokens": True,  # SentencePiece encodes a literal "<s>" in text as text
        "model_max_length": block_size,
        "padding_side": "left",
        "chat_template": CHAT_TEMPLATE,  # a transcript layout for a base model; see lm_core.weights
    }


def save_hf_dir(model: GPT, tokenizer_path: Path, out_dir: Path, sampling: dict | None = None) -> Path:
    """Write config.json, model.safetensors, tokenizer.{model,json}, tokenizer_config.json,
    special_tokens_map.json and generation_config.json into out_dir. Raises ValueError when the
    model or tokenizer does not map (the message says what does not)."""
    from safetensors.torch import save_file

    reason = hf_incompatibility(model.cfg) or tokenizer_incompatibility(tokenizer_path)
    if reason:
        raise ValueError(f"cannot write a Hugging Face Llama directory: {reason}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    trainer = _spm_proto(tokenizer_path).trainer_spec
    ids = dict(bos_id=trainer.bos_id, eos_id=trainer.eos_id, pad_id=trainer.pad_id)
    save_file(hf_state_dict(model), str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    (out_dir / "config.json").write_text(json.dumps(hf_config(model.cfg, **ids), indent=2))
    (out_dir / "tokenizer.model").write_bytes(Path(tokenizer_path).read_bytes())
    (out_dir / "tokenizer.json").write_text(json.dumps(hf_tokenizer_json(tokenizer_path), ensure_ascii=False))
    tok_config = hf_tokenizer_config(tokenizer_path, model.cfg.block_size)
    (out_dir / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2))
    specials = {k: tok_config[k] for k in ("bos_token", "eos_token", "unk_token", "pad_token") if tok_config[k]}
    (out_dir / "special_tokens_map.json").write_text(json.dumps(specials, indent=2))
    generation = {"bos_token_id": ids["bos_id"], "eos_token_id": ids["eos_id"], "pad_token_id": ids["pad_id"]}
    if sampling:
        temperature = sampling.get("temperature", 1.0)
        generation.update({"do_sample": temperature > 0, "max_new_tokens": sampling.get("max_new_tokens", 64)})
        if temperature > 0:
            generation["temperature"] = temperature
            for key in ("top_k", "top_p"):
                if sampling.get(key) is not None:
                    generation[key] = sampling[key]
    (out_dir / "generation_config.json").write_text(json.dumps(generation, indent=2))
    return out_dir
