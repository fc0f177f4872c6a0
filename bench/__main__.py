"""`python -m bench` lists the benchmarks; `python -m bench NAME [options]` runs one.

Each writes bench/results/NAME.json whose top-level `ratio` compares it with its baseline, stamped with its
provenance (bench/provenance.py: the commit, a digest of the sources it measures, the machine, the load).
"""

from __future__ import annotations

import importlib
import json
import os
import sys
from pathlib import Path

from bench.provenance import stamp

BENCHMARKS = {
    "pipeline": ("bench.pipeline", "stage timings of the whole flow; ratio = warm rerun / cold run"),
    "train_step": ("bench.train_step", "pretrain tokens/s, ZeRO 0/1/2 x fp32/bf16; ratio = engine / plain PyTorch loop"),
    "zero_memory": ("bench.zero_memory", "per-rank peak memory, 2 and 4 ranks, ZeRO 0-3 on ~50M params; ratio = ZeRO-3 / ZeRO-0 (2 ranks)"),
    "generate": ("bench.generate", "decode tokens/s; ratio = KV cache / recompute at 512 new tokens (+ batch, + HF); "
                                   "--device cuda: vs transformers on a GPU"),
    "serve": ("bench.serve", "HTTP tokens/s, p50/p95 latency at 1/4/8/16 clients; ratio = 8 clients / 1 client tokens/s"),
    "tokenize": ("bench.tokenize", "shard-stage encode MB/s; ratio = vs raw 1-thread SentencePiece encode"),
    "loader": ("bench.loader", "training loader samples/s; ratio = vs flat np.memmap random windows"),
    "quantize": ("bench.quantize", "fp32 vs bf16 vs int8 weights: memory, decode tokens/s, val bpb; ratio = int8 / fp32 bytes"),
    "gpu": ("bench.gpu", "CUDA, 124M bf16: the engine (ZeRO 0-3, fp16, fp32) vs a plain compiled loop; ratio = engine ZeRO-1 / plain"),
    "stability": ("bench.stability", "spike gate: vetoed steps on healthy runs, detection of injected faults; ratio = FPs now / before"),
    "dedup": ("bench.dedup", "near-dup docs/s, recall/precision on planted pairs; ratio = vs datasketch MinHash+LSH"),
    "data_scale": ("bench.data_scale", "ingest files/s + MB/s, exact and near-dup docs/s and RSS at 10k-1M docs, 1 and 2 "
                                       "workers; ratio = near-dup 2 workers / 1"),
}
RESULTS = Path(__file__).resolve().parent / "results"


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help", "list"):
        print("benchmarks (python -m bench NAME):")
        for name, (_, what) in BENCHMARKS.items():
            print(f"  {name:<12} {what}")
        return 0
    name, *rest = argv
    if name not in BENCHMARKS:
        print(f"unknown benchmark '{name}'; choose one of: {', '.join(BENCHMARKS)}", file=sys.stderr)
        return 2
    load_before = os.getloadavg()
    result = importlib.import_module(BENCHMARKS[name][0]).run(rest)
    result["provenance"] = stamp(name, load_before)
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"{name}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
