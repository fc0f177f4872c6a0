"""Unit tests for lm_core.evaluation.bits_per_byte, against hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lm_core.evaluation import bits_per_byte
from lm_core.model import GPT, GPTConfig
from lm_core.shards import evaluation_windows

V, T = 16, 8
# ids 0..3 are control tokens (no bytes); text tokens stand for 1, 2 or 3 bytes
TOKEN_BYTES = np.array([0, 0, 0, 0] + [1 + i % 3 for i in range(V - 4)], dtype=np.int32)


def tiny_model(seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=V, block_size=T, n_layer=2, n_head=2, n_embd=16))


def uniform_model() -> GPT:
    """All weights zero: every logit is 0, so each target costs exactly ln(V) nats."""
    model = tiny_model()
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    return model


def val_stream(n_docs: int = 7, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    parts = [np.concatenate([[1], rng.integers(4, V, size=int(rng.integers(2, 9))), [2]]) for _ in range(n_docs)]
    flat = np.concatenate(parts).astype(np.uint16)
    return [flat[:20], flat[20:]]  # two shards, so windows cross a shard boundary


def targets_of(shards: list[np.ndarray], max_windows: int | None = None) -> np.ndarray:
    """What sequential windows predict: every token after the first, up to the last full window."""
    flat = np.concatenate(shards)
    n = (flat.size - 1) // T
    if max_windows is not None:
        n = min(n, max_windows)
    return flat[1 : 1 + n * T].astype(np.int64)


def test_uniform_model_gives_hand_computed_bpb():
    shards = val_stream()
    out = bits_per_byte(uniform_model(), shards, TOKEN_BYTES, block_size=T, batch_size=3)
    targets = targets_of(shards)
    text = targets[TOKEN_BYTES[targets] > 0]
    assert (TOKEN_BYTES[targets] == 0).sum() > 0  # the stream does hold control targets
    assert out["tokens"] == targets.size
    assert out["bytes"] == TOKEN_BYTES[targets].sum()
    assert out["loss"] == pytest.approx(math.log(V), rel=1e-6)
    assert out["perplexity"] == pytest.approx(V, rel=1e-5)
    # bos/eos targets carry no bytes and are left out of the numerator as well
    expected = text.size * math.log(V) / (math.log(2) * TOKEN_BYTES[targets].sum())
    assert out["bpb"] == pytest.approx(expected, rel=1e-6)
    including_control = targets.size * math.log(V) / (math.log(2) * TOKEN_BYTES[targets].sum())
    assert out["bpb"] != pytest.approx(including_control, rel=1e-3)


def test_matches_per_token_losses_of_a_trained_looking_model():
    model = tiny_model(seed=1)
    with torch.no_grad():  # sharpen the predictions so per-token losses differ a lot
        model.wte.weight.mul_(40)
    shards = val_stream(n_docs=12, seed=3)
    windows = evaluation_windows(shards, T, max_windows=4)  # a fixed sample of 4 of the split's windows
    targets = np.concatenate([w[1:] for w in windows])
    nats = []
    for w in windows:
        window = torch.from_numpy(w)[None]
        _, losses = model(window[:, :-1], window[:, 1:], reduction="none")
        nats.append(losses[0])
    nats = torch.cat(nats).detach().double().numpy()
    is_text = TOKEN_BYTES[targets] > 0
    expected_bpb = nats[is_text].sum() / (math.log(2) * TOKEN_BYTES[targets].sum())
    for batch_size in (1, 3, 8):  # batching, including a partial last batch, changes nothing
        out = bits_per_byte(model, shards, TOKEN_BYTES, block_size=T, max_windows=4, batch_size=batch_size)
        assert out["tokens"] == 4 * T
        assert out["loss"] == pytest.approx(nats.mean(), rel=1e-5)
        assert out["bpb"] == pytest.approx(expected_bpb, rel=1e-5)
    assert out["bpb"] != pytest.approx(nats.sum() / (math.log(2) * TOKEN_BYTES[targets].sum()), rel=1e-3)


def test_validation_shorter_than_a_window():
    short = [np.arange(4, 4 + T, dtype=np.uint16)]  # T tokens; one window needs T + 1
    with pytest.raises(ValueError, match=rf"shorter than one window of {T + 1} tokens"):
        bits_per_byte(uniform_model(), short, TOKEN_BYTES, block_size=T)
