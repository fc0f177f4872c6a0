"""What the README says about each benchmark result, in words: `ROWS[name](result) -> (result cell, ratio
cell)`, `MISSED[name](result) -> [lines]` for the "Targets missed" list, and `demo_block` for the demo's
figures. bench/readme.py writes them into README.md; nothing there is typed by hand.

Kept apart from the benchmark modules on purpose: a module's own file is part of the sources its result
is stamped with (bench/provenance.py), so rewording a row there would make a measured number stale.
Every ratio cell names its baseline in words; a missed target is said in the cell that misses it.
To add a benchmark, add its function to ROWS (and MISSED if it has targets).
"""

from __future__ import annotations

from collections.abc import Callable

# commands for results recorded before `python -m bench` wrote the command into the JSON
COMMANDS = {"train_step": "OMP_NUM_THREADS=1 python -m bench train_step --repeats 5"}


def _n(x: float | None, digits: int = 0) -> str:
    """A number for prose: thousands separated, `digits` decimals; '?' when missing."""
    return "?" if x is None else f"{x:,.{digits}f}"


def _k(x: float | None) -> str:
    """1234 -> 1.23k, 1234567 -> 1.23M."""
    if x is None:
        return "?"
    for div, unit in ((1e6, "M"), (1e3, "k")):
        if abs(x) >= div:
            return f"{x / div:.3g}{unit}"
    return f"{x:.3g}"


def _span(pair: list | None, fmt: Callable = _k) -> str:
    return f"{fmt(pair[0])}–{fmt(pair[1])}" if pair else "?"


def _met(ok: bool) -> str:
    return "met" if ok else "**missed**"


# --- one function per benchmark --------------------------------------------------------------------------


def pipeline_row(r: dict) -> tuple[str, str]:
    text = (f"`{r.get('config')}` config through `lmforge run`: cold {_n(r.get('cold_run_s'), 1)} s vs immediate rerun "
            f"{_n(r.get('rerun_s'), 1)} s (every task cached); peak RSS {_n(r.get('peak_rss_mb'))} MB")
    if r.get("val_bpb") is not None:
        text += f"; val bpb {r['val_bpb']:.3f} trained vs {r.get('untrained_val_bpb', 0):.3f} untrained"
    return text + "; per-stage seconds and the record accounting in the JSON", f"{r['ratio']}× (rerun / cold run)"


def train_step_row(r: dict) -> tuple[str, str]:
    z = r["ratios"]
    plain = r["variants"]["plain_fp32"]["cpu_samples"]
    amp = r.get("ratios_bf16_vs_autocast_loop", {})
    text = ("the engine (spike gate on, no host read per ordinary step) vs a plain PyTorch loop with the same fused AdamW "
            "and the same numerics (bf16: bf16 weights, fp32 masters), tokens per CPU-second, median of "
            f"{r['repeats']} repeats: ZeRO 0/1/2 fp32 {z['z0_fp32']} / {z['z1_fp32']} / {z['z2_fp32']}, bf16 "
            f"{z['z0_bf16']} / {z['z1_bf16']} / {z['z2_bf16']} (the plain fp32 loop's own repeats spread "
            f"{_k(min(plain))}–{_k(max(plain))})")
    if amp:
        text += (f"; bf16 vs PyTorch's AMP loop (fp32 weights + autocast) {amp.get('z0_bf16')} / {amp.get('z1_bf16')} / "
                 f"{amp.get('z2_bf16')}")
    return text, (f"{r['ratio']}× the plain PyTorch loop (median of the six; target ≥ 0.95: {_met(r['ratio'] >= 0.95)}; "
                  f"lowest {r['ratio_min']})")


