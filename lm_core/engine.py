"""The one training loop: a GPT trained through a DeepSpeed engine (ZeRO), the only DeepSpeed import.

World size 1 runs in-process (gloo, no launcher); N ranks come from DeepSpeed's launcher or torchrun
(lm_core.launch), which set RANK/WORLD_SIZE. The DeepSpeed JSON is derived from TrainConfig
(lm_core.train_config), so batch sizes, lr and clipping live in one place. Mixed precision is DeepSpeed's
bf16 mode, the same on CPU and GPU: the model's parameters, activations and gradients are bf16 and the
optimizer keeps fp32 master weights and Adam moments, which ZeRO partitions (1: optimizer state,
2: + gradients, 3: + parameters), so every stage cuts the per-rank memory the ZeRO paper counts. fp16 is
the same with DeepSpeed's dynamic loss scaling (GPUs). The model handed back is built from the fp32 masters.

Stability (lm_core.stability): every optimizer step is judged from its loss and pre-clip grad norm
before the update is applied. A spike drops the update (the AdamW we hand DeepSpeed is gated, so ZeRO
still does its bookkeeping but the weights and moments stay put); a NaN/Inf or a run of spikes reloads
the last good checkpoint and skips the offending data windows. Checkpoints are written to a temporary
tag and renamed into place, and SIGTERM/SIGINT finish the current step, checkpoint, and stop.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import logging
import math
import os
import resource
import shutil
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from lm_core.checkpoints import (SignalFlag, checkpoint_tag, latest_tag, load_checkpoint, rng_state, save_checkpoint,
                                 set_rng_state)
from lm_core.loader import TokenLoader, segment_ids
from lm_core.model import GPT, GPTConfig
from lm_core.shards import ShardDocuments, sequential_windows
from lm_core.stability import GRAD_SPIKE_FACTOR, EventLog, FaultInjector, SpikeDetector, TrainingDiverged
from lm_core.tracking import Tracker
from lm_core.train_config import TrainConfig, config_hash, deepspeed_config

EVENTS_FILE = "events.jsonl"  # next to the checkpoints, so a resumed run appends to the same log
log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    model: GPT  # unwrapped, fp32, full (consolidated) weights
    steps: int
    tokens: int
    final_loss: float
    final_val_loss: float | None
    wall_s: float
    resumed_from_step: int
    events: list[dict] = field(default_factory=list)  # stability and interruption events of this call
    skipped_steps: int = 0  # updates dropped as spikes
    rollbacks: int = 0


class TrainingInterrupted(RuntimeError):
    """SIGTERM/SIGINT stopped training after a checkpoint was written; rerunning resumes from it."""


class GatedAdamW(torch.optim.AdamW):
    """AdamW whose update can be vetoed for one optimizer step.

    DeepSpeed (ZeRO 0-3) calls this optimizer's step() on the fp32 master weights after it has reduced and
    clipped the gradients; while `skip_update` is set the call does nothing, so weights and Adam moments
    keep their values and DeepSpeed still clears the gradients and advances its counters and the schedule.
    """

    skip_update = False

    def step(self, closure=None):
        if self.skip_update:
            return None
        return super().step(closure)


def load_init_weights(model_dir: str | Path, model_cfg: GPTConfig) -> GPT:
    """The model of `train.init_from`, refused unless its config is this run's."""
    from lm_core.weights import load_model_dir

    if not (Path(model_dir) / "config.json").is_file():
        raise ValueError(f"train.init_from={str(model_dir)!r} is not an lmforge model directory (no config.json); "
                         "point it at an export or a pretrain output's model/ directory")
    model, _ = load_model_dir(Path(model_dir))
    theirs, ours = dataclasses.asdict(model.cfg), dataclasses.asdict(model_cfg)
    if diff := {k: (theirs.get(k), v) for k, v in ours.items() if theirs.get(k) != v}:
        detail = ", ".join(f"model.{k}: theirs {a}, this run {b}" for k, (a, b) in diff.items())
        raise ValueError(f"train.init_from={str(model_dir)!r} has another model shape ({detail}); "
                         "set the model section to the init model's, or unset train.init_from")
    return model


