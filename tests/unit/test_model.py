"""Unit tests for lm_core.model: shapes, loss, causality, parameter counting, config errors, KV cache."""

import math

import pytest
import torch

from lm_core.kv_cache import CacheAccess, KVCache
from lm_core.model import GPT, GPTConfig, preset


def tiny(**overrides) -> GPTConfig:
    base = dict(vocab_size=64, block_size=32, n_layer=2, n_head=4, n_embd=32)
    return GPTConfig(**{**base, **overrides})


VARIANTS = {
    "default": {},
    "gpt2": dict(pos="learned", norm="layernorm", mlp="gelu", bias=True, tie_embeddings=False),
    "gqa": dict(n_kv_head=2),
    "mqa_learned": dict(n_kv_head=1, pos="learned"),
    "gelu_rope": dict(mlp="gelu"),
    "layernorm_nobias": dict(norm="layernorm"),
    "untied": dict(tie_embeddings=False),
    "bias_swiglu": dict(bias=True),
    "custom_hidden": dict(mlp_hidden=48, n_kv_head=2, pos="learned"),
}


def build(seed: int = 0, **overrides) -> GPT:
    torch.manual_seed(seed)
    return GPT(tiny(**overrides)).eval()


def test_shapes_and_loss_at_init():
    model = build()
    idx = torch.randint(0, 64, (3, 16))
    logits, loss = model(idx)
    assert logits.shape == (3, 16, 64) and logits.dtype == torch.float32
    assert loss is None
    # targets independent of the inputs: with tied embeddings the input token itself gets a logit boost at init
    targets = torch.randint(0, 64, (3, 16))
    _, loss = model(idx, targets)
    assert loss.shape == ()
    # small init => near-uniform predictions => loss close to ln(vocab)
    assert abs(loss.item() - math.log(64)) < 0.1
    _, per_token = model(idx, targets, reduction="none")
    assert per_token.shape == (3, 16)
    assert torch.allclose(per_token.mean(), loss, atol=1e-6)


def test_ignore_index_excludes_positions():
    model = build()
    idx = torch.randint(0, 64, (2, 8))
    targets = idx.clone()
    targets[:, :4] = -1
    _, per_token = model(idx, targets, reduction="none")
    assert torch.all(per_token[:, :4] == 0)
    _, loss = model(idx, targets)
    assert torch.allclose(loss, per_token[:, 4:].mean(), atol=1e-6)


@pytest.mark.parametrize("name", VARIANTS)
def test_causality(name):
    model = build(**VARIANTS[name])
    idx = torch.randint(0, 64, (2, 20))
    logits, _ = model(idx)
    for t in (0, 7, 19):
        changed = idx.clone()
        changed[:, t] = (changed[:, t] + 1) % 64
        logits2, _ = model(changed)
        assert torch.equal(logits[:, :t], logits2[:, :t]), f"future token {t} leaked into earlier positions"
        assert not torch.allclose(logits[:, t], logits2[:, t]), "the changed position itself must change"


def test_tied_weights_are_shared():
    model = build()
    assert model.lm_head.weight is model.wte.weight
    with torch.no_grad():
        model.wte.weight[3].fill_(0.5)
    assert torch.all(model.lm_head.weight[3] == 0.5)
    assert "lm_head.weight" in model.state_dict()  # both names present; the tensor is one
    untied = build(tie_embeddings=False)
    assert untied.lm_head.weight is not untied.wte.weight


@pytest.mark.parametrize("name", VARIANTS)
def test_num_params_matches_module(name):
    cfg = tiny(**VARIANTS[name])
    model = GPT(cfg)
    actual = sum(p.numel() for p in model.parameters())  # parameters() dedupes the tied weight
    assert cfg.num_params() == actual
    lookups = model.wte.weight.numel() + (model.wpe.weight.numel() if model.wpe is not None else 0)
    assert cfg.num_params(exclude_embeddings=True) == actual - lookups
    matmul = cfg.num_params(exclude_embeddings=True) + (64 * 32 if cfg.tie_embeddings else 0)
    assert cfg.flops_per_token() == 6 * matmul + 12 * 2 * 32 * 32


def test_default_hidden_sizes():
    assert GPTConfig(n_embd=256, mlp="gelu").hidden_dim == 1024
    assert GPTConfig(n_embd=256).hidden_dim == 704  # round(682.67) = 683 -> next multiple of 64
    assert GPTConfig(n_embd=384).hidden_dim == 1024
    assert GPTConfig().num_params() > 0


