"""The Hugging Face Llama export, verified with transformers itself: same logits, same token ids."""

from __future__ import annotations

import sysconfig
from pathlib import Path

import pytest
import torch

from lm_core.hf_export import hf_incompatibility, save_hf_dir
from lm_core.model import GPT, GPTConfig
from lm_core.tokenizer import Tokenizer, TokenizerConfig, train_tokenizer

STDLIB = Path(sysconfig.get_paths()["stdlib"])
SOURCES = sorted(STDLIB.glob("*.py"))


@pytest.fixture(scope="module")
def tokenizer_path(tmp_path_factory) -> Path:
    lines = [line for f in SOURCES[:30] for line in f.read_text(errors="ignore").splitlines(keepends=True)]
    return train_tokenizer(TokenizerConfig(vocab_size=512, num_threads=1), lines,
                           tmp_path_factory.mktemp("tok") / "tokenizer.model")


def real_text_chunks(n_files: int = 15, size: int = 2000) -> list[str]:
    """Held-out real text: stdlib source the tokenizer never saw (code, prose in docstrings, unicode)."""
    chunks = []
    for f in SOURCES[60 : 60 + n_files]:
        text = f.read_text(errors="ignore")
        chunks += [text[i : i + size] for i in range(0, len(text), size)]
    return chunks


def randomized(cfg: GPTConfig, seed: int) -> GPT:
    """Every weight random and O(1), norms included, so a swapped or misnamed tensor shows in the logits."""
    torch.manual_seed(seed)
    model = GPT(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.3 + (1.0 if p.dim() == 1 else 0.0))
    return model.eval()


@pytest.mark.parametrize("variant", [
    dict(n_kv_head=2, tie_embeddings=True, rope_theta=10000.0),  # grouped-query attention, tied head
    dict(n_kv_head=None, tie_embeddings=False, rope_theta=500.0, mlp_hidden=96),
])
def test_transformers_logits_match_lm_core(tokenizer_path, tmp_path, variant):
    from transformers import AutoModelForCausalLM

    cfg = GPTConfig(vocab_size=512, block_size=48, n_layer=2, n_head=4, n_embd=64, **variant)
    model = randomized(cfg, seed=1)
    out = save_hf_dir(model, tokenizer_path, tmp_path / "hf")
    for name in ("config.json", "model.safetensors", "tokenizer.model", "tokenizer.json", "tokenizer_config.json",
                 "generation_config.json"):
        assert (out / name).is_file(), f"export lacks {name}"
    hf, info = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32, output_loading_info=True)
    assert not any(info.values()), f"weights did not map one to one: {info}"
    assert type(hf).__name__ == "LlamaForCausalLM"
    hf.eval()
    ids = torch.randint(0, cfg.vocab_size, (3, cfg.block_size), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours, _ = model(ids)
        theirs = hf(ids).logits
    assert ours.abs().max() > 1.0  # logits are large enough for a mapping error to show
    assert (theirs - ours).abs().max().item() < 1e-4


def test_auto_tokenizer_encodes_and_decodes_like_sentencepiece(tokenizer_path, tmp_path):
    from transformers import AutoTokenizer

    out = save_hf_dir(randomized(GPTConfig(vocab_size=512, block_size=32, n_layer=1, n_head=2, n_embd=32), 0),
                      tokenizer_path, tmp_path / "hf")
    ours = Tokenizer(tokenizer_path)
    theirs = AutoTokenizer.from_pretrained(str(out))
    tricky = ["héllo wörld 日本語 🙂\n\n  x", "<s> is text here, </s> too", "a  b\t\tc\r\n", " leading space",
              "x = 12345 + 0.5e-3\n", "\n\n\n", "trailing   "]
    chunks = real_text_chunks() + tricky
    assert len(chunks) > 50
    for text in chunks:
        expected = ours.encode(text, bos=True)
        got = theirs(text)["input_ids"]
        assert got == expected, f"ids differ on {text[:60]!r}"
        assert theirs.decode(got, skip_special_tokens=True) == text
    assert theirs.bos_token_id == ours.bos_id and theirs.eos_token_id == ours.eos_id and theirs.pad_token_id == ours.pad_id
    assert any(ours.id_to_piece(i).startswith("<0x") for text in tricky for i in ours.encode(text))  # byte fallback ran


def test_only_the_llama_recipe_exports(tokenizer_path, tmp_path):
    assert hf_incompatibility(GPTConfig()) is None
    reason = hf_incompatibility(GPTConfig(mlp="gelu", norm="layernorm", bias=True))
    assert "model.mlp='gelu'" in reason and "model.norm='layernorm'" in reason and "model.bias=True" in reason
    model = GPT(GPTConfig(vocab_size=512, block_size=16, n_layer=1, n_head=2, n_embd=32, pos="learned"))
    with pytest.raises(ValueError, match="model.pos='learned'"):
        save_hf_dir(model, tokenizer_path, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()