def precision_problem(precision: str) -> str | None:
    """Why this machine cannot train in `precision`, or None: DeepSpeed runs fp16 only where the device has
    fp16 kernels (a CUDA GPU; CPUs with AVX512-FP16)."""
    if precision != "fp16":
        return None
    from deepspeed.accelerator import get_accelerator

    if get_accelerator().is_fp16_supported():
        return None
    return (f"train.precision=fp16 needs a device with fp16 kernels (a CUDA GPU); DeepSpeed's "
            f"{get_accelerator().device_name()} accelerator here has none: set train.precision=bf16 (the same "
            "memory, no loss scaling needed) or fp32")


def init_distributed() -> int:
    """Initialise torch.distributed for DeepSpeed; a process with no launcher becomes rank 0 of 1."""
    import deepspeed

    if "WORLD_SIZE" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    # NOTE: DeepSpeed JIT-compiles a shared-memory comm op (~90 s) at first init; gloo never uses it.
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    deepspeed.init_distributed(dist_backend="gloo" if not torch.cuda.is_available() else "nccl", verbose=False)
    return int(os.environ["WORLD_SIZE"])


def train(
    model_cfg: GPTConfig,
    cfg: TrainConfig,
    train_shards: list[np.ndarray],
    val_shards: list[np.ndarray] | None,
    checkpoint_dir: Path,
    tracker: Tracker,
    progress: Callable[[dict], None] | None = None,
    bos_id: int | None = None,
    documents: ShardDocuments | None = None,
) -> TrainResult:
    """`bos_id` marks document starts in the shards; train.document_attention needs it. `documents` (the
    train split's document tables) lets spike events name the documents of the window they skip."""
    import deepspeed

    if cfg.document_attention and bos_id is None:
        raise ValueError("train.document_attention=true needs the tokenizer's bos_id to find document starts; "
                         "pass bos_id to lm_core.engine.train")
    if problem := precision_problem(cfg.precision):
        raise ValueError(problem)
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    world_size = init_distributed()
    rank = int(os.environ["RANK"])
    device = torch.device("cuda", int(os.environ["LOCAL_RANK"])) if torch.cuda.is_available() else torch.device("cpu")
    checkpoint_dir = Path(checkpoint_dir)
    events = EventLog(checkpoint_dir / EVENTS_FILE)

    torch.manual_seed(cfg.seed)
    model = GPT(model_cfg)
    if cfg.init_from:  # a checkpoint of this run, if any, still wins below: resuming continues the run
        model.load_state_dict(load_init_weights(cfg.init_from, model_cfg).state_dict())
    model.activation_checkpointing = cfg.activation_checkpointing
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    # fused: one pass over each tensor, no temporaries; ZeRO-1/2 hand it flat partitions, where the
    # unfused loop's partition-sized temporaries cost more memory than the partitioning saved
    optimizer = GatedAdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr,
        betas=(cfg.beta1, cfg.beta2),
        fused=True,
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, cfg.lr_multiplier)
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=deepspeed_config(cfg, world_size)
    )
    if world_size == 1 and cfg.zero_stage == 0:
        # one rank has nothing to average with: skip flattening every gradient into a bucket, an all-reduce
        # with itself and copying back (ZeRO 1-3 collect their partitions in that step, so they keep it)
        engine.enable_backward_allreduce = False
    if cfg.compile:
        _compile_forward(engine.module, model_cfg, device, events if rank == 0 else None)

    accum = cfg.grad_accum_steps(world_size)
    # one seeded order of windows per epoch, split between the ranks (disjoint); resumable via state_dict
    loader = TokenLoader(train_shards, model_cfg.block_size, cfg.micro_batch_size, seed=cfg.seed,
                         rank=rank, world_size=world_size)
    run = _RunState()
    if rank == 0 and checkpoint_dir.is_dir():
        for stale in checkpoint_dir.glob(".tmp-*"):  # a save that a kill interrupted
            shutil.rmtree(stale, ignore_errors=True)
    detector = SpikeDetector(cfg.stability)
    faults = FaultInjector(cfg.stability)
    if (tag := latest_tag(checkpoint_dir)) is not None:
        run.restore(load_checkpoint(engine, checkpoint_dir, tag), loader, detector)
    start_step = run.step

    tokens_per_step = cfg.global_batch_size * model_cfg.block_size
    flops_per_token = model_cfg.flops_per_token()
    peak_tflops = cfg.peak_tflops if cfg.peak_tflops >= 0 else measure_matmul_tflops(cfg.precision, device)
    gated = cfg.stability.enabled
    loss_scaled = cfg.precision == "fp16"  # DeepSpeed's dynamic loss scaling: gradients are multiplied by it
    hash_ = config_hash(model_cfg, cfg)

    def save(step_done: int) -> None:
        save_checkpoint(engine, checkpoint_dir, step_done, run.client_state(step_done, tokens_per_step, loader, detector, hash_),
                         cfg.keep_checkpoints, rank, world_size)

    def event(step: int, kind: str, action: str, **kw) -> None:
        if rank != 0:
            return
        record = events.write(step, kind, action, **kw)
        measured = f"{kw['metric']} {kw['value']:.4g} > {kw['threshold']:.4g} " if kw.get("metric") else ""
        log.warning("training event at step %d: %s -> %s %s%s", step, kind, action, measured, kw.get("detail", ""))
        tracker.log_text("stability/events", json.dumps(record), step)
        value = kw.get("value")
        tracker.log_metrics({f"stability/{kind}": value if isinstance(value, float) and math.isfinite(value) else 1.0}, step)

    stop = SignalFlag()
    started = time.perf_counter()
    window_start, window_tokens = time.perf_counter(), 0
    val_loss = None
    engine.train()
    try:
        stop.install()
        while run.step < cfg.max_steps:
            step = run.step
            injected = faults.take(step)
            window = run.next_window(loader, accum)
            done = step + 1
            measure_update = done % cfg.log_every == 0 or done == cfg.max_steps
            step_loss, grad_norm, verdict, update_ratio, overflow = 0.0, None, None, None, False
            scale_before = engine.optimizer.loss_scale if loss_scaled else None
            lr_before = [g["lr"] for g in optimizer.param_groups]
            step_lr = scheduler.get_last_lr()[0]  # the rate this step uses; the scheduler advances in engine.step()
            step_windows: list[int] = []  # this rank's loader windows of the step, for the events
            for micro in range(accum):
                batch = next(loader)
                step_windows.extend(loader.last_window_ids)
                if "corrupt_batch" in injected:
                    batch = FaultInjector.corrupt(batch, model_cfg.vocab_size, seed=step * accum + micro)
                tokens = torch.from_numpy(batch).to(device)
                segments = torch.from_numpy(segment_ids(batch, bos_id)).to(device) if cfg.document_attention else None
                _, loss = engine(tokens[:, :-1], tokens[:, 1:], segments=segments)  # in the engine module's dtype
                if "nan" in injected:
                    loss = loss * float("nan")
                engine.backward(loss * GRAD_SPIKE_FACTOR if "grad_spike" in injected else loss)
                step_loss += loss.item() / accum
                if micro == accum - 1:  # the boundary: gradients are reduced, the update not yet applied
                    if gated:
                        step_loss = _mean_over_ranks(step_loss, world_size)
                        grad_norm = _grad_norm_before_step(engine, cfg.zero_stage)
                        if grad_norm is not None and loss_scaled:
                            grad_norm /= engine.optimizer.loss_scale
                        # fp16 gradients that overflowed at this loss scale are loss scaling at work, not
                        # a spike: DeepSpeed skips the step and lowers the scale (the event is logged below)
                        if not (loss_scaled and math.isfinite(step_loss) and not math.isfinite(grad_norm or 0.0)):
                            verdict = detector.check(step_loss, grad_norm)
                            optimizer.skip_update = verdict.action != "ok"
                    if "lr_spike" in injected:
                        for g in optimizer.param_groups:
                            g["lr"] *= faults.lr_factor
                    steps_before = _adam_steps(optimizer)
                    step_lrs = [g["lr"] for g in optimizer.param_groups]
                engine.step()
                if micro == accum - 1:
                    vars(engine.optimizer).pop("scaled_global_norm", None)  # see _grad_norm_before_step
                    overflow = loss_scaled and not engine.was_step_applied()
                    optimizer.skip_update = False
                    if "lr_spike" in injected:  # only when the scheduler did not already reset it
                        for g, lr in zip(optimizer.param_groups, lr_before):
                            if g["lr"] == lr * faults.lr_factor:
                                g["lr"] = lr
                    if measure_update:  # 0 when the update was dropped (by the gate or by DeepSpeed)
                        stepped = _adam_steps(optimizer) != steps_before
                        update_ratio = (_update_ratio(optimizer, _stepped_tensors(engine, optimizer, cfg.zero_stage), step_lrs,
                                                      cfg.zero_stage > 0, world_size) if stepped else 0.0)
            if injected:
                event(step + 1, "injected_fault", "none", window=window, detail=",".join(injected))
            if overflow:
                event(done, "loss_scale_overflow", "skip_update", window=window,
                      detail=f"fp16 gradients overflowed at loss scale {scale_before:g}; DeepSpeed skipped the step "
                             f"(loss scale now {engine.optimizer.loss_scale:g})")

            if verdict is not None and verdict.action == "rollback":
                spike_info = dict(metric=verdict.metric, value=verdict.value, threshold=verdict.threshold, window=window,
                                  doc_ids=_doc_ids(documents, loader, step_windows, world_size))
                if verdict.reason == "persistent_spike" and latest_tag(checkpoint_dir) is None:
                    # nothing to roll back to: a shift that lasts is taken as the new normal (the update was dropped)
                    detector.rebaseline()
                    run.skipped_steps += 1
                    run.spike_windows.clear()
                    event(done, verdict.reason, "rebaseline", detail="no checkpoint to roll back to yet", **spike_info)
                else:
                    event(done, verdict.reason, "rollback", **spike_info)
                    _rollback(engine, checkpoint_dir, run, loader, detector, cfg.stability.max_rollbacks, done, event)
                    continue
            elif verdict is not None and verdict.action == "skip":
                run.skipped_steps += 1
                run.spike_windows.append(window)
                event(done, verdict.reason, "skip_update", metric=verdict.metric, value=verdict.value,
                      threshold=verdict.threshold, window=window, doc_ids=_doc_ids(documents, loader, step_windows, world_size))
            else:
                run.spike_windows.clear()
                run.loss = step_loss
            run.step = done
            window_tokens += tokens_per_step
            if done % cfg.log_every == 0 or done == cfg.max_steps:
                elapsed = time.perf_counter() - window_start
                if grad_norm is None:
                    grad_norm = engine.get_global_grad_norm()
                metrics = {
                    "train/loss": step_loss,
                    "train/lr": step_lr,
                    "train/grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
                    "train/tokens_per_s": window_tokens / elapsed,
                    "train/step_s": elapsed / max(1, window_tokens // tokens_per_step),
                    **_memory_metrics(device),
                }
                if update_ratio is not None:
                    metrics["train/update_ratio"] = update_ratio
                if loss_scaled:
                    metrics["train/loss_scale"] = float(engine.optimizer.loss_scale)
                if peak_tflops > 0:
                    metrics["train/mfu"] = metrics["train/tokens_per_s"] * flops_per_token / (peak_tflops * 1e12)
                if val_shards is not None and cfg.eval_every and done % cfg.eval_every == 0 and done < cfg.max_steps:
                    val_loss = evaluate_loss(engine.module, val_shards, model_cfg.block_size, cfg.eval_windows, cfg.precision)
                    metrics["val/loss"] = val_loss
                if rank == 0:
                    tracker.log_metrics(metrics, done)
                    if progress:
                        progress({"step": done, "max_steps": cfg.max_steps, **metrics})
                window_start, window_tokens = time.perf_counter(), 0
            # a checkpoint inside a run of spikes would not be a good one to roll back to
            if cfg.checkpoint_every and done % cfg.checkpoint_every == 0 and done < cfg.max_steps and not run.spike_windows:
                save(done)
            if stop.requested(world_size):
                save(done)
                event(done, "interrupted", "checkpoint", detail=stop.name)
                raise TrainingInterrupted(f"training stopped by {stop.name} after step {done}; the checkpoint in "
                                          f"{checkpoint_dir} resumes it: rerun the same command")
    finally:
        stop.uninstall()

    if latest_tag(checkpoint_dir) != checkpoint_tag(cfg.max_steps):
        save(cfg.max_steps)
    if val_shards is not None:
        val_loss = evaluate_loss(engine.module, val_shards, model_cfg.block_size, cfg.eval_windows, cfg.precision)
        if rank == 0:
            tracker.log_metrics({"val/loss": val_loss}, cfg.max_steps)
    final = _consolidated_model(engine, model_cfg, cfg, checkpoint_dir)
    return TrainResult(final, cfg.max_steps, cfg.max_steps * tokens_per_step, run.loss, val_loss,
                       time.perf_counter() - started, start_step, events.events, run.skipped_steps, run.rollbacks)


@dataclass
class _RunState:
    """What a checkpoint must carry besides weights and optimizer: where training and data stand."""

    step: int = 0
    loss: float = float("nan")
    cursor: int = 0  # optimizer-step windows drawn from the loader so far (skipped ones included)
    skipped_windows: set[int] = field(default_factory=set)  # windows a rollback excluded for good
    spike_windows: list[int] = field(default_factory=list)  # windows of the current run of spikes
    skipped_steps: int = 0
    rollbacks: int = 0

    def next_window(self, loader, accum: int) -> int:
        """Advance past excluded windows (drawing and dropping their micro-batches); return this step's window."""
        while self.cursor in self.skipped_windows:
            for _ in range(accum):
                next(loader)
            self.cursor += 1
        self.cursor += 1
        return self.cursor - 1

    def client_state(self, step: int, tokens_per_step: int, loader, detector: SpikeDetector, hash_: str) -> dict:
        return {"step": step, "tokens": step * tokens_per_step, "loss": self.loss, "cursor": self.cursor,
                "skipped_windows": sorted(self.skipped_windows), "skipped_steps": self.skipped_steps,
                "rollbacks": self.rollbacks, "loader": loader.state_dict(), "detector": detector.state_dict(),
                "rng": rng_state(), "config_hash": hash_}

    def restore(self, state: dict, loader, detector: SpikeDetector) -> None:
        self.step = int(state["step"])
        self.loss = float(state.get("loss", float("nan")))
        self.cursor = int(state.get("cursor", self.step))
        self.skipped_windows |= set(state.get("skipped_windows", []))
        self.skipped_steps = int(state.get("skipped_steps", 0))
        self.rollbacks = max(self.rollbacks, int(state.get("rollbacks", 0)))
        self.spike_windows.clear()
        if "loader" in state:
            loader.load_state_dict(state["loader"])
        if "detector" in state:
            detector.load_state_dict(state["detector"])
        if "rng" in state:
            set_rng_state(state["rng"])


def _rollback(engine, checkpoint_dir: Path, run: _RunState, loader, detector, max_rollbacks: int, step: int, event) -> None:
    offending = run.spike_windows + [run.cursor - 1]
    tag = latest_tag(checkpoint_dir)
    if tag is None:
        event(step, "diverged", "stop", detail="no checkpoint to roll back to")
        raise TrainingDiverged(f"step {step} needs a rollback but no checkpoint exists in {checkpoint_dir}; "
                               "set train.checkpoint_every so a good checkpoint is there to roll back to")
    run.rollbacks += 1
    if run.rollbacks > max_rollbacks:
        event(step, "diverged", "stop", detail=f"{run.rollbacks} rollbacks > train.stability.max_rollbacks")
        raise TrainingDiverged(f"training keeps spiking: step {step} would be rollback {run.rollbacks}, more than "
                               f"train.stability.max_rollbacks={max_rollbacks}; see {checkpoint_dir / EVENTS_FILE}, "
                               "then lower train.lr, raise train.warmup_steps or train.stability.max_rollbacks")
    rollbacks, skipped = run.rollbacks, run.skipped_steps
    run.restore(load_checkpoint(engine, checkpoint_dir, tag), loader, detector)
    run.rollbacks, run.skipped_steps = rollbacks, skipped
    run.skipped_windows.update(offending)
    event(step, "rollback", "resume", detail=f"to {tag}; skipping windows {offending}")


def _grad_norm_before_step(engine, zero_stage: int) -> float | None:
    """The global pre-clip gradient norm at the accumulation boundary, before the optimizer steps."""
    if zero_stage == 0:
        grads = [p.grad.detach().float() for p in engine.module.parameters() if p.grad is not None]
        return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))) if grads else None
    if zero_stage in (1, 2):  # reduced into this rank's partition; the norm helper all-reduces
        norm = engine.optimizer.scaled_global_norm()
        # step() computes this same norm again for clipping: until it ran, the method hands back this one
        # (an instance attribute shadowing the method; engine.step()'s caller removes it)
        engine.optimizer.scaled_global_norm = lambda norm_type=2: norm
        return float(norm)
    return None  # ZeRO-3 gathers its norm inside step(); the loss alone is judged