def test_rope_buffers_not_in_state_dict_and_names_llama_like():
    model = build(n_kv_head=2)
    keys = set(model.state_dict())
    assert not any("rope" in k for k in keys)
    for key in ("wte.weight", "norm_f.weight", "lm_head.weight", "blocks.0.attn_norm.weight",
                "blocks.1.mlp_norm.weight", "blocks.0.attn.q_proj.weight", "blocks.0.attn.k_proj.weight",
                "blocks.0.attn.v_proj.weight", "blocks.0.attn.o_proj.weight", "blocks.0.mlp.gate_proj.weight",
                "blocks.0.mlp.up_proj.weight", "blocks.0.mlp.down_proj.weight"):
        assert key in keys, key
    assert model.blocks[0].attn.k_proj.weight.shape == (2 * 8, 32)
    gpt2 = build(**VARIANTS["gpt2"])
    assert {"wpe.weight", "blocks.0.mlp.fc.weight", "blocks.0.mlp.proj.bias"} <= set(gpt2.state_dict())


def test_init_weights_deterministic_and_scaled():
    a, b = GPT(tiny()), GPT(tiny())
    a.init_weights(seed=123)
    b.init_weights(seed=123)
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(pa, pb), name
    c = GPT(tiny(n_layer=8, n_embd=128, mlp="gelu", bias=True, norm="layernorm"))
    c.init_weights(seed=0)
    assert abs(c.blocks[0].attn.q_proj.weight.std().item() - 0.02) < 0.002
    assert abs(c.blocks[0].attn.o_proj.weight.std().item() - 0.02 / 4) < 0.0005  # 1/sqrt(2*8)
    assert abs(c.blocks[0].mlp.proj.weight.std().item() - 0.02 / 4) < 0.0005
    assert torch.all(c.blocks[0].mlp.fc.bias == 0) and torch.all(c.norm_f.weight == 1)
    assert torch.all(c.norm_f.bias == 0)


@pytest.mark.parametrize("overrides, match", [
    (dict(n_embd=250), r"model\.n_embd=250 is not divisible by model\.n_head=4; set model\.n_embd"),
    (dict(n_embd=36, n_head=12), r"model\.n_embd/model\.n_head=3 must be even for rope"),
    (dict(n_kv_head=3), r"model\.n_head=4 is not divisible by model\.n_kv_head=3"),
    (dict(mlp="relu"), r"model\.mlp='relu' .*one of swiglu, gelu"),
    (dict(norm="batchnorm"), r"model\.norm=.*one of rmsnorm, layernorm"),
    (dict(pos="alibi"), r"model\.pos=.*one of rope, learned"),
    (dict(dropout=1.0), r"model\.dropout=1\.0 must be in \[0, 1\)"),
    (dict(dropout=-0.1), r"model\.dropout"),
    (dict(n_layer=0), r"model\.n_layer=0 must be a positive integer"),
    (dict(vocab_size=64.0), r"model\.vocab_size=64\.0 must be a positive integer"),
    (dict(n_kv_head=0), r"model\.n_kv_head=0"),
    (dict(rope_theta=0.0), r"model\.rope_theta"),
])
def test_validate_names_the_key(overrides, match):
    with pytest.raises(ValueError, match=match):
        GPT(tiny(**overrides))
    with pytest.raises(ValueError, match=match):
        tiny(**overrides).validate()


def test_odd_head_dim_ok_with_learned_positions():
    model = build(n_embd=36, n_head=12, pos="learned")
    assert model(torch.zeros(1, 4, dtype=torch.long))[0].shape == (1, 4, 64)


def _at(cache: KVCache, start: int, rows: int = 2, **kw) -> CacheAccess:
    return CacheAccess(cache, torch.full((rows,), start), **kw)


@pytest.mark.parametrize("name", ["default", "gqa", "mqa_learned", "gpt2"])
@pytest.mark.parametrize("common", [False, True])
def test_kv_cache_chunks_match_full_forward(name, common):
    """common: the host passes the rows' shared start (slice writes, no per-row mask) instead of only tensors."""
    model = build(**VARIANTS[name])
    cfg = model.cfg
    idx = torch.randint(0, 64, (2, 12))
    full, _ = model(idx)
    cache = KVCache(cfg, slots=2, max_len=16)
    assert cache.k.shape == (2, 2, cfg.kv_heads, 17, cfg.head_dim)  # + the scratch column
    parts = [model(idx[:, :5], cache=_at(cache, 0, window=5, common_start=0))[0]]  # prefill
    for t in range(5, 9):  # decode one token at a time: the whole cache (the static shape), or an exact window
        at = _at(cache, t, window=t + 1, common_start=t) if common else _at(cache, t)
        parts.append(model(idx[:, t:t + 1], cache=at)[0])
    chunk = _at(cache, 9, window=12, common_start=9 if common else None)  # a multi-token chunk at an offset
    parts.append(model(idx[:, 9:], cache=chunk)[0])
    torch.testing.assert_close(torch.cat(parts, dim=1), full, atol=1e-5, rtol=0)
    # slots in another order see their own rows
    swapped, _ = model(idx.flip(0)[:, 9:], cache=_at(cache, 9, slots=torch.tensor([1, 0]), window=12))
    torch.testing.assert_close(swapped, full.flip(0)[:, 9:], atol=1e-5, rtol=0)