def zero_memory_row(r: dict) -> tuple[str, str]:
    parts = []
    for ranks, stages in r["stages_by_ranks"].items():
        cells = [f"ZeRO-{name[-1]} {_n(s['peak_tensor_mb'])} (paper "
                 + (f"{s['paper_bytes_per_param']:g} B/param → " if "paper_bytes_per_param" in s else "")
                 + f"{_n(s['expected_state_mb'])})" for name, s in stages.items()]
        rss = [max(s["peak_rss_mb_per_rank"]) for s in stages.values()]
        parts.append(f"{ranks} ranks: " + ", ".join(cells) + " MB; whole-run peak RSS of the largest rank, ZeRO 0/1/2/3: "
                     + " / ".join(_n(x) for x in rss) + " MB")
    text = (f"{r.get('precision')}, {_n(r['params'] / 1e6, 1)}M params, micro batch 1 × 64 tokens; peak tensor memory per "
            "rank during steps (profiler-counted allocations, like `max_memory_allocated`) next to the ZeRO paper's "
            "model-state bytes/param × params / ranks: " + "; ".join(parts))
    ranks, first = next(iter(r["stages_by_ranks"].items()))
    z3 = first["zero3"]
    over = z3["peak_tensor_mb"] / z3["expected_state_mb"]
    ratio = (f"{over:.2f}× the ZeRO paper's model-state MB (ZeRO-3, {ranks} ranks); {z3['peak_vs_zero0']}× ZeRO-0's "
             f"measured peak (paper {z3['expected_vs_zero0']}×)")
    return text, ratio


def generate_row(r: dict) -> tuple[str, str]:
    cases = r["cases"]
    long, short = max(cases, key=int), min(cases, key=int)
    c = cases[long]
    spread = ""
    if "kv_cache_tokens_per_s_min_max" in c:
        spread = (f" (min–max over {r.get('repeats', '?')} repeats {_span(c['kv_cache_tokens_per_s_min_max'], _n)} vs "
                  f"{_span(c['recompute_tokens_per_s_min_max'], lambda x: _n(x, 1))})")
    text = (f"1 thread, {r['model']['n_layer']}×{r['model']['n_embd']} model, through the generation engine, tokens/s median: "
            f"KV cache vs recompute at {long} new tokens {_n(c['kv_cache_tokens_per_s'])} vs "
            f"{_n(c['recompute_tokens_per_s'], 1)}{spread} ({cases[short]['speedup']}× at {short})")
    b = r.get("batched", {})
    if b:
        text += f"; {b['prompts']} prompts of different lengths batched vs one by one {b['speedup']}×"
        if "batched_tokens_per_s_min_max" in b:
            text += (f" ({_n(b['batched_tokens_per_s'])} tok/s, {_span(b['batched_tokens_per_s_min_max'], _n)}, vs "
                     f"{_n(b['one_by_one_tokens_per_s'])}, {_span(b['one_by_one_tokens_per_s_min_max'], _n)})")
    hf = r.get("transformers", {})
    lengths = [k for k in hf if k.isdigit()]
    if lengths:
        same = all(hf[k].get("identical_tokens") for k in lengths)
        text += ("; vs `transformers` generate on the HF export " + " / ".join(f"{hf[k]['ratio']}× ({k})" for k in lengths)
                 + (", identical tokens" if same else ", tokens differ"))
    ok = r["ratio"] >= 5
    return text, f"{r['ratio']}× recompute-every-step (no KV cache), {long} new tokens (target ≥ 5×: {_met(ok)})"


def generate_cuda_row(r: dict) -> tuple[str, str]:
    rows = r.get("rows", {})
    text = (f"{r.get('environment', {}).get('device', 'GPU')}: " + ", ".join(f"{k} {_n(v.get('tokens_per_s'))} tok/s"
                                                                          for k, v in rows.items()))
    ratios = r.get("ratios", {})
    return text, (f"{r.get('ratio')}× transformers generate at batch 1 (target ≥ 1.5×); batch 32 vs 1 "
                  f"{ratios.get('b32_vs_b1')}× (target ≥ 10×)")


def serve_row(r: dict) -> tuple[str, str]:
    parts = []
    for n, c in r["clients"].items():
        part = (f"{n} client{'s' if n != '1' else ''} {_n(c['tokens_per_s'])} ({_span(c['tokens_per_s_min_max'], _n)}), "
                f"p50 {_n(c['p50_latency_ms'])} ms")
        if n == "8":
            part += f", p95 {_n(c['p95_latency_ms'])} ms"
        parts.append(part)
    ratios, met = r["ratios"], r["met"]
    text = (f"`lmforge serve` (continuous batching, {r['engine']['slots']} slots, 1 torch thread), {r['max_tokens']} new "
            f"tokens per request, {r['requests_per_client']} requests per client, {r['repeats']} repeats, tokens/s median "
            f"(min–max): " + "; ".join(parts) + f". 8 vs 1 client: throughput {ratios['throughput_8_vs_1']}× (target ≥ 4×: "
            f"{_met(met['throughput_8_vs_1'])}), p50 latency {ratios['p50_latency_8_vs_1']}× (target ≤ 2×: "
            f"{_met(met['p50_latency_8_vs_1'])})")
    if per_repeat := ratios.get("throughput_8_vs_1_per_repeat"):
        runs = per_repeat["runs"]
        text += (f"; the throughput ratio within each repeat: median {per_repeat['median']}× "
                 f"({_span([min(runs), max(runs)], str)})")
    return text, f"{r['ratio']}× one client's tokens/s (8 clients; target ≥ 4×: {_met(met['throughput_8_vs_1'])})"


