"""The data stages as corpora grow: ingest of many small files, exact dedup and near-dup at 1 and 2 workers.

Corpora are synthetic but made of real text, offline: distinct paragraphs of the Python files of the standard
library and of this environment's site-packages (~1.2M, source and docs; their own near duplicates, such as
vendored copies, included) as documents, each used once, with 10% exact copies and 10% near copies (a word in
~60 changed) planted. Every measurement runs in a fresh process; peak RSS is sampled from /proc (that
process, and the sum over its worker processes).

  near    pipelines.data.neardup_partitioned on a DuckDB table of the corpus; 1 worker = in process,
          2 = two local worker processes (spawned inside the timed run)
  exact   the dedup stage's exact grouping (a DuckDB window over the ingest-time exact key)
  stage   the whole dedup stage (quality rules, exact, near, verdicts, data report) on an ingested workspace,
          at 100k and 1M documents; 1 worker = flow.data_workers=1 (one process, DuckDB on one thread, as for
          near), 2 = flow.data_workers=2 (DuckDB on two threads for the quality rules, two worker processes
          for near-dup and the report's plot)
  ingest  the ingest stage over N small text files (one paragraph each) in directories of 1,000, over
          2,000 larger files (~100 paragraphs, ~38 KB each) for MB/s, and over 4,000 files of ~64 paragraphs
          (~24 KB): the file size at which the two ingest targets, 2,000 files/s and 50 MB/s, are the same
          rate, so neither the per-file nor the per-byte cost can hide behind the other

ratio = near-dup docs/s with 2 workers / with 1 worker, at the largest corpus.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import random
import re
import resource
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

PARAGRAPH = re.compile(r"\n[ \t]*\n")
FILLER = ("lorem", "ipsum", "quux", "zebra", "verily", "forsooth")


def base_paragraphs() -> list[str]:
    """Distinct paragraphs of >= 10 words from the .py files of the standard library, then of site-packages
    (~385k + ~880k here, ~550 MB)."""
    out: dict[str, None] = {}
    for key in ("stdlib", "purelib"):
        for path in sorted(Path(sysconfig.get_paths()[key]).rglob("*.py")):
            if key == "purelib" or "site-packages" not in path.parts:
                try:
                    text = path.read_text("utf-8", "replace")
                except OSError:
                    continue
                for p in PARAGRAPH.split(text):
                    if len(p.split()) >= 10:
                        out[p.strip()] = None
    return list(out)


def documents(n: int, base: list[str], seed: int = 0) -> list[str]:
    """n documents: 80% originals (distinct paragraphs in random order: the shape of bench dedup's corpus),
    then 10% exact and 10% near copies of them."""
    rng = random.Random(seed)
    n_orig = int(n * 0.8)
    if n_orig > len(base):
        raise ValueError(f"{n:,} documents need {n_orig:,} distinct paragraphs; this environment has {len(base):,}")
    docs = [base[i] for i in rng.sample(range(len(base)), n_orig)]
    for i in range(n - n_orig):
        words = docs[rng.randrange(n_orig)].split(" ")
        if i % 2:
            for _ in range(max(1, len(words) // 60)):
                words[rng.randrange(len(words))] = rng.choice(FILLER)
        docs.append(" ".join(words))
    return docs


def write_table(path: Path, docs: list[str]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipelines.data.normalize import exact_key

    pq.write_table(pa.table({"idx": list(range(len(docs))), "text": docs, "norm_hash": [exact_key(d) for d in docs]}), path)


def write_files(root: Path, docs: list[str], per_file: int = 1) -> int:
    """Files of `per_file` documents each (joined by blank lines), 1,000 to a directory; returns the bytes."""
    docs = ["\n\n".join(docs[i:i + per_file]) for i in range(0, len(docs), per_file)]
    for i, text in enumerate(docs):
        if i % 1000 == 0:
            (root / f"d{i // 1000:04d}").mkdir(parents=True, exist_ok=True)
        (root / f"d{i // 1000:04d}" / f"f{i:07d}.txt").write_text(text)
    return sum(len(d.encode()) for d in docs)


def child(task: str, **kw) -> dict:
    """Run one measurement in a fresh process; its JSON line back, with peak RSS of it and its workers."""
    cmd = [sys.executable, "-m", "bench.data_scale", "--child", json.dumps({"task": task, **kw})]
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if done.returncode:
        raise RuntimeError(f"{task} {kw} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def measure(spec: dict) -> dict:
    """In the child: do the task, time its own part, report peak RSS."""
    import threading

    import duckdb
    import psutil

    from pipelines.config import FlowConfig, load_config
    from pipelines.data.neardup import NearDupConfig
    from pipelines.data.neardup_partitioned import find_near_duplicates_partitioned
    from pipelines.data.task_pool import task_pool
    from pipelines.stages import dedup, ingest
    from pipelines.workspace import Workspace

    task, workers, out = spec["task"], spec["workers"], {}
    me, peak, running = psutil.Process(), {"own": 0, "workers": 0}, [True]

    def sample() -> None:  # ru_maxrss would not do: a child's high-water mark starts at its forking parent's RSS
        while running[0]:
            peak["own"] = max(peak["own"], me.memory_info().rss)
            try:
                peak["workers"] = max(peak["workers"], sum(c.memory_info().rss for c in me.children(recursive=True)))
            except psutil.Error:  # a worker exited between listing and reading
                pass
            time.sleep(0.02)

    threading.Thread(target=sample, daemon=True).start()

    def cpu_s() -> float:  # this process and its finished worker processes
        own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
        return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime
    if task in ("near", "exact"):
        con = duckdb.connect()
        con.execute(f"SET threads = {workers}")
        con.execute("CREATE TABLE docs AS SELECT * FROM read_parquet(?)", [spec["table"]])
        n = con.execute("SELECT count(*) FROM docs").fetchall()[0][0]
        t, cpu = time.perf_counter(), cpu_s()
        if task == "near":
            with task_pool(FlowConfig(data_workers=workers)) as pool:
                r = find_near_duplicates_partitioned(con, "SELECT idx, text FROM docs", n, NearDupConfig(), pool,
                                                     Path(spec["work"]))
            out["dropped"], out["candidates"] = int(len(r.dropped)), r.candidates
        else:
            con.execute("""CREATE TABLE exact AS SELECT idx, first_value(idx) OVER w AS first, row_number() OVER w AS rank
                           FROM docs WINDOW w AS (PARTITION BY norm_hash ORDER BY idx)""")
            out["dropped"] = con.execute("SELECT count(*) FROM exact WHERE rank > 1").fetchall()[0][0]
        seconds = time.perf_counter() - t
    else:
        cfg = load_config("tiny", [f"workspace={spec['workspace']}", f"ingest.sources={spec['sources']}",
                                   *([f"flow.data_workers={workers}"] if workers else [])])
        ws = Workspace(cfg.workspace)
        t, cpu = time.perf_counter(), cpu_s()
        ing = ingest.run(cfg, ws, force=task == "ingest")
        if task == "stage":  # ingest was done beforehand: this times the dedup stage alone
            t, cpu = time.perf_counter(), cpu_s()
            result = dedup.run(cfg, ws, ing, force=True)
            out["dropped"], n = result.metrics["dropped"], result.metrics["read"]
            out.update({k: result.metrics[k] for k in ("quality_s", "exact_s", "near_s")})
        else:
            n, out["mb"], out["partitions"] = ing.metrics["read"], ing.metrics["bytes"] / 1e6, ing.metrics["partitions"]
        seconds = time.perf_counter() - t
    for proc in multiprocessing.active_children():  # a local pool does not wait for its workers to exit: reap them,
        proc.join()                                 # or RUSAGE_CHILDREN would leave their CPU time out
    cpu = cpu_s() - cpu
    running[0] = False
    return {**out, "docs": n, "seconds": round(seconds, 3), "docs_per_s": round(n / seconds), "cpu_s": round(cpu, 2),
            "docs_per_cpu_s": round(n / max(cpu, 1e-9)), "peak_rss_mb": round(peak["own"] / 2**20),
            "workers_peak_rss_mb": round(peak["workers"] / 2**20)}


def run(argv: list[str]) -> dict:
    p = argparse.ArgumentParser(prog="python -m bench data_scale")
    p.add_argument("--sizes", default="10000,100000,1000000", help="near-dup / exact corpus sizes (documents)")
    p.add_argument("--files", type=int, default=100_000, help="small files for the ingest measurement")
    p.add_argument("--stage-docs", default="100000,1000000", help="corpus sizes of the dedup-stage measurement")
    p.add_argument("--workers", default="1,2")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(measure(json.loads(args.child))))
        return {}
    sizes, workers = [int(s) for s in args.sizes.split(",")], [int(w) for w in args.workers.split(",")]
    tmp = Path(tempfile.mkdtemp(prefix="bench-data-scale-"))
    started = time.perf_counter()
    try:
        base = base_paragraphs()
        near, exact, stage, ingest_runs = {}, {}, {}, {}
        for n in sizes:
            table = tmp / f"docs-{n}.parquet"
            write_table(table, documents(n, base))  # the list is freed before the children start
            for w in workers:  # alternated per size, so load on the shared cores falls on both alike
                near[f"{n}/{w}"] = child("near", table=str(table), workers=w, work=str(tmp / f"work-{n}-{w}"))
                exact[f"{n}/{w}"] = child("exact", table=str(table), workers=w)
            table.unlink()
        stage_sizes = [int(s) for s in args.stage_docs.split(",")]
        for n in stage_sizes:
            stage_table = tmp / "stage.parquet"
            write_table(stage_table, documents(n, base, seed=1))
            sources = f"[{{kind: parquet, path: {stage_table}, doc_chars: 0}}]"
            child("ingest", workspace=str(tmp / "stage-ws"), sources=sources, workers=1)
            for w in workers:
                stage[f"{n}/{w}"] = child("stage", workspace=str(tmp / "stage-ws"), sources=sources, workers=w)
            shutil.rmtree(tmp / "stage-ws", ignore_errors=True)
            stage_table.unlink()
        for n_files, per_file in sorted({(min(10_000, args.files), 1), (args.files, 1), (2_000, 100), (4_000, 64)}):
            files, name = tmp / f"files-{n_files}-{per_file}", f"{n_files}{'x' + str(per_file) if per_file > 1 else ''}"
            mb = write_files(files, documents(n_files * per_file, base, seed=2), per_file) / 1e6
            sources = f"[{{kind: text_dir, path: {files}, doc_chars: 4000}}]"
            for w in workers if n_files == args.files or per_file > 1 else workers[:1]:
                r = child("ingest", workspace=str(tmp / f"ingest-ws-{name}-{w}"), sources=sources, workers=w)
                r.update(files=n_files, mb=round(mb, 1), files_per_s=round(n_files / r["seconds"]), mb_per_s=round(mb / r["seconds"], 1))
                ingest_runs[f"{name}/{w}"] = r
                shutil.rmtree(tmp / f"ingest-ws-{name}-{w}", ignore_errors=True)
            shutil.rmtree(files, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    top, (w1, w2) = sizes[-1], (workers[0], workers[-1])
    same = all(near[f"{n}/{w}"]["dropped"] == near[f"{n}/{w1}"]["dropped"] for n in sizes for w in workers)
    return {
        "benchmark": "data_scale",
        "ratio": round(near[f"{top}/{w2}"]["docs_per_s"] / near[f"{top}/{w1}"]["docs_per_s"], 2),
        "ratio_means": f"near-dup docs/s with {w2} worker processes / with {w1}, at {top:,} documents",
        "near": near, "exact": exact, "dedup_stage": stage, "ingest": ingest_runs,
        "dedup_stage_ratio": round(stage[f"{stage_sizes[-1]}/{w2}"]["docs_per_s"] / stage[f"{stage_sizes[-1]}/{w1}"]["docs_per_s"], 2),
        "dedup_stage_ratio_means": f"dedup stage docs/s with {w2} workers / with {w1}, at {stage_sizes[-1]:,} documents",
        "dedup_stage_ratio_by_size": {str(n): round(stage[f"{n}/{w2}"]["docs_per_s"] / stage[f"{n}/{w1}"]["docs_per_s"], 2)
                                      for n in stage_sizes},
        "same_result_every_worker_count": same,
        "total_s": round(time.perf_counter() - started),
        "notes": "keys are documents/workers (ingest: files/workers, 2000x100: 2,000 files of 100 paragraphs); "
                 "ingest 4000x64 (4,000 files of ~24 KB, added for issue 19) is where 2,000 files/s and 50 MB/s are the "
                 "same rate: the small-file rows (~365 B per file) are bounded by per-file cost, so their MB/s says "
                 "little, and the large-file rows by per-byte cost; "
                 "peak_rss_mb is the measuring process's (for near/exact it holds the corpus in DuckDB), "
                 "workers_peak_rss_mb the largest sum over its worker processes; "
                 "cpu_s is the CPU time of the measuring process and its worker processes (docs_per_cpu_s: the "
                 "per-core cost, whatever else runs); the machine's 2 cores are shared with other work "
                 "(see provenance.load_average), which caps what a second worker can add",
    }


if __name__ == "__main__":  # the measuring child processes
    run(sys.argv[1:])