def _mean_over_ranks(value: float, world_size: int) -> float:
    if world_size == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64)
    torch.distributed.all_reduce(t)
    return float(t[0]) / world_size


def _adam_steps(optimizer: torch.optim.Optimizer) -> float:
    """The step counter of the optimizer's first state: it moves only when an update was applied."""
    for state in optimizer.state.values():
        return float(state["step"])
    return 0.0


def _stepped_tensors(engine, optimizer: torch.optim.Optimizer, zero_stage: int) -> list[tuple[torch.Tensor, int]]:
    """(tensor the optimizer stepped, its param group) pairs: the fp32 masters, or this rank's partitions."""
    if zero_stage == 3:  # ZeRO-3 hands the optimizer one sub-group at a time and empties the groups after
        zero = engine.optimizer
        return [(flat, zero.sub_group_to_group_id[i]) for i, flat in enumerate(zero.fp32_partitioned_groups_flat)]
    return [(param, index) for index, group in enumerate(optimizer.param_groups) for param in group["params"]]


@torch.no_grad()
def _update_ratio(optimizer: torch.optim.Optimizer, tensors: list[tuple[torch.Tensor, int]], lrs: list[float],
                  partitioned: bool, world_size: int, chunk: int = 1 << 20) -> float:
    """||theta_new - theta_old|| / ||theta_old|| of the AdamW update just applied: how big a step it took.

    Rebuilt from the optimizer's own tensors (the fp32 master weights or partitions it stepped and its
    moments) rather than from a copy of the parameters taken before the step, which would cost a full
    model's memory at every logged step: AdamW set theta_new = theta_old * (1 - lr*wd) - lr/bc1 * m / (sqrt(v)/sqrt(bc2) + eps),
    so theta_old follows from theta_new, m and v, a chunk at a time. ZeRO partitions are summed over ranks."""
    num = den = 0.0
    for param, index in tensors:
        state = optimizer.state.get(param)
        if not state:
            continue
        group, lr = optimizer.param_groups[index], lrs[index]
        (beta1, beta2), eps, wd = group["betas"], group["eps"], group["weight_decay"]
        t = float(state["step"])
        step_size, bc2_sqrt = lr / (1 - beta1**t), math.sqrt(1 - beta2**t)
        new_all, m_all, v_all = param.detach().view(-1), state["exp_avg"].view(-1), state["exp_avg_sq"].view(-1)
        for i in range(0, new_all.numel(), chunk):
            new = new_all[i:i + chunk].float()
            m, v = m_all[i:i + chunk].float(), v_all[i:i + chunk].float()
            old = (new + step_size * m / (v.sqrt() / bc2_sqrt + eps)) / (1 - lr * wd)
            num += float((new - old).pow(2).sum())
            den += float(old.pow(2).sum())
    if partitioned and world_size > 1:  # each rank stepped its own partition
        sums = torch.tensor([num, den], dtype=torch.float64)
        torch.distributed.all_reduce(sums)
        num, den = float(sums[0]), float(sums[1])
    return math.sqrt(num) / max(math.sqrt(den), 1e-12)