def tokenize_row(r: dict) -> tuple[str, str]:
    mb, mm = r["mb_per_s"], r.get("mb_per_s_min_max", {})
    n = r["threads"]

    def cell(name: str) -> str:
        return f"{mb[name]:.2f} MB/s ({_span(mm.get(name), lambda x: f'{x:.2f}')})"

    text = (f"shard-stage encode (SentencePiece into Arrow shards, written and hashed) vs raw SentencePiece "
            f"`encode(texts, num_threads={n})` on the same {r['text']['mb']:.1f} MB of stdlib source (vocab "
            f"{r['tokenizer']['vocab_size']}), median (min–max) of {r['repeats']}: {n} threads {cell('shard_stage')} vs "
            f"{cell('raw_encode')}; 1 thread each {cell('shard_stage_1_thread')} vs {cell('raw_encode_1_thread')} "
            f"({r['ratio_1_thread']}×)")
    return text, f"{r['ratio']}× raw SentencePiece at equal threads ({n}; target ≥ 1.0×: {_met(r['ratio'] >= 1.0)})"


def loader_row(r: dict) -> tuple[str, str]:
    parts = []
    for key, b in r["by_block_size"].items():
        s = b["samples_per_s"]
        parts.append(f"T={key.rsplit('_', 1)[1]}: TokenLoader {_k(s['token_loader'])} samples/s vs preallocated views "
                     f"{_k(s['memmap_prealloc_rows'])} ({b['ratio']}×) vs np.stack {_k(s['memmap_random_windows'])} "
                     f"({b['ratio_vs_np_stack']}×)")
    text = (f"B={r['batch_size']}, {r['data']['shards']} shards of ≤ {_k(r.get('tokens_per_shard'))} tokens, 1 thread, "
            f"median of {r['repeats']}: " + "; ".join(parts))
    ok = all(b["ratio"] >= 1.0 for b in r["by_block_size"].values())
    return text, (f"{r['ratio']}× a preallocated array filled from memmap views ({r['ratio_is_for']}; target ≥ 1.0×: "
                  f"{_met(ok)})")


def quantize_row(r: dict) -> tuple[str, str]:
    v, c = r["variants"], r["vs_fp32"]
    spread = {d: v[d].get("decode_tokens_per_s_min_max") for d in v}
    text = (f"{r.get('model_source', 'export')} ({_n(r['model']['params'] / 1e6, 1)}M params, val bpb "
            f"{v['fp32']['val_bpb']:.3f}), 1 thread, batch-1 greedy decode tokens/s, median (min–max) of "
            f"{r['repeats']}: fp32 {_n(v['fp32']['decode_tokens_per_s'])} ({_span(spread['fp32'], _n)}), bf16 "
            f"{_n(v['bf16']['decode_tokens_per_s'])} ({_span(spread['bf16'], _n)}), int8 {_n(v['int8']['decode_tokens_per_s'])} "
            f"({_span(spread['int8'], _n)}); val bpb change bf16 {c['bf16']['bpb_change_pct']:+.3f} %, int8 "
            f"{c['int8']['bpb_change_pct']:+.3f} % (target ≤ 2 %: {_met(c['int8']['bpb_change_pct'] <= 2)}); side note, "
            f"weights fp32 {v['fp32']['weight_mb']:.1f} MB / bf16 {v['bf16']['weight_mb']:.1f} / int8 {v['int8']['weight_mb']:.1f}")
    return text, f"{r['ratio']}× fp32 decode tokens/s (int8 weights; bf16 {c['bf16']['decode_speedup']}×)"


