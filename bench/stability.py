"""The spike gate on healthy runs and on injected faults: false positives and detection.

    python -m bench stability [--steps 200] [--fault-steps 80]

Healthy runs (no fault; real corpora through the pipeline's data stages, then lm_core.engine.train):
  tiny     configs/tiny.yaml as it is (stdlib slice, 2x64 model, 30 steps)
  default  configs/default.yaml's data and 4x256 model (Shakespeare + Milton), `--steps` steps
  stdlib   the Python standard library's source with the default model, `--steps` steps
Each runs twice, alternating in one process: with the gate's current defaults, and with the previous
defaults as the baseline (spikes judged during lr warmup, grad-norm floor 1.0 x its level). A vetoed step
on a healthy run is a false positive.

Fault runs: the tiny data and model, `--fault-steps` steps, a checkpoint every 20, one fault each (nan,
corrupt_batch, lr_spike, grad_spike) at step 50; a fault is detected when the gate vetoes or rolls back
within 5 steps of it and the run still finishes.

`ratio` = false positives with the current defaults / with the previous ones, over all healthy runs (target 0:
no vetoed step on a healthy run); `detection_rate` (target 1.0) and `false_positive_rate` beside it.
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
import time
from pathlib import Path

FAULTS = ("nan", "corrupt_batch", "lr_spike", "grad_spike")
FAULT_STEP = 50


def run(argv: list[str]) -> dict:
    p = argparse.ArgumentParser(prog="python -m bench stability")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--fault-steps", type=int, default=80)
    args = p.parse_args(argv)
    from lm_core.stability import StabilityConfig

    current, previous = StabilityConfig(), StabilityConfig(judge_warmup=True, grad_norm_min_jump=1.0)
    healthy: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        data = {name: _data(name, Path(tmp) / name, args.steps) for name in ("tiny", "default", "stdlib")}
        for name, (cfg, shards) in data.items():
            healthy[name] = {label: _train(cfg, shards, Path(tmp) / f"{name}-{label}", stability)
                             for label, stability in (("current", current), ("previous", previous))}
        tiny_cfg, tiny_shards = data["tiny"]
        faults = {}
        for kind in FAULTS:
            cfg = _with(tiny_cfg, max_steps=args.fault_steps, checkpoint_every=20, log_every=5)
            stability = dataclasses.replace(current, inject_fault=f"{kind}@{FAULT_STEP}")
            faults[kind] = _fault_row(_train(cfg, tiny_shards, Path(tmp) / f"fault-{kind}", stability), args.fault_steps)
    fp = {label: sum(h[label]["vetoed_steps"] for h in healthy.values()) for label in ("current", "previous")}
    judged = sum(h["current"]["judged_steps"] for h in healthy.values())
    detected = sum(f["detected"] for f in faults.values())
    return {
        # both 0: no difference (1.0); none before but some now: worse, with no finite ratio (None)
        "ratio": round(fp["current"] / fp["previous"], 4) if fp["previous"] else (1.0 if not fp["current"] else None),
        "false_positives": fp,
        "false_positive_rate": round(fp["current"] / max(1, judged), 5),
        "detection_rate": detected / len(FAULTS),
        "targets": {"false_positives": 0, "detection_rate": 1.0},
        "healthy": healthy,
        "faults": faults,
        "baseline": "the same runs with the gate's previous defaults (spikes judged in warmup, grad-norm floor 1x level)",
        "steps": args.steps, "fault_steps": args.fault_steps,
    }


def _data(name: str, root: Path, steps: int):
    """(the pipeline config, (train shards, val shards)) after the data stages of one corpus."""
    from lm_core.shards import open_split
    from lm_core.tokenizer import Tokenizer
    from pipelines.config import load_config
    from pipelines.stages import tokenizer as tokenizer_stage
    from pipelines.stages.runner import run_pipeline

    overrides = [f"workspace={root}"]
    if name == "stdlib":
        overrides += ["ingest.sources=[{kind: stdlib, doc_chars: 4000}]"]
    cfg = load_config("tiny" if name == "tiny" else "default", overrides)
    if name != "tiny":
        cfg = _with(cfg, max_steps=steps, checkpoint_every=0, eval_every=0, peak_tflops=0)
    results = run_pipeline(cfg, only="shard")
    tok = Tokenizer(tokenizer_stage.model_path(results["tokenizer"]))
    return cfg, (open_split(results["shard"].dir, "train", tok.sha256), open_split(results["shard"].dir, "val", tok.sha256))


def _with(cfg, **train):
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, **train))


def _train(cfg, shards, out: Path, stability) -> dict:
    from lm_core.engine import train
    from lm_core.tracking import JsonlTracker

    train_cfg = dataclasses.replace(cfg.train, stability=stability, num_threads=1)
    tracker = JsonlTracker(out / "history.jsonl")
    started = time.perf_counter()
    try:
        result = train(cfg.model, train_cfg, shards[0], None, out / "ckpt", tracker)
    finally:
        tracker.close()
    vetoes = [e for e in result.events if e["kind"] in ("spike", "nonfinite", "persistent_spike")]
    return {"steps": result.steps, "judged_steps": max(0, result.steps - train_cfg.warmup_steps),
            "vetoed_steps": result.skipped_steps, "rollbacks": result.rollbacks, "final_loss": round(result.final_loss, 4),
            "events": [{k: e[k] for k in ("step", "kind", "action", "metric", "value", "threshold")} for e in vetoes],
            "seconds": round(time.perf_counter() - started, 1)}


def _fault_row(row: dict, steps: int) -> dict:
    caught = [e for e in row["events"] if FAULT_STEP < e["step"] <= FAULT_STEP + 5]
    return {**row, "detected": bool(caught) and row["steps"] == steps,
            "first_verdict": caught[0] if caught else None}
