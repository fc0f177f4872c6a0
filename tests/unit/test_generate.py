"""Unit tests for lm_core.generate (the helpers over the generation engine): cached vs uncached equivalence,
sampling, stopping, batches, config errors."""

import pytest
import torch

from lm_core.generate import SamplingConfig, generate, generate_batch, generate_tokens
from lm_core.model import GPT, GPTConfig

PATTERN = [5, 12, 3, 40, 7, 22, 9, 31]  # period 8, all distinct, so the next token is a function of the last one
GREEDY = SamplingConfig(max_new_tokens=24, temperature=0.0)


def continuation(start_token: int, n: int) -> list[int]:
    i = PATTERN.index(start_token)
    return [PATTERN[(i + 1 + j) % len(PATTERN)] for j in range(n)]


def train_on_pattern(cfg: GPTConfig, steps: int = 150) -> GPT:
    torch.manual_seed(0)
    model = GPT(cfg)
    data = torch.tensor(PATTERN * 16)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    T = cfg.block_size
    for _ in range(steps):
        starts = torch.randint(0, len(data) - T - 1, (8,))
        x = torch.stack([data[s:s + T] for s in starts])
        y = torch.stack([data[s + 1:s + T + 1] for s in starts])
        _, loss = model(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    assert loss.item() < 0.05, f"tiny model failed to learn the pattern (loss {loss.item():.3f})"
    return model


@pytest.fixture(scope="module")
def trained() -> GPT:
    return train_on_pattern(GPTConfig(vocab_size=64, block_size=32, n_layer=2, n_head=4, n_kv_head=2, n_embd=32))


@pytest.fixture(scope="module")
def trained_learned() -> GPT:
    cfg = GPTConfig(vocab_size=64, block_size=32, n_layer=2, n_head=4, n_embd=32, pos="learned", norm="layernorm",
                    mlp="gelu", tie_embeddings=False)
    return train_on_pattern(cfg)


def test_greedy_with_cache_equals_without(trained, trained_learned):
    for model in (trained, trained_learned):
        prompt = PATTERN[:5]
        cached = generate(model, prompt, GREEDY, use_cache=True)
        uncached = generate(model, prompt, GREEDY, use_cache=False)
        assert len(cached) == 24
        assert cached == uncached


def test_greedy_reproduces_learned_pattern(trained, trained_learned):
    for model in (trained, trained_learned):
        prompt = PATTERN[2:7]
        assert generate(model, prompt, GREEDY) == continuation(prompt[-1], 24)


def test_cache_equals_no_cache_past_block_size():
    # prompt 20 + 30 new tokens overflows block_size=32: the cached path must slide the window like the baseline
    torch.manual_seed(1)
    model = GPT(GPTConfig(vocab_size=64, block_size=32, n_layer=2, n_head=4, n_embd=32)).eval()
    prompt = torch.randint(0, 64, (20,)).tolist()
    for sampling in (SamplingConfig(max_new_tokens=30, temperature=0.0),
                     SamplingConfig(max_new_tokens=30, temperature=1.0, top_k=20, top_p=0.9, seed=3)):
        assert generate(model, prompt, sampling) == generate(model, prompt, sampling, use_cache=False)
    long_prompt = torch.randint(0, 64, (40,)).tolist()  # longer than the block on its own
    greedy = SamplingConfig(max_new_tokens=5, temperature=0.0)
    assert generate(model, long_prompt, greedy) == generate(model, long_prompt, greedy, use_cache=False)


def test_seeded_sampling_is_reproducible():
    # an untrained model is near-uniform, so different seeds almost surely diverge
    torch.manual_seed(2)
    model = GPT(GPTConfig(vocab_size=64, block_size=32, n_layer=2, n_head=4, n_embd=32))
    sampling = SamplingConfig(max_new_tokens=20, temperature=1.0, seed=7)
    first = generate(model, [1, 2, 3], sampling)
    assert first == generate(model, [1, 2, 3], sampling)
    assert first == generate(model, [1, 2, 3], sampling, use_cache=False)
    other = generate(model, [1, 2, 3], SamplingConfig(max_new_tokens=20, temperature=1.0, seed=8))
    assert other != first


def test_eos_stops_and_is_not_yielded(trained):
    prompt = PATTERN[:3]  # continues 40, 7, 22, 9, ...
    out = generate(trained, prompt, GREEDY, eos_id=22)
    assert out == [40, 7]
    assert generate(trained, prompt, GREEDY, eos_id=PATTERN[3]) == []


def test_top_k_one_and_tiny_top_p_equal_greedy(trained):
    prompt = PATTERN[1:4]
    greedy = generate(trained, prompt, GREEDY)
    assert generate(trained, prompt, SamplingConfig(max_new_tokens=24, temperature=1.0, top_k=1, seed=0)) == greedy
    assert generate(trained, prompt, SamplingConfig(max_new_tokens=24, temperature=1.5, top_p=1e-6, seed=0)) == greedy


def test_sampling_respects_top_k_and_top_p_per_row():
    from lm_core.sampling import sample

    logits = torch.tensor([3.0, 2.0, 1.0, 0.0, -1.0]).repeat(600, 1)  # probs ~ .64 .23 .09 .03 .01
    rows = torch.arange(600)
    kind = rows // 200  # rows 0-199 top_k=2, 200-399 top_p=0.8, 400-599 temperature 5 and no cut
    drawn = sample(logits, temperature=torch.where(kind == 2, 5.0, 1.0), top_k=torch.where(kind == 0, 2, 0),
                   top_p=torch.where(kind == 1, 0.8, 1.0), seeds=torch.full((600,), 7), counters=rows, filters=True)
    assert set(drawn[:200].tolist()) == {0, 1}
    assert set(drawn[200:400].tolist()) == {0, 1}  # .64 < .8, so the second token is needed; .64+.23 >= .8 stops there
    assert set(drawn[400:].tolist()) == {0, 1, 2, 3, 4}
    greedy = sample(logits[:3], torch.zeros(3), torch.zeros(3, dtype=torch.long), torch.ones(3),
                    torch.zeros(3, dtype=torch.long), torch.arange(3), filters=False)
    assert greedy.tolist() == [0, 0, 0]


def test_sampling_noise_depends_on_seed_and_counter_only():
    from lm_core.sampling import gumbel_noise, token_keys

    a = gumbel_noise(torch.tensor([1, 2, 1]), torch.tensor([5, 5, 5]), token_keys(1000))
    assert torch.equal(a[0], a[2]) and not torch.equal(a[0], a[1])
    u = torch.exp(-torch.exp(-a))  # back to the uniforms
    assert 0.45 < u.mean() < 0.55 and u.min() > 0 and u.max() < 1


def test_mode_and_grad_state_restored(trained):
    trained.train()
    tokens = generate_tokens(trained, PATTERN[:2], GREEDY)
    next(tokens)
    assert not trained.training  # eval while the iterator is live
    assert torch.is_grad_enabled()  # no_grad does not leak to the caller between steps
    tokens.close()
    assert trained.training
    generate(trained, PATTERN[:2], SamplingConfig(max_new_tokens=3, temperature=0.0))
    assert trained.training
    trained.eval()


def test_zero_new_tokens_and_bad_inputs(trained):
    assert generate(trained, PATTERN[:2], SamplingConfig(max_new_tokens=0)) == []
    with pytest.raises(ValueError, match="prompt_ids is empty"):
        generate_tokens(trained, [], GREEDY)  # raises at call time, not on first next()


@pytest.mark.parametrize("overrides, match", [
    (dict(temperature=-1), r"sampling\.temperature=-1 must be >= 0"),
    (dict(top_k=0), r"sampling\.top_k=0 must be an integer >= 1"),
    (dict(top_p=0.0), r"sampling\.top_p=0\.0 must be in \(0, 1\]"),
    (dict(top_p=1.5), r"sampling\.top_p=1\.5"),
    (dict(max_new_tokens=-3), r"sampling\.max_new_tokens=-3 must be an integer >= 0"),
    (dict(seed=1.5), r"sampling\.seed=1\.5 must be an integer"),
])
def test_validate_names_the_key(overrides, match, trained):
    with pytest.raises(ValueError, match=match):
        SamplingConfig(**overrides).validate()
    with pytest.raises(ValueError, match=match):
        generate(trained, [1], SamplingConfig(**overrides))


# --- batches of prompts of different lengths ---------------------------------------------------------

from lm_core.generate import stream_text  # noqa: E402
from lm_core.kv_cache import CacheAccess, KVCache  # noqa: E402


def _random_models() -> list[GPT]:
    torch.manual_seed(4)
    rope = GPT(GPTConfig(vocab_size=64, block_size=32, n_layer=2, n_head=4, n_kv_head=2, n_embd=32))
    learned = GPT(GPTConfig(vocab_size=64, block_size=32, n_layer=2, n_head=4, n_embd=32, pos="learned",
                            norm="layernorm", mlp="gelu", tie_embeddings=False))
    return [rope.eval(), learned.eval()]


@torch.no_grad()
def test_rows_of_different_lengths_in_one_cache_compute_what_they_would_alone():
    # logits, not argmax: a near-tie cannot hide a wrong mask or position. Slots out of order, a stale
    # sequence left in a slot, a right-padded prefill, then one decode step with per-row positions.
    prompts = [[3, 9, 4, 1, 7, 30, 2], [11, 5], [8, 8, 1, 60]]
    slots = torch.tensor([2, 0, 3])
    for model in _random_models():
        cache = KVCache(model.cfg, slots=4, max_len=12)
        cache.k.normal_(), cache.v.normal_()  # leftovers of earlier sequences must not leak in
        T = max(map(len, prompts))
        x = torch.tensor([p + [0] * (T - len(p)) for p in prompts])  # (3, T), right-padded
        zero = torch.zeros(3, dtype=torch.long)
        batched, _ = model(x, cache=CacheAccess(cache, zero, slots, T, common_start=0))
        lengths = torch.tensor([len(p) for p in prompts])
        step, _ = model(torch.tensor([[21], [22], [23]]), cache=CacheAccess(cache, lengths, slots, T + 1))
        for b, p in enumerate(prompts):
            alone, _ = model(torch.tensor([p + [21 + b]]))  # (1, len+1, V), no cache
            torch.testing.assert_close(batched[b, :len(p)], alone[0, :len(p)], atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(step[b, 0], alone[0, -1], atol=1e-5, rtol=1e-4)


def test_batched_greedy_equals_individual_greedy(trained, trained_learned):
    prompts = [PATTERN[:5], PATTERN[3:4], PATTERN[1:8], PATTERN[6:8] + PATTERN[:3]]
    for model in (trained, trained_learned):
        individual = [generate(model, p, GREEDY) for p in prompts]
        assert generate_batch(model, prompts, GREEDY) == individual
        assert generate_batch(model, prompts, GREEDY, use_cache=False) == individual
        assert individual[1] == continuation(PATTERN[3], 24)
        # eos ends one row early while the others go on
        with_eos = generate_batch(model, prompts, GREEDY, eos_id=22)
        assert with_eos == [generate(model, p, GREEDY, eos_id=22) for p in prompts]
        assert len({len(r) for r in with_eos}) > 1


def test_batched_sampling_and_overflow_equal_individual():
    # untrained (near-uniform) model, seeded sampling, prompts long enough to overflow block_size=32
    model = _random_models()[0]
    prompts = [torch.randint(0, 64, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (3, 20, 40)]
    for sampling in (SamplingConfig(max_new_tokens=20, temperature=1.0, top_k=30, seed=5),
                     SamplingConfig(max_new_tokens=20, temperature=0.0)):
        individual = [generate(model, p, sampling) for p in prompts]
        assert generate_batch(model, prompts, sampling) == individual
        assert generate_batch(model, prompts, sampling, use_cache=False) == individual


class Digits:
    """A detokenizer over bare ids (each id is one "character"), so stop strings need no SentencePiece."""

    eos_id = 63

    def decode(self, ids):
        return "".join(chr(0x100 + i) for i in ids)


def test_a_stopped_row_leaves_while_the_others_go_on(trained):
    prompts = [PATTERN[:2], PATTERN[:4], PATTERN[5:7]]
    full = [generate(trained, p, GREEDY) for p in prompts]
    stop = Digits().decode([PATTERN[4]])  # id 7: row 1's 1st token, row 0's 3rd, row 2's 6th
    chunks = list(stream_text(trained, Digits(), prompts, GREEDY, stop=[stop]))
    for i, tokens in enumerate(full):
        cut = tokens[:tokens.index(PATTERN[4])] if PATTERN[4] in tokens else tokens
        text = "".join(c.text for c in chunks if c.index == i)
        final = [c for c in chunks if c.index == i and c.finish_reason]
        assert text == Digits().decode(cut) and len(final) == 1
        assert (final[0].finish_reason, final[0].tokens) == ("stop", len(cut) + 1)
    with pytest.raises(ValueError, match="a prompt is empty"):
        generate_batch(trained, [[1], []], GREEDY)
