"""Encode throughput of the shard stage vs raw SentencePiece with the same threads, on the same real text.

Text: the Python standard library's own *.py files (several MB), cut at line ends into documents of
about `--doc-chars` characters as the pipeline's sources cut files (`doc_chars`). A tokenizer is
trained on a sample of it here. Variants run alternately in one process; each number is the median
over the repeats:

- baseline: `SentencePieceProcessor.encode(texts, num_threads=N)`, the whole list in one call on the
  same N threads as the stage (`--threads`), ids out as Python lists (SentencePiece's default) —
  the strongest plain use of the library: nothing is written anywhere;
- shard stage: `lm_core.shards.encode_documents` (what the shard stage runs) into a ShardWriter in a
  temp dir, batches of `--batch-docs` documents on N threads, shards written and hashed;
- the same two with 1 thread each, the second row.

ratio = shard stage MB/s / raw SentencePiece MB/s at equal threads (N). The shard stage's DuckDB reads
are not part of this measurement.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import sysconfig
import tempfile
import time
from pathlib import Path

STDLIB = Path(sysconfig.get_paths()["stdlib"])


def stdlib_documents(max_bytes: int, doc_chars: int = 4000) -> list[tuple[str, str]]:
    """(doc_id, text) from the stdlib's *.py files in path order, up to about max_bytes of UTF-8.

    Files are cut at the first line end after every doc_chars characters (0: one document per file).
    """
    docs, total = [], 0
    for path in sorted(STDLIB.rglob("*.py")):
        if "site-packages" in path.parts:
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        start, part = 0, 0
        while start < len(text):
            end = text.find("\n", start + doc_chars) if doc_chars else -1
            end = len(text) if end < 0 else end + 1
            docs.append((f"{path.relative_to(STDLIB)}#{part:04d}", text[start:end]))
            start, part = end, part + 1
        total += len(text.encode("utf-8"))
        if total >= max_bytes:
            break
    return docs


def train_bench_tokenizer(docs: list[tuple[str, str]], out: Path, vocab_size: int, sample_bytes: int) -> tuple[Path, float]:
    from lm_core.tokenizer import TokenizerConfig, train_tokenizer

    cfg = TokenizerConfig(vocab_size=vocab_size, sample_bytes=sample_bytes, num_threads=os.cpu_count() or 1)
    started = time.perf_counter()
    path = train_tokenizer(cfg, (line for _, text in docs for line in text.splitlines(keepends=True)), out)
    return path, time.perf_counter() - started


def run(argv: list[str]) -> dict:
    p = argparse.ArgumentParser(prog="python -m bench tokenize")
    p.add_argument("--mb", type=float, default=8.0, help="MB of stdlib source to encode")
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--batch-docs", type=int, default=256)
    p.add_argument("--doc-chars", type=int, default=4000, help="cut files into documents of ~this size; 0: whole files")
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")

    import sentencepiece as spm

    from lm_core.shards import ShardWriter, encode_documents
    from lm_core.tokenizer import Tokenizer

    docs = stdlib_documents(int(args.mb * 1e6), args.doc_chars)
    texts = [text for _, text in docs]
    total_mb = sum(len(t.encode("utf-8")) for t in texts) / 1e6
    with tempfile.TemporaryDirectory(prefix="lmforge-bench-tok-") as tmp:
        model, train_s = train_bench_tokenizer(docs, Path(tmp) / "tok.model", args.vocab, 4_000_000)
        tok = Tokenizer(model)
        raw = spm.SentencePieceProcessor(model_file=str(model))

        def raw_encode(threads: int) -> None:
            raw.encode(texts, num_threads=threads)

        def stage(threads: int) -> None:
            out = Path(tempfile.mkdtemp(dir=tmp))
            writer = ShardWriter(out, "train", 2_000_000, tok.vocab_size, tok.bos_id, tok.eos_id)
            batches = (docs[i : i + args.batch_docs] for i in range(0, len(docs), args.batch_docs))
            encode_documents(tok, writer, batches, threads)
            writer.close()
            shutil.rmtree(out)

        variants = {"raw_encode": lambda: raw_encode(args.threads), "shard_stage": lambda: stage(args.threads),
                    "raw_encode_1_thread": lambda: raw_encode(1), "shard_stage_1_thread": lambda: stage(1)}
        seconds: dict[str, list[float]] = {name: [] for name in variants}
        cpu_seconds: dict[str, list[float]] = {name: [] for name in variants}  # all threads of this process
        stage(args.threads)  # warm the page cache and allocator once
        for _ in range(args.repeats):
            for name, fn in variants.items():
                started, cpu_started = time.perf_counter(), time.process_time()
                fn()
                seconds[name].append(time.perf_counter() - started)
                cpu_seconds[name].append(time.process_time() - cpu_started)
        tokens = sum(len(ids) for ids in tok.encode_arrays(texts, args.threads))

    mb_per_s = {name: round(total_mb / statistics.median(s), 3) for name, s in seconds.items()}
    mb_per_s_min_max = {name: [round(total_mb / max(s), 3), round(total_mb / min(s), 3)] for name, s in seconds.items()}
    return {
        "benchmark": "tokenize",
        "ratio": round(mb_per_s["shard_stage"] / mb_per_s["raw_encode"], 3),
        "ratio_1_thread": round(mb_per_s["shard_stage_1_thread"] / mb_per_s["raw_encode_1_thread"], 3),
        "baseline": f"raw SentencePieceProcessor.encode(all texts, num_threads={args.threads}) in one call, same text, "
                    "same threads; second row: both with 1 thread",
        "target": ">= 1.0 at equal threads",
        "mb_per_s": mb_per_s,
        "mb_per_s_min_max": mb_per_s_min_max,  # over the repeats: the spread the shared machine gave
        # the speed-up the threads give each of them
        "parallel_ratio": {"raw_encode": round(mb_per_s["raw_encode"] / mb_per_s["raw_encode_1_thread"], 3),
                           "shard_stage": round(mb_per_s["shard_stage"] / mb_per_s["shard_stage_1_thread"], 3)},
        # CPU time per MB shows the work done whatever other processes take of the cores; wall / CPU time
        # below 1 is the parallelism actually obtained
        "cpu_seconds_per_mb": {k: round(statistics.median(v) / total_mb, 4) for k, v in cpu_seconds.items()},
        "cores_used": {k: round(statistics.median(c) / statistics.median(w), 2)
                       for (k, c), w in zip(cpu_seconds.items(), seconds.values())},
        "seconds_all_repeats": {k: [round(x, 3) for x in v] for k, v in seconds.items()},
        "text": {"source": "python stdlib *.py", "doc_chars": args.doc_chars, "mb": round(total_mb, 3), "documents": len(docs),
                 "tokens": tokens, "bytes_per_token": round(total_mb * 1e6 / tokens, 3)},
        "tokenizer": {"vocab_size": args.vocab, "train_seconds": round(train_s, 3), "train_sample_mb": 4.0},
        "threads": args.threads,
        "batch_docs": args.batch_docs,
        "repeats": args.repeats,
        "load_avg_1m_at_end": round(os.getloadavg()[0], 2),
        "machine": {"cpus": len(os.sched_getaffinity(0)), "python": platform.python_version(),
                    "processor": platform.processor()},
        "date": time.strftime("%Y-%m-%d"),
    }
