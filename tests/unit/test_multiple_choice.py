"""Multiple-choice scoring on tiny tasks whose answers follow from hand-set weights."""

from __future__ import annotations

import json
import math

import pytest
import torch

from lm_core.model import GPT, GPTConfig
from lm_core.multiple_choice import (
    MCExample,
    choice_logprobs,
    evaluate_task,
    load_bigbench,
    load_jsonl,
    load_task,
    wilson_interval,
)

V = C = 16
CHARS = "abcdefgh "  # ids 4..12; 0..3 are control ids, 1 is bos


def encode(text: str) -> list[int]:
    return [4 + CHARS.index(c) for c in text]


def uniform_model() -> GPT:
    """All weights zero: every logit is 0, every token costs exactly ln V."""
    model = GPT(GPTConfig(vocab_size=V, block_size=8, n_layer=1, n_head=2, n_embd=C))
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    return model


def bigram_model(follows: dict[str, str], strength: float = 5.0) -> GPT:
    """A hand-made bigram model: blocks add nothing (output projections zero), token i embeds as the
    one-hot e_i, so RMSNorm gives sqrt(C) * e_i and the logits of the next token are
    sqrt(C) * lm_head[:, i]. `follows` maps a char to the char it predicts (logit `strength`)."""
    model = GPT(GPTConfig(vocab_size=V, block_size=8, n_layer=1, n_head=2, n_embd=C, tie_embeddings=False,
                          norm_eps=1e-12))  # eps would perturb the hand-computed logits
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        model.wte.weight.copy_(torch.eye(V, C))
        model.norm_f.weight.fill_(1.0)
        for prev, nxt in follows.items():
            model.lm_head.weight[encode(nxt)[0], encode(prev)[0]] = strength / math.sqrt(C)
    return model


def test_uniform_model_scores_are_token_counts():
    ex = MCExample("ab", ["c", "cde", "hh"], frozenset([0]))
    scores = choice_logprobs(uniform_model(), encode, ex, bos_id=1)
    assert scores == pytest.approx([-1 * math.log(V), -3 * math.log(V), -2 * math.log(V)], rel=1e-5)


def test_bigram_model_knows_the_answer():
    model = bigram_model({"a": "b", "b": "c", " ": "d"})
    ex = MCExample("a", ["b", "e"], frozenset([0]))
    scores = choice_logprobs(model, encode, ex, bos_id=1)
    # after "a" the logits are 5 for "b" and 0 for the other 15 tokens
    assert scores[0] == pytest.approx(5 - math.log(math.exp(5) + V - 1), rel=1e-5)
    assert scores[1] == pytest.approx(-math.log(math.exp(5) + V - 1), rel=1e-5)
    # raw accuracy prefers the short right answer; byte normalization flips a long likely one back
    task = [
        MCExample("a", ["b", "e"], frozenset([0])),  # b follows a
        MCExample(" ", ["d", "e"], frozenset([0])),  # d follows space
        MCExample("a", ["e", "bc"], frozenset([1])),  # "bc": two likely tokens beat one unlikely
        MCExample("h", ["f", "g"], frozenset([0, 1])),  # both right (BIG-bench ties)
    ]
    out = evaluate_task(model, encode, task, bos_id=1)
    assert out["n"] == 4 and out["acc"] == 1.0 and out["acc_norm"] == 1.0
    assert [e["pick"] for e in out["examples"]] == [0, 0, 1, 0]
    assert out["chance"] == pytest.approx((0.5 + 0.5 + 0.5 + 1.0) / 4)
    assert out["acc_ci_low"] == pytest.approx(wilson_interval(4, 4)[0]) and out["acc_ci_high"] == 1.0
    wrong = evaluate_task(model, encode, [MCExample("a", ["e", "b"], frozenset([0]))], bos_id=1)
    assert wrong["acc"] == 0.0 and wrong["examples"][0]["pick"] == 1


def test_byte_normalization_changes_the_pick():
    """Uniform model: raw log-likelihood favours the shorter choice, per-byte scores tie (first wins)."""
    out = evaluate_task(uniform_model(), encode, [MCExample("a", ["bbbb", "c"], frozenset([0]))], bos_id=1)
    assert out["examples"][0]["pick"] == 1 and out["acc"] == 0.0
    assert out["examples"][0]["pick_norm"] == 0 and out["acc_norm"] == 1.0


def test_long_contexts_are_cut_from_the_left():
    model = bigram_model({"a": "b"})
    long_ctx = MCExample("h" * 20 + "a", ["b", "e"], frozenset([0]))
    short_ctx = MCExample("a", ["b", "e"], frozenset([0]))
    assert choice_logprobs(model, encode, long_ctx, 1) == pytest.approx(choice_logprobs(model, encode, short_ctx, 1))


def test_wilson_interval_matches_the_reference():
    assert wilson_interval(8, 10) == pytest.approx((0.4901625, 0.9433178), abs=1e-6)  # statsmodels' value
    assert wilson_interval(0, 5)[0] == 0.0 and wilson_interval(5, 5)[1] == 1.0
    assert wilson_interval(0, 0) == (0.0, 1.0)


def test_jsonl_format(tmp_path):
    path = tmp_path / "task.jsonl"
    path.write_text('{"context": "Q", "choices": ["x", "y"], "answer": 1}\n\n'
                    '{"context": "R", "choices": ["x", "y", "z"], "answer": "z"}\n')
    examples = load_task(path)
    assert [(e.context, e.choices, e.correct) for e in examples] == [
        ("Q", ["x", "y"], frozenset([1])), ("R", ["x", "y", "z"], frozenset([2]))]
    path.write_text('{"context": "Q", "choices": ["x", "y"], "answer": 2}\n')
    with pytest.raises(ValueError, match=r"task.jsonl:1: 'answer'=2 must be an index"):
        load_jsonl(path)
    path.write_text('{"context": "Q", "choices": ["x"], "answer": 0}\n')
    with pytest.raises(ValueError, match="at least 2 'choices'"):
        load_jsonl(path)


def test_bigbench_task_json(tmp_path):
    task = {"task_prefix": "Answer.", "example_input_prefix": "\nQuestion: ", "example_output_prefix": "\nAnswer: ",
            "append_choices_to_input": False,
            "examples": [{"input": "2+2?", "target_scores": {"3": 0, "4": 1, "four": 1}},
                         {"input": "free text", "target": "no scores"},
                         {"input": "sky?", "target_scores": {"blue": 1.0, "green": 0.0}}]}
    path = tmp_path / "task.json"
    path.write_text(json.dumps(task))
    examples = load_bigbench(path)
    assert len(examples) == 2
    assert examples[0].context == "Answer.\nQuestion: 2+2?\nAnswer: "
    assert examples[0].choices == ["3", "4", "four"] and examples[0].correct == {1, 2}
    del task["append_choices_to_input"]  # BIG-bench's default lists the choices in the prompt
    path.write_text(json.dumps(task))
    assert load_bigbench(path)[1].context == "Answer.\nQuestion: sky?\n  choice: blue\n  choice: green\nAnswer: "
    path.write_text(json.dumps({"examples": [{"input": "x", "target": "y"}]}))
    with pytest.raises(ValueError, match="no multiple-choice examples"):
        load_bigbench(path)
