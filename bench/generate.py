"""Decode speed of lm_core's generation engine on CPU: with the KV cache vs recomputing the whole window every
step (the baseline; ratio = cached / recomputed tokens/s at the longest length), a batch of prompts vs the
same prompts one by one, and, when transformers is installed, lmforge vs Hugging Face `generate` on the same
weights exported as a Llama directory (greedy, same prompt, tokens compared).

The model is built in-process: a SentencePiece tokenizer trained on stdlib source and a GPT with random
(untied, so greedy does not just repeat a token) weights; speed does not depend on what it learned.
One thread, variants alternated within each repeat; medians reported with the spread (min–max) of the repeats.

`--device cuda` runs the GPU comparison instead (bench/generate_device.py: a 124M-shape model in bf16, the
compiled fixed-shape decode step vs transformers, batch 1 and 32); `--device cpu --smoke` checks that path.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sysconfig
import tempfile
import time
from pathlib import Path

import torch

from lm_core.generate import SamplingConfig, generate, generate_batch
from lm_core.model import GPT, GPTConfig
from lm_core.tokenizer import Tokenizer, TokenizerConfig, train_tokenizer
from lm_core.weights import TOKENIZER_FILE, save_model_dir

MODEL = dict(n_layer=4, n_head=4, n_kv_head=2, n_embd=256, block_size=1024)


def build_model_dir(root: Path, vocab_size: int = 2048, seed: int = 0, model_vocab_size: int | None = None,
                    **model) -> Path:
    """An export directory (weights, tokenizer, config.json) of a random-weight GPT; see the module doc.
    model_vocab_size: a model vocabulary larger than the tokenizer's (GPU-sized models)."""
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))[:60]
    lines = [line for f in files for line in f.read_text(errors="ignore").splitlines(keepends=True)]
    tok_path = train_tokenizer(TokenizerConfig(vocab_size=vocab_size, num_threads=1), iter(lines), root / "tokenizer.model")
    torch.manual_seed(seed)
    gpt = GPT(GPTConfig(vocab_size=model_vocab_size or vocab_size, tie_embeddings=False, **{**MODEL, **model}))
    return save_model_dir(gpt, tok_path, root / "export")


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _min_max(tokens: int, seconds: list[float]) -> list[float]:
    """Tokens/s of the slowest and the fastest repeat."""
    return [round(tokens / max(seconds), 1), round(tokens / min(seconds), 1)]


def _timed(fn) -> tuple[float, object]:
    started = time.perf_counter()
    out = fn()
    return time.perf_counter() - started, out


def run(argv: list[str]) -> dict:
    p = argparse.ArgumentParser(prog="python -m bench generate")
    p.add_argument("--lengths", type=int, nargs="+", default=[128, 512], help="new tokens per run")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--batch", type=int, default=8, help="prompts in the batched-vs-sequential comparison")
    p.add_argument("--no-hf", action="store_true", help="skip the transformers comparison")
    p.add_argument("--device", default="cpu", help="cuda: the GPU comparison of bench/generate_device.py")
    p.add_argument("--smoke", action="store_true", help="the --device path on CPU with a tiny model (checks the script)")
    p.add_argument("--new-tokens", type=int, default=256, help="--device: tokens per request")
    p.add_argument("--out", default="", help="--device: also write the JSON here (e.g. $OUT on the device machine)")
    args = p.parse_args(argv)
    if args.device != "cpu" or args.smoke:
        from bench.generate_device import run_device

        return run_device(args)
    torch.set_num_threads(1)
    os.environ.setdefault("OMP_NUM_THREADS", "1")

    from lm_core.weights import load_model_dir

    root = Path(tempfile.mkdtemp(prefix="lmforge-bench-generate-"))
    model_dir = build_model_dir(root)
    model, _ = load_model_dir(model_dir)
    tok = Tokenizer(model_dir / TOKENIZER_FILE)
    prompt = tok.encode("def parse_args(argv):\n    parser = argparse.ArgumentParser(", bos=True)
    longest = max(args.lengths)
    if len(prompt) + longest > model.cfg.block_size:
        raise SystemExit(f"--lengths up to {longest} + a {len(prompt)}-token prompt exceed block_size={model.cfg.block_size}")

    cases = {}
    for n in args.lengths:
        greedy = SamplingConfig(max_new_tokens=n, temperature=0.0)
        times: dict[str, list[float]] = {"kv_cache": [], "recompute": []}
        outputs = {}
        for _ in range(args.repeats):
            for name, use_cache in (("kv_cache", True), ("recompute", False)):
                seconds, outputs[name] = _timed(lambda: generate(model, prompt, greedy, use_cache=use_cache))
                times[name].append(seconds)
        med = {k: statistics.median(v) for k, v in times.items()}
        cases[str(n)] = {
            "new_tokens": n,
            "kv_cache_tokens_per_s": round(n / med["kv_cache"], 1),
            "recompute_tokens_per_s": round(n / med["recompute"], 1),
            "kv_cache_tokens_per_s_min_max": _min_max(n, times["kv_cache"]),
            "recompute_tokens_per_s_min_max": _min_max(n, times["recompute"]),
            "speedup": round(med["recompute"] / med["kv_cache"], 2),
            "identical_tokens": outputs["kv_cache"] == outputs["recompute"],
            "seconds": {k: [round(s, 4) for s in v] for k, v in times.items()},
        }

    result = {
        "benchmark": "generate",
        "ratio": cases[str(longest)]["speedup"],
        "baseline": f"recomputing the full sequence every step (no KV cache), {longest} new tokens, batch 1, greedy",
        "target": ">= 5x at 512 new tokens",
        "repeats": args.repeats,
        "model": {**MODEL, "vocab_size": model.cfg.vocab_size, "params": sum(t.numel() for t in model.parameters())},
        "prompt_tokens": len(prompt),
        "cases": cases,
        "batched": _batched(model, tok, args.batch, args.repeats),
        "transformers": {"skipped": "--no-hf"} if args.no_hf else _vs_transformers(model, model_dir, prompt, args),
        "machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
                    "torch": torch.__version__},
        "date": time.strftime("%Y-%m-%d"),
    }
    return result


