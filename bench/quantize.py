"""fp32 vs bf16 vs weight-only int8 CPU inference on one trained export, in one run: decode tokens/s and
validation bits per byte are the headline (ratio = int8 decode tokens/s / fp32 decode tokens/s, with the
bpb change beside it); weight memory is a side note (the dtype fixes it).

The export is the workspace's latest (a `make demo` / default-config run), or --model DIR; its val
split comes from the shard stage its lineage names. Without an export the benchmark trains one first
into that workspace (`lmforge run -c default --no-prefect` with --steps training steps; a later run reuses
it), since bits per byte only says something about a trained model. Targets: int8 bpb loss <= 2% and int8
<= 0.35x fp32 weight memory; speed is reported as measured. One thread, variants alternated within each
repeat, medians reported with the spread (min–max) of the repeats.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from lm_core.evaluation import bits_per_byte
from lm_core.generate import SamplingConfig, generate
from lm_core.quantize import DTYPES, prepare_for_inference, weight_bytes
from lm_core.shards import open_split
from lm_core.tokenizer import Tokenizer
from lm_core.weights import TOKENIZER_FILE, load_model_dir

MEMORY_TARGET, BPB_TARGET_PCT = 0.35, 2.0
PROMPT = "ROMEO.\nBut soft, what light"


def _export(args) -> tuple[Path, str]:
    """The export to measure and, in words, where it came from."""
    if args.model:
        return Path(args.model), f"the export {args.model}"
    ws = Path(args.workspace).resolve()
    latest = ws / "LATEST_EXPORT"
    if latest.is_file():
        export = Path(latest.read_text().strip())
        return export, f"the latest export in {ws.name}/ ({_trained_as(export)})"
    print(f"no export in {ws}: training one there (default config, {args.steps} steps)", flush=True)
    cmd = [sys.executable, "-m", "flows.cli", "run", "-c", "default", "--no-prefect", "--workspace", str(ws),
           f"train.max_steps={args.steps}", f"train.checkpoint_every={args.steps}"]
    subprocess.run(cmd, check=True, cwd=Path(__file__).resolve().parents[1])
    return Path(latest.read_text().strip()), f"the default config trained for {args.steps} steps"


def _trained_as(export: Path) -> str:
    """'the default config trained for 200 steps', read from the export's lineage and its pretrain manifest."""
    lineage = json.loads((export / "config.json").read_text()).get("lineage", {})
    manifest = export.resolve().parents[1] / "pretrain" / str(lineage.get("lmforge.pretrain_key")) / "manifest.json"
    steps = json.loads(manifest.read_text())["metrics"].get("steps") if manifest.is_file() else "?"
    return f"the {lineage.get('lmforge.config_name', '?')} config trained for {steps} steps"


def _val_split(export: Path, tok: Tokenizer) -> list:
    """The val shards the export was evaluated on: <workspace>/artifacts/shard/<its shard key>."""
    meta = json.loads((export / "config.json").read_text())
    key = meta.get("lineage", {}).get("lmforge.shard_manifest_key")
    shard_dir = export.resolve().parents[1] / "shard" / str(key)  # artifacts/export/<key> -> artifacts/shard/<key>
    if not key or not shard_dir.is_dir():
        raise SystemExit(f"cannot find the val shards of {export} (lineage shard key {key!r}, looked in {shard_dir}); "
                         "pass an export made by `lmforge run` inside its workspace")
    return open_split(shard_dir, "val", tok.sha256)


def _timed(fn) -> tuple[float, object]:
    started = time.perf_counter()
    out = fn()
    return time.perf_counter() - started, out