def stability_row(r: dict) -> tuple[str, str]:
    h = r["healthy"]
    faults = r["faults"]
    caught = sum(1 for f in faults.values() if f.get("detected"))
    healthy = ", ".join(f"{k} {v['current']['steps']} steps" for k, v in h.items())
    text = (f"the spike gate on healthy runs ({healthy}) and "
            f"on injected faults ({', '.join(faults)} at step 50 of a tiny run): {r['false_positives']['current']} vetoed "
            f"steps on healthy runs now vs {r['false_positives']['previous']} with the previous defaults; {caught} of "
            f"{len(faults)} faults caught")
    return text, (f"{r['ratio']}× the previous defaults' false positives ({r['false_positives']['current']} vs "
                  f"{r['false_positives']['previous']})")


def dedup_row(r: dict) -> tuple[str, str]:
    p, ours, ds = r["planted"], r["lmforge"], r["datasketch"]
    prm = r["params"]

    def quality(x: dict) -> str:
        return (f"recall exact {x['exact_recall']:.3f}, near {x['near_recall']:.3f} ({x['near_recall_above_threshold']:.3f} "
                f"of those ≥ {prm['threshold']}), hard negatives merged {x['negatives_merged']}/{p['hard_negative_pairs']}, "
                f"precision on planted pairs {x['precision_on_planted']:.4f}")

    text = (f"{r['docs']:,} real paragraphs with planted {p['exact_pairs']:,} exact copies, {p['near_pairs']:,} near copies "
            f"(random edits, not filtered by any detector; true Jaccard p5/p50 {p['near_jaccard_p5_p50_p95'][0]}/"
            f"{p['near_jaccard_p5_p50_p95'][1]}) and {p['hard_negative_pairs']:,} hard negatives (Jaccard 0.6–0.8); both "
            f"with {prm['bands']}×{prm['rows']} bands, {prm['num_perm']} permutations, word {prm.get('ngram', 5)}-gram shingles, "
            f"exact-Jaccard verification at {prm['threshold']}, median (min–max) of {r['repeats']} runs: lmforge "
            f"{_k(ours['docs_per_s'])} docs/s ({_span(ours['docs_per_s_min_max'])}, peak RSS {_n(ours['peak_rss_mb'])} MB), "
            f"{quality(ours)}; datasketch {_k(ds['docs_per_s'])} docs/s ({_span(ds['docs_per_s_min_max'])}, peak RSS "
            f"{_n(ds['peak_rss_mb'])} MB), {quality(ds)}; exact dedup {_k(r['exact']['docs_per_s'])} docs/s")
    for key in (k for k in r if k.startswith("ngram_")):  # side rows: the same measurement at another shingle width
        side = r[key]
        text += (f"; with {side['params']['ngram']}-word shingles (same near copies, true Jaccard p5/p50 "
                 f"{side['planted']['near_jaccard_p5_p50_p95'][0]}/{side['planted']['near_jaccard_p5_p50_p95'][1]}): "
                 f"lmforge {_k(side['lmforge']['docs_per_s'])} docs/s, {side['ratio']}× datasketch, near recall "
                 f"{side['lmforge']['near_recall']:.3f}, precision {side['lmforge']['precision_on_planted']:.4f}")
    return text, (f"{r['ratio']}× datasketch MinHashLSH with the same bands×rows + verification, docs/s "
                  f"(target ≥ 3×: {_met(r['ratio'] >= 3)})")


