"""The generation engine: continuous batching (requests join and leave a running batch at step boundaries),
cancellation, slot reuse, the fixed-shape decode step, host reads per step, logprobs, its own loop."""

from __future__ import annotations

import collections
import threading

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from lm_core.generate import generate
from lm_core.generation_engine import EngineConfig, GenerationEngine, GenerationRequest
from lm_core.model import GPT, GPTConfig
from lm_core.sampling import SamplingConfig
from lm_core.typed_config import ConfigError

GREEDY = SamplingConfig(max_new_tokens=12, temperature=0.0)


@pytest.fixture(scope="module")
def model() -> GPT:
    torch.manual_seed(3)  # untied: a random model with a tied head just repeats its last token
    return GPT(GPTConfig(vocab_size=96, block_size=48, n_layer=2, n_head=4, n_kv_head=2, n_embd=32,
                         tie_embeddings=False)).eval()


class Collector:
    """Events per request id, as the engine reports them."""

    def __init__(self):
        self.events = collections.defaultdict(list)

    def request(self, prompt, sampling=GREEDY, **kw) -> GenerationRequest:
        return GenerationRequest(prompt, sampling, on_event=lambda e: self.events[e.request_id].append(e), **kw)

    def tokens(self, rid: int) -> list[int]:
        return [t for e in self.events[rid] for t in e.token_ids]

    def finish(self, rid: int) -> str | None:
        return self.events[rid][-1].finish_reason if self.events[rid] else None


def drain(engine: GenerationEngine) -> None:
    while engine.has_work():
        engine.step()


MIXED = [  # different settings in one batch: each row must get what it gets alone
    ([1, 5, 9], GREEDY),
    ([7, 7, 2, 40, 3, 11], SamplingConfig(max_new_tokens=9, temperature=0.9, seed=4)),
    ([60], SamplingConfig(max_new_tokens=14, temperature=1.2, top_k=10, seed=5)),
    ([2, 3], SamplingConfig(max_new_tokens=7, temperature=0.7, top_p=0.8, seed=6)),
]


@pytest.mark.parametrize("static", [False, True])
def test_requests_joining_a_running_batch_get_what_they_get_alone(model, static):
    alone = [generate(model, p, s) for p, s in MIXED]
    engine = GenerationEngine(model, EngineConfig(slots=3, max_len=32, static=static))
    got = Collector()
    ids = [engine.submit(got.request(*MIXED[0])), engine.submit(got.request(*MIXED[1]))]
    for _ in range(3):
        engine.step()
    ids.append(engine.submit(got.request(*MIXED[2])))  # joins at the next step boundary
    engine.step()
    assert engine.stats.running == 3
    ids.append(engine.submit(got.request(*MIXED[3])))  # no free slot: waits for the first row to finish
    engine.step()
    assert engine.stats.waiting == 1
    drain(engine)
    assert [got.tokens(i) for i in ids] == alone
    assert engine.stats.tokens_generated == sum(map(len, alone))


def test_a_finished_row_frees_its_slot_at_once(model):
    engine = GenerationEngine(model, EngineConfig(slots=1, max_len=32))
    got = Collector()
    short = engine.submit(got.request([1, 2], SamplingConfig(max_new_tokens=2, temperature=0.0)))
    queued = engine.submit(got.request([3, 4], SamplingConfig(max_new_tokens=3, temperature=0.0)))
    engine.step(), engine.step()
    assert got.finish(short) == "length" and engine.stats.running == 0
    engine.step()  # the very next step admits the queued request
    assert engine.stats.running == 1 and len(got.tokens(queued)) == 1


def test_cancel_frees_the_row_and_stops_its_tokens(model):
    engine = GenerationEngine(model, EngineConfig(slots=2, max_len=48))
    got = Collector()
    long = engine.submit(got.request([1], SamplingConfig(max_new_tokens=40, temperature=0.0)))
    other = engine.submit(got.request([2], SamplingConfig(max_new_tokens=6, temperature=0.0)))
    waiting = engine.submit(got.request([3], GREEDY))
    for _ in range(3):
        engine.step()
    engine.cancel(long), engine.cancel(waiting)
    engine.step()
    assert got.finish(long) == "cancelled" and got.finish(waiting) == "cancelled"
    assert len(got.tokens(long)) == 3 and got.tokens(waiting) == []
    drain(engine)
    assert got.tokens(other) == generate(model, [2], SamplingConfig(max_new_tokens=6, temperature=0.0))


def test_slots_are_reused_without_reallocation(model):
    engine = GenerationEngine(model, EngineConfig(slots=2, max_len=40))
    storage = engine.cache.k.data_ptr(), engine.cache.v.data_ptr()
    got = Collector()
    prompts = [[i + 1] * (1 + i % 5) for i in range(7)]
    ids = [engine.submit(got.request(p)) for p in prompts]
    drain(engine)
    assert [got.tokens(i) for i in ids] == [generate(model, p, GREEDY) for p in prompts]
    assert (engine.cache.k.data_ptr(), engine.cache.v.data_ptr()) == storage


