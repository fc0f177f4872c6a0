"""lm-evaluation-harness scores an lmforge export two ways and they agree: `--model hf` on the export's hf/
copy (transformers in-process) and `--model local-completions` against `lmforge serve` (log-likelihoods
from the completions API's echo + logprobs). The task is a small local multiple-choice YAML over a JSONL
file written here (`dataset_path: json`), run offline: no hub, no downloads.

Both paths are given the same tokenization: the HF tokenizer adds BOS by default and lm-eval's hf backend
keeps that, while its API backend defaults to add_bos_token=False; lmforge trains every document behind a
BOS, so the API run sets add_bos_token=True (README: "Evaluating with lm-evaluation-harness").
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
from serve_fixtures import build_export, lmforge_serve

pytest.importorskip("lm_eval")

pytestmark = [pytest.mark.integration, pytest.mark.slow]

NAME = "tiny-eval"
BLOCK = 256
TASK = "lmforge_tiny_mc"
_SCRIPT = Path(sys.executable).with_name("lm_eval")
LM_EVAL = [str(_SCRIPT)] if _SCRIPT.is_file() else [sys.executable, "-m", "lm_eval"]


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("lm-eval")


@pytest.fixture(scope="module")
def export(root) -> Path:
    return build_export(root, BLOCK, hf=True)


@pytest.fixture(scope="module")
def tasks(root) -> Path:
    """A 16-item multiple-choice task over Python-ish snippets."""
    rng = random.Random(0)
    words = ["def", "class", "return", "import", "for", "while", "print", "self", "None", "True", "in", "if"]
    items = [{"context": "x = " + " ".join(rng.choice(words) for _ in range(3)),
              "choices": [" ".join(rng.choice(words) for _ in range(2)) for _ in range(4)],
              "answer": rng.randrange(4)} for _ in range(16)]
    folder = root / "tasks"
    folder.mkdir()
    (folder / "items.jsonl").write_text("".join(json.dumps(item) + "\n" for item in items))
    (folder / f"{TASK}.yaml").write_text(
        f"task: {TASK}\n"
        f"dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {folder / 'items.jsonl'}\n"
        f"test_split: test\n"
        f"output_type: multiple_choice\n"
        "doc_to_text: \"{{context}}\"\n"
        "doc_to_choice: \"{{choices}}\"\n"
        "doc_to_target: answer\n"
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n")
    return folder


def run_lm_eval(root: Path, tasks: Path, name: str, *model: str) -> tuple[float, list[list[float]]]:
    """(accuracy, per-document log-likelihood of each choice) of one lm_eval run."""
    out = root / f"out-{name}"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "HF_HOME": str(root / "hf-home"), "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [*LM_EVAL, *model, "--tasks", TASK, "--include_path", str(tasks), "--output_path", str(out), "--log_samples"]
    done = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    results = json.loads(next(out.rglob("results_*.json")).read_text())
    samples = [json.loads(line) for line in next(out.rglob(f"samples_{TASK}_*.jsonl")).read_text().splitlines()]
    samples.sort(key=lambda s: s["doc_id"])
    return results["results"][TASK]["acc,none"], [[float(r[0][0]) for r in s["resps"]] for s in samples]


def test_hf_and_local_completions_agree(root, export, tasks):
    hf_acc, hf_ll = run_lm_eval(root, tasks, "hf", "--model", "hf", "--device", "cpu", "--batch_size", "1",
                                "--model_args", f"pretrained={export / 'hf'},dtype=float32")
    with lmforge_serve(export, NAME) as base:
        api_args = (f"model={NAME},base_url={base}/v1/completions,tokenizer={export / 'hf'},"
                    f"tokenizer_backend=huggingface,max_length={BLOCK},add_bos_token=True,num_concurrent=1")
        api_acc, api_ll = run_lm_eval(root, tasks, "api", "--model", "local-completions", "--model_args", api_args)
    assert len(hf_ll) == len(api_ll) == 16
    assert api_acc == hf_acc
    worst = max(abs(a - b) for doc_a, doc_b in zip(hf_ll, api_ll) for a, b in zip(doc_a, doc_b))
    assert worst < 1e-3, f"per-choice log-likelihoods differ by up to {worst}"
