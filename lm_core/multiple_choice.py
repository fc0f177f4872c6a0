"""Multiple-choice tasks scored by log-likelihood: which continuation does the model find likeliest?

Each choice is scored as sum log p(choice tokens | context). `acc` picks the highest sum; `acc_norm`
divides by the choice's UTF-8 bytes first (longer answers are not penalised for being long; bytes, not
tokens, so runs with different tokenizers compare). Accuracy comes with a 95% Wilson interval, which
stays inside [0, 1] and is honest for the small task sizes used here.

Two formats: JSONL, one {"context", "choices", "answer"} object a line (answer: an index or the
choice's text), and BIG-bench's task.json (examples with `target_scores`; the choices with the top
score are correct; prompts built as BIG-bench's JSON tasks build them: task prefix, input prefix, the
input, the choices listed unless append_choices_to_input is false, output prefix).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

Z95 = 1.959963984540054


@dataclass
class MCExample:
    context: str
    choices: list[str]
    correct: frozenset[int]  # indices of the right choices (BIG-bench can have several)


def load_jsonl(path: Path) -> list[MCExample]:
    examples = []
    for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{where}: not JSON ({exc.msg}); each line must be "
                             '{"context": ..., "choices": [...], "answer": index or text}') from None
        choices, answer = record.get("choices"), record.get("answer")
        if not isinstance(record.get("context"), str) or not isinstance(choices, list) or len(choices) < 2:
            raise ValueError(f"{where}: needs a string 'context' and a list of at least 2 'choices'")
        if isinstance(answer, str) and answer in choices:
            answer = choices.index(answer)
        if isinstance(answer, bool) or not isinstance(answer, int) or not 0 <= answer < len(choices):
            raise ValueError(f"{where}: 'answer'={answer!r} must be an index into choices (0..{len(choices) - 1}) "
                             "or the text of one choice")
        examples.append(MCExample(record["context"], [str(c) for c in choices], frozenset([answer])))
    return examples


def load_bigbench(path: Path) -> list[MCExample]:
    """Multiple-choice examples of a BIG-bench JSON task (examples without target_scores are skipped)."""
    task = json.loads(Path(path).read_text(encoding="utf-8"))
    prefix = task.get("task_prefix", "")
    in_prefix = task.get("example_input_prefix", "\nQ: ")
    out_prefix = task.get("example_output_prefix", "\nA: ")
    append_choices = task.get("append_choices_to_input", True)
    choice_prefix = task.get("choice_prefix", "\n  choice: ")
    examples = []
    for example in task.get("examples", []):
        scores = example.get("target_scores")
        if not scores or len(scores) < 2:
            continue
        choices = list(scores)
        best = max(scores.values())
        correct = frozenset(i for i, c in enumerate(choices) if scores[c] == best)
        text = example["input"]
        if append_choices:  # BIG-bench lists the options in the prompt by default
            text += choice_prefix + choice_prefix.join(choices)
        examples.append(MCExample(f"{prefix}{in_prefix}{text}{out_prefix}", choices, correct))
    if not examples:
        raise ValueError(f"{path} has no multiple-choice examples (none with 2+ target_scores)")
    return examples


def load_task(path: Path) -> list[MCExample]:
    path = Path(path)
    return load_jsonl(path) if path.suffix == ".jsonl" else load_bigbench(path)


@torch.no_grad()
def choice_logprobs(model, encode, example: MCExample, bos_id: int | None) -> list[float]:
    """sum log p(choice | context) for each choice; one batch of len(choices) rows, right-padded.

    Context and choice are encoded separately and joined, so every choice continues the same context
    tokens; a sequence longer than the model's window loses tokens from the left of the context.
    """
    block = model.cfg.block_size
    context = ([bos_id] if bos_id is not None else []) + encode(example.context)
    rows, spans = [], []
    for choice in example.choices:
        cont = encode(choice)
        if not cont:
            raise ValueError(f"choice {choice!r} encodes to no tokens; choices must be non-empty text")
        ids = (context + cont)[-(block + 1):]
        rows.append(ids)
        spans.append(len(ids) - len(cont))  # position of the first choice token in ids
    width = max(len(r) for r in rows)
    device = next(model.parameters()).device
    batch = torch.zeros(len(rows), width, dtype=torch.long, device=device)  # padding is never scored
    for i, ids in enumerate(rows):
        batch[i, : len(ids)] = torch.tensor(ids)
    logits, _ = model(batch[:, :-1])  # (N, W-1, V): position t predicts token t+1
    logp = F.log_softmax(logits.float(), dim=-1)
    out = []
    for i, ids in enumerate(rows):
        targets = torch.tensor(ids[spans[i]:], device=device)  # (C,)
        positions = torch.arange(spans[i] - 1, len(ids) - 1, device=device)
        out.append(float(logp[i, positions, targets].sum()))
    return out


def wilson_interval(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def evaluate_task(model, encode, examples: list[MCExample], bos_id: int | None = None) -> dict:
    """Accuracy (raw and byte-normalized) with 95% Wilson intervals, the chance level, and per-example picks."""
    if not examples:
        raise ValueError("no examples to score")
    was_training = model.training
    model.eval()
    hits = hits_norm = 0
    chance = 0.0
    picks = []
    try:
        for ex in examples:
            scores = choice_logprobs(model, encode, ex, bos_id)
            normed = [s / max(1, len(c.encode("utf-8"))) for s, c in zip(scores, ex.choices)]
            pick, pick_norm = _argmax(scores), _argmax(normed)
            hits += pick in ex.correct
            hits_norm += pick_norm in ex.correct
            chance += len(ex.correct) / len(ex.choices)
            picks.append({"pick": pick, "pick_norm": pick_norm, "correct": sorted(ex.correct),
                          "logprobs": [round(s, 4) for s in scores]})
    finally:
        model.train(was_training)
    n = len(examples)
    lo, hi = wilson_interval(hits, n)
    lo_n, hi_n = wilson_interval(hits_norm, n)
    return {"n": n, "acc": hits / n, "acc_ci_low": lo, "acc_ci_high": hi,
            "acc_norm": hits_norm / n, "acc_norm_ci_low": lo_n, "acc_norm_ci_high": hi_n,
            "chance": chance / n, "examples": picks}


def _argmax(values: list[float]) -> int:
    return max(range(len(values)), key=lambda i: values[i])  # first of ties