def data_scale_row(r: dict) -> tuple[str, str]:
    near, ing = r["near"], r["ingest"]
    top = max(int(k.split("/")[0]) for k in near)
    one, two = near[f"{top}/1"], near[f"{top}/2"]
    small = ing[f"{max(int(k.split('/')[0]) for k in ing if 'x' not in k)}/1"]
    large, best_large = ing["2000x100/1"], max((v for k, v in ing.items() if k.startswith("2000x100/")), key=lambda v: v["mb_per_s"])
    same = "identical results" if r.get("same_result_every_worker_count") else "**different results**"
    text = (f"synthetic corpora of real paragraphs (~40 words) with planted copies, 1 vs 2 worker processes ({same} at both); "
            f"near-dup at {top:,} docs {two['docs_per_s']:,} vs {one['docs_per_s']:,} docs/s ({one['docs_per_cpu_s']:,} per "
            f"CPU-second, target ≥ 24k: {_met(one['docs_per_cpu_s'] >= 24_000)}; peak RSS {one['peak_rss_mb']:,} MB); the whole "
            f"dedup stage on 2 workers vs 1 {_stage_ratios(r)} (target ≥ 1.6×: {_met(r['dedup_stage_ratio'] >= 1.6)}); "
            f"ingest of {small['files']:,} small files {small['files_per_s']:,} files/s (target ≥ 2,000: "
            f"{_met(small['files_per_s'] >= 2000)}), {small['mb_per_s']} MB/s, {large['mb']:.0f} MB in larger files "
            f"{large['mb_per_s']} MB/s on 1 worker, {best_large['mb_per_s']} MB/s at best "
            f"(target ≥ 50 MB/s: {_met(max(small['mb_per_s'], best_large['mb_per_s']) >= 50)}), "
            f"{_both_targets(ing)}peak RSS "
            f"{small['peak_rss_mb']:,} MB; exact dedup {r['exact'][f'{top}/1']['docs_per_s']:,} docs/s")
    return text, f"{r['ratio']}× one worker's near-dup docs/s ({top:,} docs, 2 workers; target ≥ 1.6×: {_met(r['ratio'] >= 1.6)})"


def ci_row(r: dict) -> tuple[str, str]:
    counts = r.get("counts", {})
    minutes = f"{int(r['test_command_s'] // 60)} min {r['test_command_s'] % 60:.0f} s"
    slow = ", ".join(f"{t['test'].split('::')[-1]} {t['seconds']:.0f} s" for t in r.get("slowest", [])[:3])
    text = (f"`bash .ci/run` (ruff + pytest) on a fresh clone of {r['clone_commit'][:7]} after `make install` "
            f"({_n(r['install_s'])} s, pip cache warm): {counts.get('passed', 0)} passed, {counts.get('skipped', 0)} skipped, "
            f"{counts.get('failed', 0)} failed; test command {minutes} (pytest's own {_n(r['pytest_s'])} s); slowest: {slow}")
    return text, f"{r['ratio']}× the 15-minute budget for the test command (target < 1×: {_met(r['ratio'] < 1)})"


def _stage_ratios(r: dict) -> str:
    """The dedup stage's 2-vs-1-worker ratio at each corpus size measured, largest first."""
    by_size = sorted(r["dedup_stage_ratio_by_size"].items(), key=lambda kv: -int(kv[0]))
    return ", ".join(f"{ratio}× at {int(n):,} docs" for n, ratio in by_size)


def _both_targets(ing: dict) -> str:
    """The ingest row of ~24 KB files (where 2,000 files/s = 50 MB/s), on its best worker count; "" before it existed."""
    runs = [v for k, v in ing.items() if k.startswith("4000x64/")]
    if not runs:
        return ""
    best = max(runs, key=lambda v: v["mb_per_s"])
    met = best["files_per_s"] >= 2000 and best["mb_per_s"] >= 50
    return (f"{best['files']:,} files of ~{best['mb'] * 1e6 / best['files'] / 1e3:.0f} KB {best['files_per_s']:,} files/s = "
            f"{best['mb_per_s']} MB/s (both targets at once: {_met(met)}), ")


ROWS: dict[str, Callable[[dict], tuple[str, str]]] = {
    "pipeline": pipeline_row, "train_step": train_step_row, "zero_memory": zero_memory_row, "generate": generate_row,
    "generate_cuda": generate_cuda_row, "serve": serve_row, "tokenize": tokenize_row, "loader": loader_row,
    "quantize": quantize_row, "stability": stability_row, "dedup": dedup_row, "data_scale": data_scale_row,
    "ci": ci_row,
}


# --- missed targets ----------------------------------------------------------------------------------------


def _train_step_missed(r: dict) -> list[str]:
    low = {k: v for k, v in r["ratios"].items() if v < 0.95}
    if not low:
        return []
    return [f"the median over ZeRO 0/1/2 × fp32/bf16 is {r['ratio']}× the same-numerics plain loop (target ≥ 0.95: "
            f"{_met(r['ratio'] >= 0.95)}), but " + ", ".join(f"{k} is {v}×" for k, v in low.items())
            + " in this run; the plain loop's own repeats spread "
            f"{_k(min(r['variants']['plain_fp32']['cpu_samples']))}–{_k(max(r['variants']['plain_fp32']['cpu_samples']))} "
            "tokens/CPU-s on this shared machine."]


