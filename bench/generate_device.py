"""Decode speed on a GPU, prepared for a session that is lent one: lmforge's generation engine (the fixed-shape
decode step, compiled with torch.compile(mode="reduce-overhead"), i.e. captured in a CUDA graph) against
transformers' `generate` on the same export, in the same process.

    python -m bench generate --device cuda [--new-tokens 256] [--batch 32] [--out DIR]
    python -m bench generate --device cpu --smoke     # the same code path on CPU with a tiny model, eager

The model is gpt2-124m's shape (12 layers x 768, 12 heads, 1024 context) in lmforge's default recipe (RoPE,
RMSNorm, SwiGLU, untied), so that it exports to Hugging Face's Llama; vocabulary 32000 (the tokenizer has 2048
ids, trained on stdlib source; the other rows are never prompted): 134M parameters, random weights, bf16.
Greedy decoding with no eos, so every run makes exactly the tokens asked for. Rows:
- `lmforge_b1_compiled` / `lmforge_b1_static_eager`: one request on a one-slot engine;
- `transformers_b1`: `generate` on the hf/ copy, sdpa attention, its default dynamic cache;
- `lmforge_b32_compiled`: 32 requests at once on a 32-slot engine (aggregate tokens/s).
Targets (issue 15): batch 1 >= 1.5x transformers; batch 32 aggregate >= 10x batch 1. Nothing is installed at
run time (transformers is on the device machine); the default settings take about 3 minutes on one H200.
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from lm_core.generate import generate_batch
from lm_core.generation_engine import EngineConfig, GenerationEngine
from lm_core.sampling import SamplingConfig
from lm_core.tokenizer import Tokenizer
from lm_core.weights import TOKENIZER_FILE, load_model_dir

SHAPE = dict(n_layer=12, n_head=12, n_embd=768, block_size=1024, vocab_size=32000)
SMOKE_SHAPE = dict(n_layer=2, n_head=4, n_embd=64, block_size=128, vocab_size=2048)
TARGETS = {"b1_vs_transformers": 1.5, "b32_vs_b1": 10.0}


def run_device(args) -> dict:
    from bench.generate import build_model_dir

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here (use --device cpu --smoke to check the script)")
    compile_ = device.type == "cuda"
    if device.type == "cpu":
        torch.set_num_threads(1)  # steadier on a shared machine (and the smoke run only checks the script)
    shape = SMOKE_SHAPE if args.smoke else SHAPE
    new_tokens = 16 if args.smoke else args.new_tokens
    root = Path(tempfile.mkdtemp(prefix="lmforge-bench-generate-"))
    model_dir = build_model_dir(root, vocab_size=2048, **{k: v for k, v in shape.items() if k != "vocab_size"},
                                model_vocab_size=shape["vocab_size"])
    from lm_core.quantize import prepare_for_inference

    model = prepare_for_inference(load_model_dir(model_dir)[0].to(device), "bf16")
    tok = Tokenizer(model_dir / TOKENIZER_FILE)
    prompt = tok.encode("def parse_args(argv):\n    parser = argparse.ArgumentParser(", bos=True)
    greedy = SamplingConfig(max_new_tokens=new_tokens, temperature=0.0)
    need = len(prompt) + new_tokens
    rows: dict[str, dict] = {}

    def engine(slots: int, compile_step: bool) -> GenerationEngine:
        return GenerationEngine(model, EngineConfig(slots=slots, max_len=need, static=True, compile=compile_step))

    one = engine(1, compile_)
    rows["lmforge_b1_compiled" if compile_ else "lmforge_b1_static"] = _time(
        lambda: generate_batch(model, [prompt], greedy, engine=one), device, args.repeats, new_tokens)
    if compile_:
        eager = engine(1, False)
        rows["lmforge_b1_static_eager"] = _time(lambda: generate_batch(model, [prompt], greedy, engine=eager),
                                                device, args.repeats, new_tokens)
    ours = generate_batch(model, [prompt], greedy, engine=one)[0]
    batch = 4 if args.smoke else args.batch
    prompts = [prompt[:-1] + [prompt[-1] + i % 7] for i in range(batch)]  # same length, different last token
    wide = engine(batch, compile_)
    rows[f"lmforge_b{batch}{'_compiled' if compile_ else '_static'}"] = _time(
        lambda: generate_batch(model, prompts, greedy, engine=wide), device, args.repeats, new_tokens * batch)
    hf = _transformers(model_dir, device, prompt, new_tokens, args.repeats)
    rows.update(hf.pop("rows"))
    b1 = next(v for k, v in rows.items() if k.startswith("lmforge_b1_"))["tokens_per_s"]
    bN = rows[f"lmforge_b{batch}{'_compiled' if compile_ else '_static'}"]["tokens_per_s"]
    ratios = {"b1_vs_transformers": round(b1 / rows["transformers_b1"]["tokens_per_s"], 2) if "transformers_b1" in rows
              else None, f"b{batch}_vs_b1": round(bN / b1, 2)}
    theirs = hf.pop("tokens", None)
    same = None if theirs is None else next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), len(ours))
    result = {
        "benchmark": "generate", "device": str(device), "smoke": args.smoke, "ratio": ratios["b1_vs_transformers"],
        "baseline": "transformers generate on the same export (hf/), batch 1, greedy, bf16, same process",
        "ratios": ratios, "targets": {k: f">= {v}" for k, v in TARGETS.items()}, "rows": rows,
        "matching_prefix_vs_transformers": same, "new_tokens": new_tokens, "prompt_tokens": len(prompt),
        "model": {**shape, "recipe": "rope/rmsnorm/swiglu, untied", "params": sum(p.numel() for p in model.parameters()),
                  "dtype": "bf16"},
        "compile_fallback": one.runner.compile_error, **hf, "environment": _environment(device),
        "date": time.strftime("%Y-%m-%d"),
    }
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "generate_device.json").write_text(json.dumps(result, indent=2))
    return result


def _time(fn, device: torch.device, repeats: int, tokens: int) -> dict:
    """tokens/s of fn() (median of `repeats` after one warm-up call, which compiles/captures)."""
    started = time.perf_counter()
    fn()
    warmup = time.perf_counter() - started
    seconds = []
    for _ in range(repeats):
        _sync(device)
        started = time.perf_counter()
        fn()
        _sync(device)
        seconds.append(time.perf_counter() - started)
    med = statistics.median(seconds)
    return {"tokens_per_s": round(tokens / med, 1), "seconds": [round(s, 4) for s in seconds],
            "first_call_s": round(warmup, 2)}


def _transformers(model_dir: Path, device, prompt: list[int], new_tokens: int, repeats: int) -> dict:
    try:
        import transformers
        from transformers import LlamaForCausalLM

        from lm_core.hf_export import save_hf_dir
    except ImportError as exc:
        return {"rows": {}, "transformers": f"skipped: {exc}"}
    # the same weights as the engine's: exported from the fp32 file, loaded by transformers in bf16
    hf_dir = save_hf_dir(load_model_dir(model_dir)[0], model_dir / TOKENIZER_FILE, model_dir.parent / "hf")
    hf = LlamaForCausalLM.from_pretrained(hf_dir, dtype=torch.bfloat16).to(device).eval()
    hf.generation_config.eos_token_id = None  # run to max_new_tokens, as lmforge does without eos
    ids = torch.tensor([prompt], device=device)

    def call():
        with torch.no_grad():
            return hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=new_tokens,
                               pad_token_id=0)

    row = _time(call, device, repeats, new_tokens)
    return {"rows": {"transformers_b1": row}, "tokens": call()[0, len(prompt):].tolist(),
            "transformers": transformers.__version__, "hf_attn_implementation": hf.config._attn_implementation}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _environment(device: torch.device) -> dict:
    env = {"torch": torch.__version__, "device": str(device)}
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    return env
