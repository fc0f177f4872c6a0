"""Training-loader throughput: lm_core.loader.TokenLoader vs filling a preallocated array from memmap views.

Tokens: the Python standard library's *.py files encoded with a tokenizer trained here, written as
real Arrow shards by ShardWriter (`--tokens-per-shard`, the shard stage's default) and opened with
open_split (memory-mapped, checksums verified), and the same tokens as one flat uint16 .bin file for the
baselines. All produce (batch, block_size + 1) int64 arrays; variants alternate in one process, one
thread, and each number is a median over repeats.

- baseline (the headline ratio): random starts from a seeded generator, copied row by row into a
  preallocated int64 array from a plain ndarray view of one flat np.memmap: the tightest simple loop,
  and what the loader did itself before it gathered a one-shard batch in one fancy-indexed copy;
- side row, nanoGPT's get_batch: `np.stack([data[i:i+T+1] for i in ix]).astype(np.int64)`;
- loader: `next(TokenLoader(...))`: seeded per-epoch permutation, resumable, rank-partitioned, several
  shards (a batch drawing from more than one shard is copied row by row into one concatenate).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.tokenize import stdlib_documents, train_bench_tokenizer


def run(argv: list[str]) -> dict:
    p = argparse.ArgumentParser(prog="python -m bench loader")
    p.add_argument("--mb", type=float, default=8.0, help="MB of stdlib source to encode into shards")
    p.add_argument("--block-size", type=int, nargs="+", default=[256, 1024])
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--batches", type=int, default=1000, help="batches per timed repeat")
    p.add_argument("--repeats", type=int, default=25, help="many short alternations: a load burst hits one repeat")
    p.add_argument("--tokens-per-shard", type=int, default=2_000_000, help="shard.tokens_per_shard (the default's)")
    args = p.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")

    from lm_core.loader import TokenLoader
    from lm_core.shards import ShardWriter, encode_documents, open_split, write_index
    from lm_core.tokenizer import Tokenizer

    docs = stdlib_documents(int(args.mb * 1e6))
    results = {}
    with tempfile.TemporaryDirectory(prefix="lmforge-bench-loader-") as tmp:
        model, _ = train_bench_tokenizer(docs, Path(tmp) / "tok.model", 4096, 2_000_000)
        tok = Tokenizer(model)
        shard_dir = Path(tmp) / "shards"
        writer = ShardWriter(shard_dir, "train", args.tokens_per_shard, tok.vocab_size, tok.bos_id, tok.eos_id)
        encode_documents(tok, writer, (docs[i : i + 256] for i in range(0, len(docs), 256)), 1)
        write_index(shard_dir, writer.close(), tok.sha256, tok.vocab_size)
        shards = open_split(shard_dir, "train", tok.sha256)
        flat_path = Path(tmp) / "train.bin"
        np.concatenate(shards).tofile(flat_path)
        data = np.memmap(flat_path, dtype=np.uint16, mode="r")

        for T in args.block_size:
            B = args.batch_size
            rng = np.random.default_rng(0)
            loader = TokenLoader(shards, T, B, seed=0)

            def baseline() -> None:
                for _ in range(args.batches):
                    ix = rng.integers(len(data) - T - 1, size=B)
                    np.stack([data[i : i + T + 1] for i in ix]).astype(np.int64)

            view = np.asarray(data)  # a plain ndarray over the same map: slicing it skips memmap's __array_finalize__

            def baseline_prealloc() -> None:
                for _ in range(args.batches):
                    ix = rng.integers(len(view) - T - 1, size=B)
                    out = np.empty((B, T + 1), dtype=np.int64)
                    for row, i in enumerate(ix.tolist()):
                        out[row] = view[i : i + T + 1]

            def ours() -> None:
                for _ in range(args.batches):
                    next(loader)

            variants = {"memmap_random_windows": baseline, "memmap_prealloc_rows": baseline_prealloc, "token_loader": ours}
            seconds: dict[str, list[float]] = {name: [] for name in variants}
            for fn in variants.values():
                fn()  # warm: page cache, first epoch's permutation
            for _ in range(args.repeats):
                for name, fn in variants.items():
                    started = time.perf_counter()
                    fn()
                    seconds[name].append(time.perf_counter() - started)
            samples_per_s = {name: round(args.batches * B / statistics.median(s), 1) for name, s in seconds.items()}
            results[f"block_size_{T}"] = {
                "ratio": round(samples_per_s["token_loader"] / samples_per_s["memmap_prealloc_rows"], 3),
                "ratio_vs_np_stack": round(samples_per_s["token_loader"] / samples_per_s["memmap_random_windows"], 3),
                "samples_per_s": samples_per_s,
                "samples_per_s_min_max": {name: [round(args.batches * B / max(s), 1), round(args.batches * B / min(s), 1)]
                                          for name, s in seconds.items()},
                "windows_per_epoch": loader.windows_per_epoch,
                "epochs_read": loader.epoch,
            }
        num_tokens, num_shards = sum(s.size for s in shards), len(shards)
        data = view = shards = loader = None  # release the memory maps before the temp dir goes

    first = results[f"block_size_{args.block_size[0]}"]
    return {
        "benchmark": "loader",
        "ratio": first["ratio"],
        "ratio_is_for": f"block_size={args.block_size[0]}",
        "baseline": "random windows copied row by row into a preallocated int64 array from views of one flat np.memmap",
        "side_baseline": "nanoGPT's get_batch: np.stack of memmap slices + astype(int64) (ratio_vs_np_stack)",
        "target": ">= 1.0 vs the preallocated-views baseline",
        "tokens_per_shard": args.tokens_per_shard,
        "by_block_size": results,
        "batch_size": args.batch_size,
        "batches_per_repeat": args.batches,
        "repeats": args.repeats,
        "data": {"source": "python stdlib *.py", "tokens": int(num_tokens), "shards": num_shards},
        "load_avg_1m_at_end": round(os.getloadavg()[0], 2),
        "machine": {"cpus": len(os.sched_getaffinity(0)), "python": platform.python_version(),
                    "processor": platform.processor()},
        "date": time.strftime("%Y-%m-%d"),
    }