def test_scratch_column_is_never_seen():
    model = build()
    cache = KVCache(model.cfg, slots=1, max_len=8)
    idx = torch.randint(0, 64, (1, 6))
    full, _ = model(idx)
    model(idx[:, :5], cache=_at(cache, 0, rows=1, window=5, common_start=0))
    model(torch.tensor([[7]]), cache=_at(cache, cache.scratch, rows=1))  # a dummy row of a fixed-shape step
    step, _ = model(idx[:, 5:], cache=_at(cache, 5, rows=1))
    torch.testing.assert_close(step[:, 0], full[:, 5], atol=1e-5, rtol=0)


def test_length_errors():
    model = build()
    with pytest.raises(ValueError, match="block_size=32"):
        model(torch.zeros(1, 33, dtype=torch.long))
    with pytest.raises(ValueError, match=r"max_len=33 must be in 1..block_size=32"):
        KVCache(model.cfg, slots=1, max_len=33)


def test_dropout_active_only_in_training():
    model = build(dropout=0.5)
    idx = torch.randint(0, 64, (2, 8))
    assert torch.equal(model(idx)[0], model(idx)[0])
    model.train()
    assert not torch.equal(model(idx)[0], model(idx)[0])


def test_backward_reaches_all_parameters():
    model = build(**VARIANTS["gpt2"])
    model.train()
    idx = torch.randint(0, 64, (2, 8))
    _, loss = model(idx, idx)
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, missing


def test_document_segments_keep_attention_inside_each_document():
    # RoPE attention depends on relative positions only, so a document packed after another must give
    # the logits it gives alone once attention cannot cross the boundary.
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=64, block_size=32, n_layer=2, n_head=4, n_embd=32)).eval()
    first, second = torch.randint(0, 64, (1, 7)), torch.randint(0, 64, (1, 9))
    packed = torch.cat([first, second], dim=1)  # (1, 16)
    segments = torch.tensor([[0] * 7 + [1] * 9])
    with torch.no_grad():
        logits, _ = model(packed, segments=segments)
        alone, _ = model(second)
        crossing, _ = model(packed)  # without segments the second document sees the first
        changed = packed.clone()
        changed[0, 3] = (changed[0, 3] + 1) % 64
        logits_changed, _ = model(changed, segments=segments)
    torch.testing.assert_close(logits[:, 7:], alone, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(crossing[:, 7:], alone, atol=1e-3)
    torch.testing.assert_close(logits_changed[:, 7:], logits[:, 7:], atol=1e-6, rtol=0)


def test_segments_refuse_a_cache():
    model = GPT(GPTConfig(vocab_size=64, block_size=32, n_layer=1, n_head=4, n_embd=32))
    cache = KVCache(model.cfg, slots=1, max_len=8)
    with pytest.raises(ValueError, match="segments"):
        model(torch.zeros(1, 4, dtype=torch.long), cache=_at(cache, 0, rows=1), segments=torch.zeros(1, 4, dtype=torch.long))


@pytest.mark.parametrize("name, params", [("gpt2-124m", 124_439_808), ("gpt2-350m", 354_823_168)])
def test_gpt2_presets_have_gpt2s_parameter_counts(name, params):
    cfg = preset(name, vocab_size=50257)  # GPT-2's vocabulary
    cfg.validate()
    assert cfg.num_params() == params
    assert (cfg.n_layer, cfg.block_size, cfg.pos, cfg.norm, cfg.mlp, cfg.bias) == (
        {"gpt2-124m": 12, "gpt2-350m": 24}[name], 1024, "learned", "layernorm", "gelu", True)


def test_preset_builds_the_counted_model_and_keys_set_next_to_it_win():
    cfg = preset("gpt2-124m", vocab_size=512, n_layer=2, block_size=128)
    model = GPT(cfg)
    assert sum(p.numel() for p in model.parameters()) == cfg.num_params()
    assert (cfg.n_layer, cfg.n_embd, cfg.block_size) == (2, 768, 128)
    with pytest.raises(ValueError, match="model.preset='gpt3' is not a preset; choose one of tiny, small, gpt2-124m"):
        preset("gpt3")
