"""Embedding neighbours, attention maps recomputed beside SDPA, and the TensorBoard projector files."""

from __future__ import annotations

import sysconfig
from pathlib import Path

import pytest
import torch

from lm_core.introspect import attention_maps, embedding_matrix, nearest_tokens, resolve_token, surface_variants
from lm_core.model import GPT, GPTConfig
from lm_core.quantize import prepare_for_inference
from lm_core.tokenizer import Tokenizer, TokenizerConfig, train_tokenizer


def test_nearest_tokens_rank_by_cosine_and_skip_the_token_itself():
    emb = torch.tensor([[1.0, 0.0], [10.0, 1.0], [0.0, 1.0], [-1.0, 0.0], [1.0, 1.0]])
    found = nearest_tokens(emb, 0, k=3)
    assert [i for i, _ in found] == [1, 4, 2]  # length does not matter, direction does
    assert found[0][1] == pytest.approx(10 / 101**0.5)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        nearest_tokens(emb, 9)


def test_surface_variants_and_token_resolution():
    assert surface_variants("\u2581The") == ["The", "the", "THE", "\u2581The", "\u2581the", "\u2581THE"]
    pieces = {"the": 5, "\u2581the": 6}
    assert resolve_token(" the", pieces.get, lambda s: []) == 6  # a written space means the '▁' piece
    assert resolve_token("cat", pieces.get, lambda s: [7]) == 7  # one token by encoding
    with pytest.raises(ValueError, match="is 3 tokens"):
        resolve_token("catapult", pieces.get, lambda s: [7, 8, 9])


@pytest.mark.parametrize("overrides", [dict(n_kv_head=2), dict(pos="learned", norm="layernorm", mlp="gelu")])
def test_attention_maps_reproduce_what_sdpa_computed(overrides):
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=128, block_size=32, n_layer=2, n_head=4, n_embd=32, **overrides)).eval()
    ids = torch.randint(0, 128, (20,)).tolist()
    values, outputs = {}, {}
    hooks = []
    for i, block in enumerate(model.blocks):
        hooks.append(block.attn.v_proj.register_forward_hook(lambda m, a, out, i=i: values.__setitem__(i, out)))
        hooks.append(block.attn.o_proj.register_forward_pre_hook(lambda m, a, i=i: outputs.__setitem__(i, a[0])))
    maps = attention_maps(model, ids)  # (L, H, T, T)
    assert maps.shape == (2, 4, 20, 20)
    assert torch.allclose(maps.sum(-1), torch.ones(2, 4, 20))
    assert torch.all(maps.triu(diagonal=1) == 0)  # causal: nothing after the query
    with torch.no_grad():  # a second forward fills values/outputs (the first one's hooks ran too; same values)
        model(torch.tensor([ids]))
    for h in hooks:
        h.remove()
    H, K, D = 4, model.cfg.kv_heads, 8
    for i in range(2):
        v = values[i].view(20, K, D).transpose(0, 1).repeat_interleave(H // K, dim=0)  # (H, T, D)
        mixed = (maps[i] @ v).transpose(0, 1).reshape(1, 20, H * D)  # what o_proj should have received
        assert torch.allclose(mixed, outputs[i], atol=1e-5)


def test_variants_used_interchangeably_become_neighbours():
    """Train on a token stream where each word comes in 3 surface forms (like 'the', 'The', '▁the') that
    are used at random in the same contexts: next-token training alone should make them neighbours."""
    words, forms = 8, 3
    vocab = words * forms
    gen = torch.Generator().manual_seed(0)
    succ = torch.randint(0, words, (words, 2), generator=gen)  # each word is followed by one of two words

    def batch(B=32, T=33):
        w = torch.zeros(B, T, dtype=torch.long)
        w[:, 0] = torch.randint(0, words, (B,), generator=gen)
        for t in range(1, T):
            w[:, t] = succ[w[:, t - 1], torch.randint(0, 2, (B,), generator=gen)]
        return w * forms + torch.randint(0, forms, (B, T), generator=gen)  # pick a surface form at random

    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=vocab, block_size=32, n_layer=1, n_head=2, n_embd=32))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    for _ in range(100):
        x = batch()
        _, loss = model(x[:, :-1], x[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    emb = embedding_matrix(model)
    for w in range(words):
        for f in range(forms):
            token = w * forms + f
            near = {i for i, _ in nearest_tokens(emb, token, k=forms - 1)}
            assert near == {w * forms + g for g in range(forms)} - {token}, f"word {w} form {f}: {near}"
    # the int8 model's (dequantized) embeddings give the same neighbours
    int8_emb = embedding_matrix(prepare_for_inference(model, "int8"))
    assert [i for i, _ in nearest_tokens(int8_emb, 0, 2)] == [i for i, _ in nearest_tokens(emb, 0, 2)]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> Tokenizer:
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))[:30]
    lines = [line for f in files for line in f.read_text(errors="ignore").splitlines(keepends=True)]
    path = train_tokenizer(TokenizerConfig(vocab_size=512, num_threads=1), iter(lines),
                           tmp_path_factory.mktemp("tok") / "tokenizer.model")
    return Tokenizer(path)


def test_projector_files_are_written_and_read_back(tokenizer, tmp_path):
    from pipelines.stages.projector import PROJECTOR_TAG, piece_label, read_projector, write_projector

    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=tokenizer.vocab_size, block_size=16, n_layer=1, n_head=2, n_embd=16))
    out = write_projector(model, tokenizer, tmp_path / "projector")
    assert (out / "projector_config.pbtxt").read_text().count(f'tensor_name: "{PROJECTOR_TAG}') == 1
    weights, labels = read_projector(out)
    assert torch.allclose(weights, model.wte.weight.detach(), atol=1e-4)
    assert labels == [piece_label(tokenizer.id_to_piece(i)) for i in range(tokenizer.vocab_size)]
    assert all("\t" not in label and label for label in labels)  # one TSV cell per token, none empty
    write_projector(model, tokenizer, out)  # a rerun replaces the projector instead of adding a second one
    assert (out / "projector_config.pbtxt").read_text().count("embeddings {") == 1
    small = GPT(GPTConfig(vocab_size=100, block_size=16, n_layer=1, n_head=2, n_embd=16))
    with pytest.raises(ValueError, match="tokenizer"):
        write_projector(small, tokenizer, tmp_path / "mismatch")