def test_logprobs_of_prompt_and_generated_tokens(model):
    engine = GenerationEngine(model, EngineConfig(slots=2, max_len=32))
    got = Collector()
    prompt = [4, 8, 15, 16, 23]
    rid = engine.submit(got.request(prompt, SamplingConfig(max_new_tokens=3, temperature=0.0), logprobs=True,
                                    prompt_logprobs=True))
    drain(engine)
    events = got.events[rid]
    seq = prompt + got.tokens(rid)
    expected = torch.log_softmax(model(torch.tensor([seq]))[0][0], dim=-1)  # (T, V), no cache
    prompt_lp = events[0].prompt_logprobs
    assert [p.id for p in prompt_lp] == prompt and prompt_lp[0].logprob is None
    generated = [lp for e in events for lp in (e.logprobs or [])]
    for i, entry in enumerate(prompt_lp[1:] + generated, start=1):
        assert entry.id == seq[i]
        assert entry.logprob == pytest.approx(expected[i - 1, seq[i]].item(), abs=1e-5)
        top = [t for t, _ in entry.top]
        assert top == expected[i - 1].topk(5).indices.tolist()
    assert all(lp.top[0][0] == lp.id for lp in generated)  # greedy: the chosen token is the most likely


class HostReads(TorchDispatchMode):
    """Reads of device values by the host (as in tests/unit/test_engine_syncs.py), and tolist() calls."""

    READS = {"_local_scalar_dense", "item", "is_nonzero", "equal", "allclose", "nonzero", "masked_select", "unique"}

    def __init__(self):
        super().__init__()
        self.reads = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ in self.READS:
            self.reads[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("static", [False, True])
def test_a_decode_step_reads_only_the_chosen_ids(model, static, monkeypatch):
    engine = GenerationEngine(model, EngineConfig(slots=3, max_len=32, static=static))
    got = Collector()
    for prompt, sampling in MIXED[1:]:  # sampling with top-k and top-p: the costliest step
        engine.submit(got.request(prompt, sampling))
    engine.step()  # admission and prefill
    tolist_calls = []
    real_tolist = torch.Tensor.tolist
    monkeypatch.setattr(torch.Tensor, "tolist", lambda t: tolist_calls.append(t.shape) or real_tolist(t))
    with HostReads() as mode:
        engine.step(), engine.step()
    assert mode.reads == {}
    assert tolist_calls == [(3,), (3,)]  # one read of the ids per step, every row's together


def test_an_idle_slot_between_decoding_rows_keeps_the_cache_read_a_view(model, monkeypatch):
    """Rows in slots 0 and 2 with slot 1 idle (its request finished) decode over slots 0..2, the idle one on the
    scratch column, instead of gathering their keys; and each still gets what it gets alone."""
    engine = GenerationEngine(model, EngineConfig(slots=3, max_len=32))
    got = Collector()
    prompts = [[1, 5, 9], [4, 4], [7, 2, 30, 8]]
    budgets = [10, 2, 12]
    ids = [engine.submit(got.request(p, SamplingConfig(max_new_tokens=n, temperature=0.8, seed=i)))
           for i, (p, n) in enumerate(zip(prompts, budgets))]
    engine.step(), engine.step()
    assert got.finish(ids[1]) == "length" and engine.stats.running == 2  # slot 1 is free, 0 and 2 decode
    reads = []
    real = engine.cache.write_and_read
    monkeypatch.setattr(engine.cache, "write_and_read", lambda *a, **kw: reads.append(a[4]) or real(*a, **kw))
    engine.step()
    assert reads and all(r == slice(0, 3) for r in reads), reads  # one view of slots 0..2 per layer, no gather
    scratch_before = engine.cache.k[:, 1, :, :engine.cache.scratch].clone()
    drain(engine)
    assert torch.equal(engine.cache.k[:, 1, :, :engine.cache.scratch], scratch_before)  # the idle slot's keys stay
    alone = [generate(model, p, SamplingConfig(max_new_tokens=n, temperature=0.8, seed=i))
             for i, (p, n) in enumerate(zip(prompts, budgets))]
    assert [got.tokens(i) for i in ids] == alone

def test_the_engine_loop_serves_other_threads(model):
    engine = GenerationEngine(model, EngineConfig(slots=2, max_len=32)).start()
    try:
        done, results = threading.Event(), {}

        def ask(i: int) -> None:
            tokens = []

            def on_event(e):
                tokens.extend(e.token_ids)
                if e.finish_reason:
                    results[i] = tokens
                    if len(results) == 3:
                        done.set()

            engine.submit(GenerationRequest([i + 1, 9], GREEDY, on_event=on_event))

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(3)]
        [t.start() for t in threads]
        [t.join() for t in threads]
        assert done.wait(30)
        assert [results[i] for i in range(3)] == [generate(model, [i + 1, 9], GREEDY) for i in range(3)]
    finally:
        engine.stop()


def test_config_errors_name_the_fix(model):
    with pytest.raises(ConfigError, match="engine.compile=True needs a CUDA device"):
        GenerationEngine(model, EngineConfig(compile=True))
    with pytest.raises(ConfigError, match=r"engine.max_len=99 must be in 1..block_size=48"):
        GenerationEngine(model, EngineConfig(max_len=99))
    engine = GenerationEngine(model, EngineConfig(slots=1, max_len=8))
    with pytest.raises(ValueError, match=r"token ids \[96\] are outside the vocabulary"):
        engine.submit(GenerationRequest([1, 96]))
    with pytest.raises(ValueError, match="stop strings need text"):
        engine.submit(GenerationRequest([1], stop=["x"]))