def _zero_memory_missed(r: dict) -> list[str]:
    out = []
    for ranks, stages in r["stages_by_ranks"].items():
        over = [f"ZeRO-{name[-1]} {_n(s['peak_tensor_mb'])} MB vs {_n(s['expected_state_mb'])}" for name, s in stages.items()
                if s["peak_tensor_mb"] > s["expected_state_mb"]]
        if over:
            out.append(f"at {ranks} ranks the measured peak tensor memory per rank is above the paper's model-state bytes: "
                       + ", ".join(over) + " (activations, buckets, gathered layers and allocator slack come on top)")
        rss = {name: max(s["peak_rss_mb_per_rank"]) for name, s in stages.items()}
        if "zero3" in rss and "zero0" in rss and rss["zero3"] > rss["zero0"]:
            out.append(f"at {ranks} ranks the whole-run peak RSS per rank is higher under ZeRO-3 ({_n(rss['zero3'])} MB) than "
                       f"ZeRO-0 ({_n(rss['zero0'])} MB)")
    return out


def _serve_missed(r: dict) -> list[str]:
    c = r["clients"]["1"]["tokens_per_s_min_max"]
    out = []
    if not r["met"]["throughput_8_vs_1"]:
        out.append(f"8 concurrent clients get {r['ratios']['throughput_8_vs_1']}× one client's tokens/s (target ≥ 4×); the "
                   f"one-client baseline itself ranged {_n(c[0])}–{_n(c[1])} tokens/s over {r['repeats']} repeats.")
    if not r["met"]["p50_latency_8_vs_1"]:
        out.append(f"p50 latency at 8 clients is {r['ratios']['p50_latency_8_vs_1']}× one client's (target ≤ 2×).")
    return out


def _ratio_missed(target: float, what: str) -> Callable[[dict], list[str]]:
    def missed(r: dict) -> list[str]:
        return [] if r.get("ratio") is not None and r["ratio"] >= target else [f"{r.get('ratio')}× {what} (target ≥ {target}×)."]
    return missed


def _loader_missed(r: dict) -> list[str]:
    low = {k: b["ratio"] for k, b in r["by_block_size"].items() if b["ratio"] < 1.0}
    return ["TokenLoader vs the preallocated-views baseline: " + ", ".join(f"{k.replace('block_size_', 'T=')} {v}×"
                                                                           for k, v in low.items()) + " (target ≥ 1.0×)."] if low else []


def _quantize_missed(r: dict) -> list[str]:
    c, _ = r["vs_fp32"]["int8"], r["repeats"]  # (a result from before decode speed was the headline has no repeats)
    out = []
    if c["bpb_change_pct"] > 2:
        out.append(f"int8 changes val bpb by {c['bpb_change_pct']:+.2f} % (target ≤ 2 %).")
    if r["ratio"] < 1:
        out.append(f"int8 decodes at {r['ratio']}× fp32's tokens/s.")
    return out


def _dedup_missed(r: dict) -> list[str]:
    out = [] if r["ratio"] >= 3 else [f"near-dup dedup is {r['ratio']}× the tuned datasketch's docs/s (target ≥ 3×)."]
    x = r["lmforge"]
    if x["near_recall"] < 0.95:
        out.append(f"lmforge's recall on all planted near copies is {x['near_recall']:.3f} (target ≥ 0.95); on those with true "
                   f"Jaccard ≥ {r['params']['threshold']} it is {x['near_recall_above_threshold']:.3f} — the rest are below the "
                   "threshold it is configured with, and the tuned datasketch misses them alike.")
    if x["precision_on_planted"] < 0.99:
        out.append(f"lmforge's precision on planted pairs is {x['precision_on_planted']:.4f} (target ≥ 0.99).")
    return out