def run(argv: list[str]) -> dict:
    p = argparse.ArgumentParser(prog="python -m bench quantize")
    p.add_argument("--model", help="export directory (default: the workspace's latest export)")
    p.add_argument("--workspace", default="workspace", help="where LATEST_EXPORT is (default: ./workspace)")
    p.add_argument("--steps", type=int, default=300, help="training steps when there is no export to use")
    p.add_argument("--new-tokens", type=int, default=128, help="greedy decode length per timed run")
    p.add_argument("--repeats", type=int, default=11, help="alternating decode runs per dtype (each about 0.5 s)")
    p.add_argument("--max-windows", type=int, default=200, help="val windows for bits per byte")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    os.environ.setdefault("OMP_NUM_THREADS", "1")

    export, source = _export(args)
    tok = Tokenizer(export / TOKENIZER_FILE)
    val = _val_split(export, tok)
    token_bytes = tok.token_bytes()
    prompt = tok.encode(PROMPT, bos=True)
    models = {dtype: prepare_for_inference(load_model_dir(export)[0], dtype) for dtype in DTYPES}
    cfg = models["fp32"].cfg
    if len(prompt) + args.new_tokens > cfg.block_size:
        raise SystemExit(f"--new-tokens {args.new_tokens} + a {len(prompt)}-token prompt exceed block_size={cfg.block_size}")

    greedy = SamplingConfig(max_new_tokens=args.new_tokens, temperature=0.0)
    times: dict[str, list[float]] = {d: [] for d in DTYPES}
    outputs = {}
    for d in DTYPES:  # warm-up: first calls pay for allocations and kernel selection
        generate(models[d], prompt, SamplingConfig(max_new_tokens=8, temperature=0.0))
    for _ in range(args.repeats):
        for d in DTYPES:
            seconds, outputs[d] = _timed(lambda: generate(models[d], prompt, greedy))
            times[d].append(seconds)

    variants = {}
    for d in DTYPES:
        scores = bits_per_byte(models[d], val, token_bytes, block_size=cfg.block_size, max_windows=args.max_windows)
        sizes = weight_bytes(models[d])
        variants[d] = {
            "weight_bytes": sizes["total"],
            "weight_mb": round(sizes["total"] / 2**20, 3),
            "embedding_bytes": sizes["embedding"],
            "decode_tokens_per_s": round(args.new_tokens / statistics.median(times[d]), 1),
            "decode_tokens_per_s_min_max": [round(args.new_tokens / max(times[d]), 1), round(args.new_tokens / min(times[d]), 1)],
            "val_bpb": round(scores["bpb"], 5),
            "val_loss": round(scores["loss"], 5),
            "greedy_tokens_equal_fp32": outputs[d] == outputs["fp32"],
            "seconds": [round(s, 4) for s in times[d]],
        }
    fp32 = variants["fp32"]
    compare = {}
    for d in ("bf16", "int8"):
        v = variants[d]
        compare[d] = {
            "weight_memory_ratio": round(v["weight_bytes"] / fp32["weight_bytes"], 4),
            "bpb_change_pct": round(100 * (v["val_bpb"] - fp32["val_bpb"]) / fp32["val_bpb"], 3),
            "decode_speedup": round(v["decode_tokens_per_s"] / fp32["decode_tokens_per_s"], 2),
        }
    int8 = compare["int8"]
    return {
        "benchmark": "quantize",
        "ratio": int8["decode_speedup"],
        "ratio_means": "int8 decode tokens/s / fp32 decode tokens/s, batch 1, greedy, 1 thread, median",
        "int8_bpb_change_pct": int8["bpb_change_pct"],
        "int8_weight_memory_ratio": int8["weight_memory_ratio"],
        "baseline": "fp32 weights of the same export (same prompt, same val windows, same process)",
        "target": f"int8 bpb loss <= {BPB_TARGET_PCT}% and int8 weight memory <= {MEMORY_TARGET}x fp32",
        "target_met": int8["weight_memory_ratio"] <= MEMORY_TARGET and int8["bpb_change_pct"] <= BPB_TARGET_PCT,
        "repeats": args.repeats,
        "export": str(export),
        "model_source": source,
        "model": {**{k: getattr(cfg, k) for k in ("n_layer", "n_head", "n_embd", "vocab_size", "block_size",
                                                   "tie_embeddings")},
                  "params": cfg.num_params()},
        "int8_scheme": "per-row symmetric int8 weights (Linear + tied embedding/head), bf16 activations, "
                       "torch._weight_int8pack_mm",
        "vs_fp32": compare,
        "variants": variants,
        "decode": {"prompt_tokens": len(prompt), "new_tokens": args.new_tokens, "batch": 1, "greedy": True},
        "val": {"windows": args.max_windows, "tokens": scores["tokens"], "bytes": scores["bytes"]},
        "machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
                    "torch": torch.__version__},
        "date": time.strftime("%Y-%m-%d"),
    }
