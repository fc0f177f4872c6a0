"""Unit tests for lm_core.weights: the model directory round trip (safetensors + config.json + chat template)."""

from __future__ import annotations

import json

import pytest
import torch

from lm_core.model import GPT, GPTConfig
from lm_core.weights import CHAT_TEMPLATE, CHAT_TEMPLATE_FILE, CONFIG_FILE, TOKENIZER_FILE, WEIGHTS_FILE, load_model_dir, save_model_dir

BASE = dict(vocab_size=64, block_size=16, n_layer=2, n_head=2, n_embd=32)


@pytest.fixture
def tokenizer_file(tmp_path):
    path = tmp_path / "some.model"
    path.write_bytes(b"\x00tokenizer bytes\xff")
    return path


@pytest.mark.parametrize(
    "overrides",
    [{}, {"tie_embeddings": False}, dict(pos="learned", norm="layernorm", mlp="gelu", bias=True, tie_embeddings=False)],
    ids=["tied", "untied", "gpt2_untied"],
)
def test_round_trip_gives_identical_logits(tmp_path, tokenizer_file, overrides):
    torch.manual_seed(0)
    model = GPT(GPTConfig(**BASE, **overrides)).eval()
    with torch.no_grad():  # make the head differ from the embedding when untied, so a swap would show
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    out = save_model_dir(model, tokenizer_file, tmp_path / "export", extra={"tokenizer_sha256": "abc"})
    assert sorted(p.name for p in out.iterdir()) == sorted([CONFIG_FILE, TOKENIZER_FILE, WEIGHTS_FILE, CHAT_TEMPLATE_FILE])
    assert (out / TOKENIZER_FILE).read_bytes() == tokenizer_file.read_bytes()
    assert (out / CHAT_TEMPLATE_FILE).read_text() == CHAT_TEMPLATE

    loaded, meta = load_model_dir(out)
    assert meta["format"] == "lmforge" and meta["tokenizer_sha256"] == "abc"
    assert GPTConfig(**meta["model"]) == model.cfg
    assert not loaded.training
    idx = torch.randint(0, 64, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(loaded(idx)[0], model(idx)[0], rtol=0, atol=0)

    tied = overrides.get("tie_embeddings", True)
    assert (loaded.lm_head.weight is loaded.wte.weight) == tied
    if tied:  # still one parameter after loading: training one updates the other
        assert sum(1 for _ in loaded.parameters()) == sum(1 for _ in model.parameters())
        with torch.no_grad():
            loaded.wte.weight[0, 0] += 1.0
        assert loaded.lm_head.weight[0, 0] == loaded.wte.weight[0, 0]


def test_tied_weights_are_stored_once(tmp_path, tokenizer_file):
    from safetensors.torch import load_file

    torch.manual_seed(0)
    save_model_dir(GPT(GPTConfig(**BASE)), tokenizer_file, tmp_path / "tied")
    save_model_dir(GPT(GPTConfig(**BASE, tie_embeddings=False)), tokenizer_file, tmp_path / "untied")
    assert "lm_head.weight" not in load_file(str(tmp_path / "tied" / WEIGHTS_FILE))
    assert "lm_head.weight" in load_file(str(tmp_path / "untied" / WEIGHTS_FILE))


def test_config_json_is_plain_json(tmp_path, tokenizer_file):
    save_model_dir(GPT(GPTConfig(**BASE, n_kv_head=1)), tokenizer_file, tmp_path / "m")
    meta = json.loads((tmp_path / "m" / CONFIG_FILE).read_text())
    assert meta["model"]["n_kv_head"] == 1 and meta["model"]["vocab_size"] == 64


def test_directory_without_config_json(tmp_path):
    (tmp_path / "not_a_model").mkdir()
    with pytest.raises(FileNotFoundError) as err:
        load_model_dir(tmp_path / "not_a_model")
    assert "not_a_model" in str(err.value) and "config.json" in str(err.value)