def _batched(model: GPT, tok: Tokenizer, batch: int, repeats: int) -> dict:
    """`batch` prompts of different lengths: one left-padded batch vs one prompt at a time."""
    texts = [("import os\n" * (1 + i % 4)) + f"def f{i}(x):" for i in range(batch)]
    prompts = [tok.encode(t, bos=True) for t in texts]
    greedy = SamplingConfig(max_new_tokens=64, temperature=0.0)
    times: dict[str, list[float]] = {"batched": [], "one_by_one": []}
    for _ in range(repeats):
        seconds, batched = _timed(lambda: generate_batch(model, prompts, greedy))
        times["batched"].append(seconds)
        seconds, single = _timed(lambda: [generate(model, p, greedy) for p in prompts])
        times["one_by_one"].append(seconds)
    med = {k: statistics.median(v) for k, v in times.items()}
    tokens = batch * greedy.max_new_tokens
    return {
        "prompts": batch,
        "prompt_tokens": [len(p) for p in prompts],
        "new_tokens_each": greedy.max_new_tokens,
        "batched_tokens_per_s": round(tokens / med["batched"], 1),
        "one_by_one_tokens_per_s": round(tokens / med["one_by_one"], 1),
        "batched_tokens_per_s_min_max": _min_max(tokens, times["batched"]),
        "one_by_one_tokens_per_s_min_max": _min_max(tokens, times["one_by_one"]),
        "speedup": round(med["one_by_one"] / med["batched"], 2),
        "identical_tokens": batched == single,
    }


def _vs_transformers(model: GPT, model_dir: Path, prompt: list[int], args) -> dict:
    try:
        import transformers
        from transformers import LlamaForCausalLM
    except ImportError:
        return {"skipped": "transformers is not installed"}
    try:
        from lm_core.hf_export import save_hf_dir
    except ImportError:
        return {"skipped": "lm_core.hf_export is not available"}
    hf_dir = save_hf_dir(model, model_dir / TOKENIZER_FILE, model_dir.parent / "hf")
    hf = LlamaForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    hf.generation_config.eos_token_id = None  # run to max_new_tokens, as lmforge does with eos_id=None
    ids = torch.tensor([prompt])
    out = {"transformers": transformers.__version__, "hf_attn_implementation": hf.config._attn_implementation}
    for n in args.lengths:
        greedy = SamplingConfig(max_new_tokens=n, temperature=0.0)
        times: dict[str, list[float]] = {"lmforge": [], "transformers": []}
        for _ in range(args.repeats):
            seconds, ours = _timed(lambda: generate(model, prompt, greedy))
            times["lmforge"].append(seconds)
            with torch.no_grad():
                seconds, theirs = _timed(lambda: hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                                             max_new_tokens=n, pad_token_id=0))
            times["transformers"].append(seconds)
        theirs = theirs[0, len(prompt):].tolist()
        med = {k: statistics.median(v) for k, v in times.items()}
        same = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), min(len(ours), len(theirs)))
        out[str(n)] = {
            "lmforge_tokens_per_s": round(n / med["lmforge"], 1),
            "transformers_tokens_per_s": round(n / med["transformers"], 1),
            "lmforge_tokens_per_s_min_max": _min_max(n, times["lmforge"]),
            "transformers_tokens_per_s_min_max": _min_max(n, times["transformers"]),
            "ratio": round(med["transformers"] / med["lmforge"], 2),
            "identical_tokens": ours == theirs,
            "matching_prefix": same,
        }
    return out