def _data_scale_missed(r: dict) -> list[str]:
    """Issue 19's targets: ingest of 100k small files >= 2,000 files/s and >= 50 MB/s; near-dup >= 24k docs per
    CPU-second at 1M documents; the dedup stage on 2 workers >= 1.6x one worker."""
    out = []
    near = r["near"]
    top = max(int(k.split("/")[0]) for k in near)
    per_core = near[f"{top}/1"]["docs_per_cpu_s"]
    if per_core < 24_000:
        out.append(f"near-dup at {top:,} documents does {per_core:,} docs per CPU-second on one worker (target ≥ 24k per core; "
                   "no super-linear blow-up from 100k to 1M: met).")
    if r["dedup_stage_ratio"] < 1.6:
        two = near[f"{top}/2"]["docs_per_s"] / near[f"{top}/1"]["docs_per_s"]
        out.append(f"the whole dedup stage on 2 workers vs 1: {_stage_ratios(r)} (target ≥ 1.6×); near-dup alone is "
                   f"{two:.2f}×, but export, exact dedup, union-find and the verdict writes stay in the flow's process.")
    ing = r["ingest"]
    small = ing[f"{max(int(k.split('/')[0]) for k in ing if 'x' not in k)}/1"]
    best_mb = max(v["mb_per_s"] for v in ing.values())
    if small["files_per_s"] < 2000 or best_mb < 50:
        out.append(f"ingest: {small['files']:,} small files at {small['files_per_s']:,} files/s (target ≥ 2,000: "
                   f"{'met' if small['files_per_s'] >= 2000 else 'missed'}) but {small['mb_per_s']} MB/s, and at most {best_mb} MB/s "
                   "on larger files (target ≥ 50 MB/s): splitting, keys and Arrow building are Python, and DuckDB's "
                   "write of the catalog (compressing the text) runs in the flow's one process.")
    return out


MISSED: dict[str, Callable[[dict], list[str]]] = {
    "train_step": _train_step_missed, "zero_memory": _zero_memory_missed, "serve": _serve_missed,
    "tokenize": _ratio_missed(1.0, "raw SentencePiece at equal threads: the shard stage"),
    "loader": _loader_missed, "quantize": _quantize_missed, "dedup": _dedup_missed, "data_scale": _data_scale_missed,
    "ci": lambda r: [] if r["ratio"] < 1 else [f"the test command took {r['test_command_s']:.0f} s on a fresh clone, "
                                                 f"{r['ratio']}× the 15-minute budget."],
}


def data_scale_projection(r: dict) -> str:
    """The measured per-document costs of the data stages and what they project for 1 billion documents."""
    near, ing = r["near"], r["ingest"]
    stage = r["dedup_stage"][f"{max(int(k.split('/')[0]) for k in r['dedup_stage'])}/1"]
    top = max(int(k.split("/")[0]) for k in near)
    mid = max((int(k.split("/")[0]) for k in near if int(k.split("/")[0]) < top), default=top)
    near_us = 1e6 / near[f"{top}/1"]["docs_per_cpu_s"]
    quality_us = 1e6 * stage["quality_s"] / stage["docs"]
    small = ing[f"{max(int(k.split('/')[0]) for k in ing if 'x' not in k)}/1"]
    ingest_us = 1e6 / small["files_per_s"]
    bytes_per_doc = small["mb"] * 1e6 / small["files"]
    large = ing["2000x100/1"]
    exact = r["exact"][f"{top}/1"]["docs_per_s"]
    speedup = near[f"{top}/2"]["docs_per_s"] / near[f"{top}/1"]["docs_per_s"]
    efficiency = min(speedup / 2, 1.0)
    hours = {k: 1e9 * us / 1e6 / 3600 for k, us in (("near", near_us), ("quality", quality_us), ("ingest", ingest_us))}
    cluster_h = sum(hours.values()) / (64 * efficiency)
    pairs = near[f"{top}/1"]["candidates"] / top
    return (
        f"Measured (`python -m bench data_scale`, {r['provenance']['machine']['cores']} shared cores, documents of ~{bytes_per_doc:.0f} "
        f"bytes: paragraphs of Python source and docs): near-dup costs {near_us:.0f} µs of CPU per document at {top:,} documents "
        f"({near[f'{mid}/1']['docs_per_cpu_s']:,} docs per CPU-second at {mid:,}, {near[f'{top}/1']['docs_per_cpu_s']:,} at {top:,}), "
        f"{near[f'{top}/1']['docs_per_s']:,} docs/s on one worker and {near[f'{top}/2']['docs_per_s']:,} on two ({speedup:.2f}×); "
        f"exact grouping {exact / 1e6:.1f}M docs/s; the quality statistics {quality_us:.0f} µs per document; ingest "
        f"{ingest_us:.0f} µs per small file ({small['files_per_s']:,} files/s) and {large['mb_per_s']} MB/s of larger text files "
        f"on one core.\n\n"
        f"**Projection for 1 billion such documents** (extrapolated, not run: cross-machine I/O and the scheduler's "
        f"overhead at ~10^4 tasks are not measured): near-dup ≈ {hours['near']:.0f} core-hours, quality ≈ {hours['quality']:.0f} "
        f"and ingest ≈ {hours['ingest']:.0f} core-hours of worker CPU, so a 64-core cluster needs ≈ {cluster_h:.1f} hours of "
        f"worker time if it scales as 2 workers did here ({efficiency:.0%} efficiency). The serial part in the flow's process is "
        f"the catalog load (1B rows, ≈ {bytes_per_doc * 1e9 / 1e9:.0f} GB of text into DuckDB), the exact grouping (≈ "
        f"{1e9 / exact / 60:.0f} min at the measured rate, more once it spills) and the union-find over ≈ {pairs:.2f} candidate "
        f"pairs per document (≈ {pairs * 16:.0f} GB of pairs and 8 GB of labels at 1B): plan a driver with well over that in "
        f"memory and shared scratch for the exported texts, signatures, shingle sets and band rows. Longer documents cost "
        f"proportionally more per document (the work is per word); at that scale the driver's single-process steps, not the "
        f"workers, are the limit."
    )


