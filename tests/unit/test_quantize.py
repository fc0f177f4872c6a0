"""bf16 and weight-only int8 inference: close to fp32, a quarter of the weight memory (the tied
embedding/head counted once), and run by lm_core's one generation loop and bits_per_byte unchanged."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from lm_core.evaluation import bits_per_byte
from lm_core.generate import SamplingConfig, generate
from lm_core.model import GPT, GPTConfig
from lm_core.quantize import Int8Linear, prepare_for_inference, quantize_rows, weight_bytes
from lm_core.typed_config import ConfigError


def _model(**overrides) -> GPT:
    torch.manual_seed(0)
    cfg = dict(vocab_size=512, block_size=64, n_layer=2, n_head=4, n_kv_head=2, n_embd=64)
    return GPT(GPTConfig(**{**cfg, **overrides})).eval()


def test_rows_round_trip_within_half_a_step():
    w = torch.randn(48, 32) * torch.logspace(-3, 1, 48)[:, None]  # rows of very different magnitudes
    q, scales = quantize_rows(w)
    assert q.dtype == torch.int8 and scales.shape == (48,)
    err = (q.float() * scales[:, None] - w).abs()
    assert torch.all(err <= scales[:, None] / 2 + 1e-7)  # per-row scales: small rows keep their precision


@pytest.mark.parametrize("dtype", ["bf16", "int8"])
@pytest.mark.parametrize("tied", [True, False])
def test_logits_stay_close_to_fp32(dtype, tied):
    base = _model(tie_embeddings=tied)
    idx = torch.randint(0, 512, (2, 48))
    with torch.no_grad():
        ref, _ = base(idx)
        out, _ = prepare_for_inference(copy.deepcopy(base), dtype)(idx)
    assert out.dtype == torch.float32 and out.shape == ref.shape
    rel = (out - ref).norm() / ref.norm()
    assert rel < (0.02 if dtype == "bf16" else 0.05), f"{dtype}: relative logit error {rel:.4f}"


def test_int8_is_a_quarter_of_fp32_and_keeps_the_head_tied():
    base = _model()
    fp32 = weight_bytes(base)["total"]
    int8_model = prepare_for_inference(copy.deepcopy(base), "int8")
    assert int8_model.lm_head.qweight is int8_model.wte.qweight  # one int8 copy serves lookup and head
    int8 = weight_bytes(int8_model)["total"]
    assert int8 <= 0.35 * fp32, (int8, fp32)
    untied = prepare_for_inference(_model(tie_embeddings=False), "int8")
    assert weight_bytes(untied)["total"] > int8  # a second (V, C) matrix is really counted
    assert weight_bytes(prepare_for_inference(copy.deepcopy(base), "bf16"))["total"] == pytest.approx(fp32 / 2, rel=0.01)


@pytest.mark.parametrize("dtype", ["fp32", "bf16", "int8"])
def test_generation_loop_runs_quantized_models(dtype):
    model = prepare_for_inference(_model(tie_embeddings=False), dtype)
    greedy = SamplingConfig(max_new_tokens=20, temperature=0.0)
    cached = generate(model, [1, 5, 9, 3], greedy)
    assert len(cached) == 20
    assert cached == generate(model, [1, 5, 9, 3], greedy, use_cache=False)  # the KV cache follows the model dtype
    sampled = generate(model, [1, 5], SamplingConfig(max_new_tokens=8, temperature=0.8, top_k=20, seed=3))
    assert all(0 <= t < 512 for t in sampled)


def test_bits_per_byte_runs_on_int8_and_stays_close():
    base = _model()
    rng = np.random.default_rng(0)
    val = [rng.integers(0, 512, 700).astype(np.uint16)]
    token_bytes = np.full(512, 3, dtype=np.int64)
    ref = bits_per_byte(base, val, token_bytes, block_size=64)
    got = bits_per_byte(prepare_for_inference(copy.deepcopy(base), "int8"), val, token_bytes, block_size=64)
    assert got["tokens"] == ref["tokens"] and got["bpb"] == pytest.approx(ref["bpb"], rel=0.02)


def test_odd_shapes_take_the_dequantizing_path():
    linear = torch.nn.Linear(8, 6, bias=True)  # a shape the int8 kernel is not trusted with
    q = Int8Linear.from_linear(linear)
    assert not q.use_kernel
    x = torch.randn(3, 8)
    expected = linear(x)
    assert torch.allclose(q(x).float(), expected, atol=0.05)
    assert Int8Linear.from_linear(torch.nn.Linear(64, 48)).use_kernel


def test_unknown_dtype_names_the_flag():
    with pytest.raises(ConfigError, match="--dtype"):
        prepare_for_inference(_model(), "int4")
