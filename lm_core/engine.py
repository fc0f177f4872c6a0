"""The one training loop: a GPT trained through DeepSpeed ZeRO (lm_core.zero_adapter), step by step.

World size 1 runs in-process (gloo, no launcher); N ranks come from DeepSpeed's launcher or torchrun
(lm_core.launch), which set RANK/WORLD_SIZE; both go through `train`. Mixed precision is DeepSpeed's bf16
mode: parameters, activations and gradients in bf16, fp32 master weights and Adam moments in the
ZeRO-partitioned optimizer (fp16 adds dynamic loss scaling, GPUs). The model handed back holds the masters.

An ordinary step reads nothing back to the host, so the host can queue steps ahead of a GPU: the loss
accumulates on the device, clipping and the spike gate's veto happen inside the fused AdamW kernel
(lm_core.gated_adamw, lm_core.stability.SpikeGate), and the host reads the step's numbers only on *sync
steps* (log steps, checkpoint steps, the last step, a stop request). There it writes the events of the
steps since the last sync, rolls back when a run of vetoed steps says the damage got in (reload the last
good checkpoint, skip the offending data windows), logs metrics, checkpoints, and honours SIGTERM/SIGINT
(checkpoint, then stop). Fault injection and the update/param ratio are step hooks (lm_core.step_hooks).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from lm_core.checkpoints import SignalFlag, checkpoint_tag, latest_tag, load_checkpoint, save_checkpoint
from lm_core.evaluation import validation_loss
from lm_core.gated_adamw import GatedAdamW, clip_scale
from lm_core.loader import TokenLoader, batch_to_device
from lm_core.model import GPT, GPTConfig
from lm_core.run_state import RunState
from lm_core.shards import ShardDocuments
from lm_core.stability import EventLog, FaultInjector, SpikeGate, TrainingDiverged
from lm_core.step_hooks import FaultHook, StepContext, StepHook, UpdateRatioHook
from lm_core.tracking import Tracker
from lm_core.train_config import TrainConfig, config_hash
from lm_core.train_metrics import measure_matmul_tflops, sync_errors
from lm_core.train_report import StepReport
from lm_core.zero_adapter import ZeroEngine, build_model, full_ndim, init_distributed, precision_problem

EVENTS_FILE = "events.jsonl"  # next to the checkpoints, so a resumed run appends to the same log
log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    model: GPT | None  # unwrapped, fp32, full (consolidated) weights; None on ZeRO-3 ranks other than 0
    steps: int
    tokens: int
    final_loss: float
    final_val_loss: float | None
    wall_s: float
    resumed_from_step: int
    events: list[dict] = field(default_factory=list)  # stability and interruption events of this call
    skipped_steps: int = 0  # updates vetoed by the spike gate
    rollbacks: int = 0


class TrainingInterrupted(RuntimeError):
    """SIGTERM/SIGINT stopped training after a checkpoint was written; rerunning resumes from it."""


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


def train(model_cfg: GPTConfig, cfg: TrainConfig, train_shards: list[np.ndarray], val_shards: list[np.ndarray] | None,
          checkpoint_dir: Path, tracker: Tracker, progress: Callable[[dict], None] | None = None,
          bos_id: int | None = None, documents: ShardDocuments | None = None,
          hooks: Sequence[StepHook] = ()) -> TrainResult:
    """`bos_id` marks document starts in the shards; train.document_attention needs it. `documents` (the
    train split's document tables) lets events name the documents of the windows they skip. `hooks` run
    after the built-in ones (e.g. a profiler's step, a custom metric)."""
    if cfg.document_attention and bos_id is None:
        raise ValueError("train.document_attention=true needs the tokenizer's bos_id to find document starts; "
                         "pass bos_id to lm_core.engine.train")
    if problem := precision_problem(cfg.precision):
        raise ValueError(problem)
    t = _Training(model_cfg, cfg, Path(checkpoint_dir), tracker, progress, documents)
    t.start(train_shards)
    run, zero, optimizer, gate, hooks = t.run, t.zero, t.optimizer, t.gate, t.hooks + list(hooks)
    segments_bos = bos_id if cfg.document_attention else None
    pending: list[StepContext] = []  # the steps since the last sync, whose verdicts the host has not read
    stop = SignalFlag()
    try:
        stop.install()
        while run.step < cfg.max_steps:
            sync_errors(t.device, cfg.sync_check and run.step > t.start_step)  # the first step warms up
            ctx = StepContext(step=run.step, window=run.next_window(t.loader, t.accum), slot=len(pending),
                              is_log=t.is_log_step(run.step + 1), faults=t.faults.take(run.step),
                              lr=t.scheduler.get_last_lr()[0], loss_scale=zero.loss_scale)
            loss_sum = torch.zeros((), device=t.device)
            for micro in range(t.accum):
                batch = next(t.loader)
                ctx.window_ids += t.loader.last_window_ids
                for hook in hooks:
                    batch = hook.batch(ctx, micro, batch)
                loss = backward_loss = zero.forward(*batch_to_device(batch, t.device, segments_bos))
                for hook in hooks:
                    loss, backward_loss = hook.loss(ctx, loss, backward_loss)
                zero.backward(backward_loss)
                loss_sum += loss.detach().float()
            step_loss = t.mean_over_ranks(loss_sum / t.accum)
            zero.boundary()  # gradients reduced; ZeRO-0/1/2 measure the pre-clip norm here
            gate.begin(ctx.slot, step_loss)
            # runs inside DeepSpeed's step; spikes are judged once the lr warmup is over
            spikes = ctx.step >= cfg.warmup_steps or cfg.stability.judge_warmup
            optimizer.arm(functools.partial(t.judge, ctx.slot, step_loss, spikes))
            for hook in hooks:
                hook.before_update(ctx, optimizer)
            ctx.applied = zero.step()
            optimizer.disarm()
            for hook in hooks:
                hook.after_update(ctx, optimizer)
            pending.append(ctx)
            run.step = ctx.done
            t.report.count_step()
            if not (t.is_sync_step(ctx.done) or (t.world_size == 1 and stop.signum)):
                continue
            sync_errors(t.device, False)
            verdicts = gate.read([c.slot for c in pending])  # the one host read of these steps
            rolled_back = t.settle(pending, verdicts)
            pending = []
            if rolled_back:
                continue
            if ctx.is_log:
                t.log_step(ctx, verdicts[-1], val_shards)
            if cfg.checkpoint_every and ctx.done % cfg.checkpoint_every == 0 and ctx.done < cfg.max_steps \
                    and not run.spike_windows:  # a checkpoint inside a run of vetoed steps is no good to roll back to
                t.save(ctx.done)
            if stop.requested(t.world_size, t.device):
                t.save(ctx.done)
                t.report.event(ctx.done, "interrupted", "checkpoint", detail=stop.name)
                raise TrainingInterrupted(f"training stopped by {stop.name} after step {ctx.done}; the checkpoint in "
                                          f"{checkpoint_dir} resumes it: rerun the same command")
    finally:
        stop.uninstall()
        sync_errors(t.device, False)
    return t.finish(val_shards)


class _Training:
    """Everything one `train` call builds, and what the loop does on sync steps."""

    def __init__(self, model_cfg: GPTConfig, cfg: TrainConfig, checkpoint_dir: Path, tracker: Tracker,
                 progress: Callable[[dict], None] | None, documents: ShardDocuments | None):
        self.model_cfg, self.cfg, self.checkpoint_dir, self.documents = model_cfg, cfg, checkpoint_dir, documents
        self.tracker, self.progress = tracker, progress

    def start(self, train_shards: list[np.ndarray]) -> None:
        cfg, model_cfg = self.cfg, self.model_cfg
        logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
        if cfg.num_threads:
            torch.set_num_threads(cfg.num_threads)
        self.world_size = init_distributed()
        self.rank = int(os.environ["RANK"])
        cuda = torch.cuda.is_available()
        self.device = torch.device("cuda", int(os.environ["LOCAL_RANK"])) if cuda else torch.device("cpu")
        if cuda:  # fp32 matmuls and convolutions on tensor cores (TF32); bf16/fp16 modes are unaffected
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        torch.manual_seed(cfg.seed)
        init = load_init_weights(cfg.init_from, model_cfg).state_dict() if cfg.init_from else None
        model = build_model(model_cfg, cfg, self.world_size, self.device, init)  # a checkpoint of this run still wins
        model.activation_checkpointing = cfg.activation_checkpointing
        decay = [p for p in model.parameters() if full_ndim(p) >= 2]  # matrices and embeddings decay
        no_decay = [p for p in model.parameters() if full_ndim(p) < 2]
        self.optimizer = GatedAdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                     {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, cfg.lr_multiplier)
        self.zero = ZeroEngine(model, self.optimizer, self.scheduler, cfg, self.world_size, self.device)
        self.accum = cfg.grad_accum_steps(self.world_size)
        events = EventLog(self.checkpoint_dir / EVENTS_FILE)
        if cfg.compile and (why := self.zero.compile((cfg.micro_batch_size, model_cfg.block_size), cfg.document_attention)):
            log.warning("torch.compile failed (%s); training runs eager", why)
            if self.rank == 0:
                events.write(0, "compile_fallback", "eager", detail=why[:500])
        # one seeded order of windows per epoch, split between the ranks (disjoint); resumable via state_dict
        self.loader = TokenLoader(train_shards, model_cfg.block_size, cfg.micro_batch_size, seed=cfg.seed,
                                  rank=self.rank, world_size=self.world_size)
        self.gate = SpikeGate(cfg.stability, self.device, log_size=cfg.log_every)
        self.faults = FaultHook(FaultInjector(cfg.stability), model_cfg.vocab_size, self.accum)
        self.hooks = [self.faults, UpdateRatioHook(self.zero.stepped_tensors, cfg.zero_stage > 0, self.world_size)]
        self.tokens_per_step = cfg.global_batch_size * model_cfg.block_size
        peak = cfg.peak_tflops if cfg.peak_tflops >= 0 else measure_matmul_tflops(cfg.precision, self.device)
        self.report = StepReport(self.tracker, self.progress, events, self.rank, self.device, self.tokens_per_step,
                                 model_cfg.flops_per_token(), peak, cfg.max_steps)
        self.config_hash = config_hash(model_cfg, cfg)
        self.run = RunState()
        if self.rank == 0 and self.checkpoint_dir.is_dir():
            for stale in self.checkpoint_dir.glob(".tmp-*"):  # a save that a kill interrupted
                shutil.rmtree(stale, ignore_errors=True)
        if (tag := latest_tag(self.checkpoint_dir)) is not None:
            self.run.restore(load_checkpoint(self.zero.engine, self.checkpoint_dir, tag), self.loader, self.gate)
            log.info("resuming from step %d (checkpoint %s)", self.run.step, self.checkpoint_dir / tag)
        self.start_step, self.started = self.run.step, time.perf_counter()
        self.zero.engine.train()

    def is_log_step(self, done: int) -> bool:
        return done % self.cfg.log_every == 0 or done == self.cfg.max_steps

    def is_sync_step(self, done: int) -> bool:
        every = self.cfg.checkpoint_every
        return self.is_log_step(done) or bool(every and done % every == 0)

    def mean_over_ranks(self, value: torch.Tensor) -> torch.Tensor:
        if self.world_size > 1:  # every rank must judge the same number (a device collective, no host read)
            torch.distributed.all_reduce(value)
            value = value / self.world_size
        return value

    def judge(self, slot: int, step_loss: torch.Tensor, spikes: bool) -> tuple[torch.Tensor | None, torch.Tensor]:
        """(grad_scale, found_inf) of this step for the fused AdamW kernel: the clip and the gate's veto."""
        norm = self.zero.grad_norm()
        return clip_scale(norm, self.cfg.grad_clip), self.gate.judge(slot, step_loss, norm, spikes)

    def settle(self, pending: list[StepContext], verdicts) -> bool:
        """Write the events of the steps since the last sync and keep the counts; True when it rolled back."""
        run, report = self.run, self.report
        for ctx, verdict in zip(pending, verdicts):
            if ctx.faults:
                report.event(ctx.done, "injected_fault", "none", window=ctx.window, detail=",".join(ctx.faults))
            if not ctx.applied:
                report.event(ctx.done, "loss_scale_overflow", "skip_update", window=ctx.window,
                             detail=f"fp16 gradients overflowed at loss scale {ctx.loss_scale:g}; DeepSpeed skipped "
                                    f"the step (loss scale now {self.zero.loss_scale:g})")
            if verdict.vetoed:
                info = dict(metric=verdict.metric, value=verdict.value, threshold=verdict.threshold, window=ctx.window,
                            doc_ids=self.report.doc_ids(self.documents, self.loader, ctx.window_ids, self.world_size))
                if verdict.reason == "persistent_spike" and latest_tag(self.checkpoint_dir) is not None:
                    report.event(ctx.done, verdict.reason, "rollback", **info)
                    self.rollback(ctx.done, run.spike_windows + [ctx.window])
                    return True
                run.skipped_steps += 1
                if verdict.reason == "persistent_spike":
                    # nothing to roll back to: a shift that lasts is taken as the new normal (the update was dropped)
                    self.gate.rebaseline()
                    run.spike_windows.clear()
                    report.event(ctx.done, verdict.reason, "rebaseline", detail="no checkpoint to roll back to yet", **info)
                else:
                    run.spike_windows.append(ctx.window)
                    report.event(ctx.done, verdict.reason, "skip_update", **info)
            elif verdict.reason == "ok":
                run.spike_windows.clear()
                run.loss = verdict.loss
        return False

    def rollback(self, step: int, offending: list[int]) -> None:
        run, tag = self.run, latest_tag(self.checkpoint_dir)
        run.rollbacks += 1
        if run.rollbacks > self.cfg.stability.max_rollbacks:
            self.report.event(step, "diverged", "stop", detail=f"{run.rollbacks} rollbacks > train.stability.max_rollbacks")
            raise TrainingDiverged(f"training keeps spiking: step {step} would be rollback {run.rollbacks}, more than "
                                   f"train.stability.max_rollbacks={self.cfg.stability.max_rollbacks}; see "
                                   f"{self.checkpoint_dir / EVENTS_FILE}, then lower train.lr, raise "
                                   "train.warmup_steps or train.stability.max_rollbacks")
        rollbacks, skipped = run.rollbacks, run.skipped_steps
        run.restore(load_checkpoint(self.zero.engine, self.checkpoint_dir, tag), self.loader, self.gate)
        run.rollbacks, run.skipped_steps = rollbacks, skipped
        run.skipped_windows.update(offending)
        self.report.event(step, "rollback", "resume", detail=f"to {tag}; skipping windows {offending}")

    def log_step(self, ctx: StepContext, verdict, val_shards: list[np.ndarray] | None) -> None:
        metrics = {"train/loss": verdict.loss, "train/lr": ctx.lr, "train/grad_norm": verdict.grad_norm}
        for hook in self.hooks:
            metrics.update(hook.log_metrics(ctx, verdict))
        if self.zero.loss_scale is not None:
            metrics["train/loss_scale"] = self.zero.loss_scale
        cfg = self.cfg
        if val_shards is not None and cfg.eval_every and ctx.done % cfg.eval_every == 0 and ctx.done < cfg.max_steps:
            metrics["val/loss"] = self.validation_loss(val_shards)
        self.report.log(ctx.done, metrics)

    def validation_loss(self, val_shards: list[np.ndarray]) -> float:
        return validation_loss(self.zero.module, val_shards, self.model_cfg.block_size, self.cfg.eval_windows,
                               self.cfg.precision, batch_size=self.cfg.micro_batch_size)

    def save(self, step: int) -> None:
        state = self.run.client_state(step, self.tokens_per_step, self.loader, self.gate, self.config_hash)
        save_checkpoint(self.zero.engine, self.checkpoint_dir, step, state, self.cfg.keep_checkpoints, self.rank,
                        self.world_size)

    def finish(self, val_shards: list[np.ndarray] | None) -> TrainResult:
        cfg = self.cfg
        if latest_tag(self.checkpoint_dir) != checkpoint_tag(cfg.max_steps):
            self.save(cfg.max_steps)
        val_loss = None
        if val_shards is not None:
            val_loss = self.validation_loss(val_shards)
            self.report.log_final({"val/loss": val_loss}, cfg.max_steps)
        # ZeRO-3 consolidates from the checkpoint: rank 0 alone needs (and builds) the full model
        gather = self.rank == 0 or self.cfg.zero_stage != 3  # ZeRO-1/2 gather their partitions on every rank
        model = self.zero.consolidated_model(self.model_cfg, self.checkpoint_dir) if gather else None
        return TrainResult(model, cfg.max_steps, cfg.max_steps * self.tokens_per_step, self.run.loss, val_loss,
                           time.perf_counter() - self.started, self.start_step, self.report.events.events,
                           self.run.skipped_steps, self.run.rollbacks)
