"""`python -m bench` lists the benchmarks; `python -m bench NAME [options]` runs one; `python -m bench all`
runs every one in turn (those that need CUDA are skipped, saying so, where there is none; `--skip a,b`,
`--dry-run`); `python -m bench readme` rewrites the README's results blocks from the JSONs.

Each writes bench/results/NAME.json whose top-level `ratio` compares it with its baseline, stamped with its
provenance (bench/provenance.py: the commit, a digest of the sources it measures, the machine, the load),
and then regenerates the README's table from the JSONs (bench/readme.py).
"""

from __future__ import annotations

import importlib
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

from bench.provenance import STALE_FILE, stale_list, stamp

BENCHMARKS = {
    "pipeline": ("bench.pipeline", "stage timings of the whole flow; ratio = warm rerun / cold run"),
    "train_step": ("bench.train_step", "pretrain tokens/s, ZeRO 0/1/2 x fp32/bf16; ratio = engine / plain PyTorch loop"),
    "zero_memory": ("bench.zero_memory", "per-rank peak memory, 2 and 4 ranks, ZeRO 0-3 on ~50M params, beside the ZeRO paper's "
                                         "bytes/param; ratio = ZeRO-3 measured MB / paper MB (2 ranks)"),
    "generate": ("bench.generate", "decode tokens/s; ratio = KV cache / recompute at 512 new tokens (+ batch, + HF)"),
    "generate_cuda": ("bench.generate_cuda", "CUDA, 124M-shape bf16 decode: the compiled fixed-shape engine vs transformers "
                                             "generate at batch 1 and 32; ratio = lmforge / transformers at batch 1"),
    "serve": ("bench.serve", "HTTP tokens/s, p50/p95 latency at 1/4/8/16 clients; ratio = 8 clients / 1 client tokens/s"),
    "tokenize": ("bench.tokenize", "shard-stage encode MB/s; ratio = vs raw SentencePiece encode with the same threads"),
    "loader": ("bench.loader", "training loader samples/s; ratio = vs a preallocated array filled from memmap views"),
    "quantize": ("bench.quantize", "fp32 vs bf16 vs int8 weights: decode tokens/s, val bpb, memory; ratio = int8 / fp32 "
                                   "decode tokens/s"),
    "gpu": ("bench.gpu", "CUDA, 124M bf16: the engine (ZeRO 0-3, fp16, fp32) vs a plain compiled loop; ratio = engine ZeRO-1 / plain"),
    "stability": ("bench.stability", "spike gate: vetoed steps on healthy runs, detection of injected faults; ratio = FPs now / before"),
    "dedup": ("bench.dedup", "near-dup docs/s, recall/precision on planted pairs and hard negatives; ratio = vs "
                             "datasketch MinHashLSH with the same bands x rows + verification"),
    "data_scale": ("bench.data_scale", "ingest files/s + MB/s, exact and near-dup docs/s and RSS at 10k-1M docs, 1 and 2 "
                                       "workers; ratio = near-dup 2 workers / 1"),
    "ci": ("bench.ci", "`bash .ci/run` on a fresh clone (install, then ruff + the whole suite); ratio = test command s / 900 s"),
}
RESULTS = Path(__file__).resolve().parent / "results"
# how `python -m bench all` runs each: (extra options, environment); the commands the README shows
ALL_RUNS: dict[str, tuple[list[str], dict[str, str]]] = {
    "pipeline": (["-c", "default"], {}),  # the demo's figures come from this run (about 11 minutes)
    "train_step": (["--repeats", "5"], {"OMP_NUM_THREADS": "1"}),
}
NEEDS_CUDA = {"gpu", "generate_cuda"}


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help", "list"):
        print("benchmarks (python -m bench NAME):")
        for name, (_, what) in BENCHMARKS.items():
            print(f"  {name:<12} {what}")
        return 0
    name, *rest = argv
    if name == "readme":
        from bench.readme import README, rewrite

        print(f"{README}: {'rewritten' if rewrite() else 'already up to date'}")
        return 0
    if name == "all":
        return run_all(rest)
    if name == "generate" and "--device" in rest[:-1] and rest[rest.index("--device") + 1] != "cpu":
        name = "generate_cuda"  # its own result file: the CPU generate.json stays
    if name not in BENCHMARKS:
        print(f"unknown benchmark '{name}'; choose one of: {', '.join(BENCHMARKS)}", file=sys.stderr)
        return 2
    load_before = os.getloadavg()
    omp = os.environ.get("OMP_NUM_THREADS")  # as the caller set it, before a benchmark sets its own default
    result = importlib.import_module(BENCHMARKS[name][0]).run(rest)
    if not result:  # a worker process of a benchmark, or a run that wrote its result elsewhere
        return 0
    if "--smoke" in rest:  # a check that the script runs (gpu, generate --device on CPU), not a result to keep
        print(json.dumps(result, indent=2))
        print(f"--smoke: nothing written to {RESULTS}")
        return 0
    result["command"] = (f"OMP_NUM_THREADS={omp} " if omp else "") + shlex.join(["python", "-m", "bench", name, *rest])
    result["provenance"] = stamp(name, load_before)
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"{name}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    print(f"wrote {out}")
    stale = stale_list()
    if name in stale and not result["provenance"]["sources_uncommitted"]:  # measured just now: no longer stale
        del stale[name]
        STALE_FILE.write_text(json.dumps(stale, indent=2) + "\n")
        print(f"removed {name} from {STALE_FILE.name}")
    from bench.readme import README, rewrite

    if rewrite():
        print(f"rewrote the results blocks of {README}")
    return 0


def run_all(argv: list[str]) -> int:
    """Every benchmark in BENCHMARKS order, each in its own process; then the README's blocks."""
    import torch

    skip = set(argv[argv.index("--skip") + 1].split(",")) if "--skip" in argv else set()
    dry_run = "--dry-run" in argv  # print the plan only
    cuda = torch.cuda.is_available()
    failed = []
    for name in BENCHMARKS:
        if name in skip:
            print(f"== {name}: skipped (--skip)", flush=True)
            continue
        if name in NEEDS_CUDA and not cuda:
            print(f"== {name}: skipped, no CUDA device (run `python -m bench {name}` on a machine with one)", flush=True)
            continue
        options, env = ALL_RUNS.get(name, ([], {}))
        prefix = "".join(f"{k}={v} " for k, v in env.items())
        print(f"== {name}: {prefix}python -m bench {shlex.join([name, *options])}", flush=True)
        if dry_run:
            continue
        done = subprocess.run([sys.executable, "-m", "bench", name, *options], env={**os.environ, **env},
                              cwd=Path(__file__).resolve().parents[1])
        if done.returncode != 0:
            failed.append(name)
    if dry_run:
        return 0
    from bench.readme import README, rewrite

    print(f"{README}: {'rewritten' if rewrite() else 'already up to date'}")
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