# --- the demo --------------------------------------------------------------------------------------------


def demo_block(r: dict) -> str:
    """The demo paragraph and table from bench/results/pipeline.json (`python -m bench pipeline -c default`)."""
    cfg = r.get("config")
    date = r.get("date", "?")
    head = (f"**The demo figures** (`python -m bench pipeline -c {cfg}`, {r.get('machine', {}).get('cpus', '?')} vCPUs, {date}"
            f", commit {str(r.get('provenance', {}).get('commit', '?'))[:9]})")
    note = "" if cfg == "default" else (f" *These come from the `{cfg}` config, not the demo's `default`: `python -m bench "
                                        "pipeline -c default` (about 11 minutes) records the demo's own.*")
    acc, tok, tr = r.get("accounting"), r.get("tokens"), r.get("training")
    if not acc or not tok or not tr:
        return head + "." + note + " The result predates the accounting fields; rerun the benchmark for the full figures."
    dup = (f"{acc['read']:,} records read → {acc['documents']:,} documents ({acc['quarantined']:,} quarantined) → "
           f"{acc['kept']:,} kept ({acc['exact_duplicates']:,} exact duplicates, {acc['near_duplicates']:,} near duplicates, "
           f"{acc['quality_drops']:,} quality drops, {acc['contaminated']:,} contaminating an eval set)")
    m = r.get("model", {})
    text = (f"{head}: {dup}; {tok['train'] / 1e6:.2f}M train / {tok['val'] / 1e6:.2f}M validation tokens; a "
            f"{m.get('n_layer')}-layer, {m.get('n_embd')}-wide model ({tr['params'] / 1e6:.2f}M parameters incl. embeddings) "
            f"trained for {tr['steps']:,} steps, {tr['tokens'] / 1e6:.2f}M tokens, at {_n(tr['tokens_per_s'])} tokens/s "
            f"({tr.get('precision')}, ZeRO-{tr.get('zero_stage')}); the spike gate vetoed {tr['vetoed_steps']} steps "
            f"({tr['rollbacks']} rollbacks).{note}")
    rows = [
        ("`lmforge run` wall time, cold workspace (incl. fetching the corpus and the temporary Prefect server)",
         f"{_n(r['cold_run_s'], 1)} s ({_n(r['cold_run_s'] / 60, 1)} min)"),
        ("validation bits per byte: trained vs untrained",
         f"**{r['val_bpb']:.3f}** vs {r['untrained_val_bpb']:.3f} (perplexity {_n(r.get('val_perplexity'), 1)})"),
        ("immediate rerun, nothing changed (every task cached, no stage work)", f"{_n(r['rerun_s'], 1)} s"),
        ("peak RSS of the run (largest process)", f"{_n(r['peak_rss_mb'])} MB"),
        ("spike-gate vetoed steps (skipped updates) / rollbacks", f"{tr['vetoed_steps']} / {tr['rollbacks']}"),
    ]
    table = "\n".join(["| what | number |", "|---|---|", *(f"| {a} | {b} |" for a, b in rows)])
    return f"{text}\n\n{table}"