def _memory_metrics(device: torch.device) -> dict[str, float]:
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    out = {"memory/peak_rss_mb": peak_kib / 1024}
    try:
        with open("/proc/self/statm") as f:
            out["memory/rss_mb"] = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        pass
    if device.type == "cuda":
        out["memory/gpu_peak_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    return out


def measure_matmul_tflops(precision: str, device: torch.device | str = "cpu", n: int = 1024, seconds: float = 0.5) -> float:
    """Achieved TFLOP/s of square matmuls in this precision: the peak that MFU is measured against."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b  # warm-up (kernel selection, AMX tile setup)
    rates = []
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline or len(rates) < 3:
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        a @ b
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize()
        rates.append(2 * n**3 / (time.perf_counter() - t0) / 1e12)
    return float(np.percentile(rates, 90))


def _compile_forward(model: GPT, model_cfg: GPTConfig, device: torch.device, events: EventLog | None) -> None:
    """Compile the forward in place (the module and its state_dict keys stay the same); eager on failure."""
    eager = model.forward
    try:
        model.forward = torch.compile(eager)
        probe = torch.zeros(1, min(8, model_cfg.block_size), dtype=torch.long, device=device)
        model(probe, probe)  # compile now, so a failure falls back here rather than mid-run
    except Exception as exc:  # noqa: BLE001 - any backend failure means: run eager
        model.forward = eager
        log.warning("torch.compile failed (%s); training runs eager", str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        if events is not None:
            events.write(0, "compile_fallback", "eager", detail=type(exc).__name__)


def _doc_ids(documents: ShardDocuments | None, loader: TokenLoader, window_ids: list[int], world_size: int) -> list[str]:
    """Ids of the documents every rank's samples of this step came from (sorted, unique); [] without tables.

    Every rank reaches this together (the verdict is the same on all ranks), so the gather cannot hang."""
    if documents is None:
        return []
    ids: set[str] = set()
    for w in window_ids:
        shard, start = loader.locate(w)
        ids.update(documents.doc_ids(shard, start, start + loader.block_size + 1))
    if world_size > 1:
        gathered: list = [None] * world_size
        torch.distributed.all_gather_object(gathered, sorted(ids))
        ids = {d for part in gathered for d in part}
    return sorted(ids)


@torch.no_grad()
def evaluate_loss(model: torch.nn.Module, val_shards: list[np.ndarray], block_size: int, max_windows: int, precision: str) -> float:
    """Mean next-token loss over the first `max_windows` sequential validation windows."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
        for window in sequential_windows(val_shards, block_size, max_windows):
            w = torch.from_numpy(window).to(device)[None]
            _, loss = model(w[:, :-1], w[:, 1:])
            total += loss.item()
            count += 1
    model.train(was_training)
    return total / max(1, count)


def _consolidated_model(engine, model_cfg: GPTConfig, cfg: TrainConfig, checkpoint_dir: Path) -> GPT:
    """A plain fp32 GPT with the full fp32 weights, whatever ZeRO sharded: in bf16 these are the optimizer's
    master weights, not the bf16 copies the forward ran on. Every rank calls it (ZeRO-1/2 gather)."""
    if cfg.zero_stage == 3:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        model = GPT(model_cfg)
        state = get_fp32_state_dict_from_zero_checkpoint(str(checkpoint_dir))
        model.load_state_dict(state, strict=False)
        if model_cfg.tie_embeddings:
            model.lm_head.weight = model.wte.weight
        return model.float().cpu().eval()
    model = engine.module
    if cfg.precision != "fp32":
        masters = _fp32_masters(engine, cfg.zero_stage)
        model.float()  # in place: the same Parameter objects, now fp32
        with torch.no_grad():
            for param, master in zip(model.parameters(), masters):
                param.copy_(master.view_as(param))
    return model.cpu().eval()


def _fp32_masters(engine, zero_stage: int) -> list[torch.Tensor]:
    """The fp32 master weight of each parameter of engine.module (in parameters() order), full size."""
    params = list(engine.module.parameters())
    if zero_stage == 0:  # DeepSpeed's unfused bf16 optimizer: one fp32 tensor per parameter
        opt = engine.optimizer
        master_of = {id(low): high for lows, highs in zip(opt.fp16_groups, opt.fp32_groups) for low, high in zip(lows, highs)}
        return [master_of[id(p)] for p in params]
    from deepspeed.utils import safe_get_full_fp32_param

    return [safe_get_full_fp32_param(p) for p in params]  # ZeRO-1/2: gathers the rank partitions


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now (for a rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
