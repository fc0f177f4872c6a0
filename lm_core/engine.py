"""The one training loop: a GPT trained through a DeepSpeed engine (ZeRO), the only DeepSpeed import.

World size 1 runs in-process (gloo, no launcher); N ranks come from DeepSpeed's launcher or torchrun,
which set RANK/WORLD_SIZE. The DeepSpeed JSON is derived from TrainConfig, so batch sizes, lr and
clipping live in one place. Mixed precision is torch.autocast(bf16) over fp32 master weights, which
works the same on CPU (AMX) and GPU.
"""

from __future__ import annotations

import importlib
import logging
import math
import os
import shutil
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal

import numpy as np
import torch

from lm_core.model import GPT, GPTConfig
from lm_core.shards import RandomWindowBatches, sequential_windows
from lm_core.tracking import Tracker


@dataclass
class TrainConfig:
    micro_batch_size: int = 16
    global_batch_size: int = 16  # sequences per optimizer step; accumulation = global / (micro * world)
    max_steps: int = 1000  # optimizer steps
    lr: float = 1e-3
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 50
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    precision: Literal["fp32", "bf16"] = "bf16"
    zero_stage: int = 1
    seed: int = 1337
    log_every: int = 10
    eval_every: int = 0  # validation loss every N steps (0: only at the end)
    eval_windows: int = 16
    checkpoint_every: int = 0  # 0: only the final checkpoint
    keep_checkpoints: int = 2
    num_threads: int = 0  # torch intra-op threads; 0 leaves torch's default
    peak_tflops: float = 0.0  # for MFU; 0 skips it

    def validate(self) -> None:
        for key in ("micro_batch_size", "global_batch_size", "max_steps", "log_every", "eval_windows", "keep_checkpoints"):
            if getattr(self, key) < 1:
                raise ValueError(f"train.{key}={getattr(self, key)} must be >= 1")
        if self.global_batch_size % self.micro_batch_size:
            raise ValueError(
                f"train.global_batch_size={self.global_batch_size} is not divisible by train.micro_batch_size="
                f"{self.micro_batch_size}; set train.global_batch_size to a multiple of {self.micro_batch_size}"
            )
        if self.zero_stage not in (0, 1, 2, 3):
            raise ValueError(f"train.zero_stage={self.zero_stage} must be one of 0, 1, 2, 3")
        if self.lr <= 0 or not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"train.lr={self.lr} must be > 0 and train.min_lr_ratio={self.min_lr_ratio} in [0, 1]")
        if self.warmup_steps < 0 or self.warmup_steps > self.max_steps:
            raise ValueError(f"train.warmup_steps={self.warmup_steps} must be in [0, train.max_steps={self.max_steps}]")

    def grad_accum_steps(self, world_size: int) -> int:
        per_step = self.micro_batch_size * world_size
        if self.global_batch_size % per_step:
            raise ValueError(
                f"train.global_batch_size={self.global_batch_size} is not divisible by micro_batch_size*world_size="
                f"{self.micro_batch_size}*{world_size}; set train.global_batch_size to a multiple of {per_step}"
            )
        return self.global_batch_size // per_step

    def lr_multiplier(self, step: int) -> float:
        """Linear warmup then cosine decay to min_lr_ratio; `step` counts optimizer steps from 0."""
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        progress = (step - self.warmup_steps) / max(1, self.max_steps - self.warmup_steps)
        cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        return self.min_lr_ratio + (1 - self.min_lr_ratio) * cosine


def deepspeed_config(cfg: TrainConfig, world_size: int) -> dict:
    """The DeepSpeed JSON, derived from TrainConfig so no number is written twice."""
    return {
        "train_batch_size": cfg.global_batch_size,
        "train_micro_batch_size_per_gpu": cfg.micro_batch_size,
        "gradient_accumulation_steps": cfg.grad_accum_steps(world_size),
        "gradient_clipping": cfg.grad_clip,
        "zero_optimization": {"stage": cfg.zero_stage},
        # we pass a torch AdamW (no FusedAdam JIT compile), which ZeRO calls "untested"
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }


@dataclass
class TrainResult:
    model: GPT  # unwrapped, fp32, full (consolidated) weights
    steps: int
    tokens: int
    final_loss: float
    final_val_loss: float | None
    wall_s: float
    resumed_from_step: int


def init_distributed() -> int:
    """Initialise torch.distributed for DeepSpeed; a process with no launcher becomes rank 0 of 1."""
    import deepspeed

    if "WORLD_SIZE" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
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
) -> TrainResult:
    import deepspeed

    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    world_size = init_distributed()
    rank = int(os.environ["RANK"])
    device = torch.device("cuda", int(os.environ["LOCAL_RANK"])) if torch.cuda.is_available() else torch.device("cpu")

    torch.manual_seed(cfg.seed)
    model = GPT(model_cfg)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr,
        betas=(cfg.beta1, cfg.beta2),
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, cfg.lr_multiplier)
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=deepspeed_config(cfg, world_size)
    )

    checkpoint_dir = Path(checkpoint_dir)
    start_step, loss_value = 0, float("nan")
    if (checkpoint_dir / "latest").is_file():
        _, client_state = engine.load_checkpoint(str(checkpoint_dir))
        start_step = int(client_state["step"])
        loss_value = float(client_state.get("loss", float("nan")))

    accum = cfg.grad_accum_steps(world_size)
    # each rank draws its own micro-batches: the seed mixes in the rank so ranks see different windows
    batches = RandomWindowBatches(train_shards, model_cfg.block_size, cfg.micro_batch_size, seed=cfg.seed * 1000 + rank)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16")
    tokens_per_step = cfg.global_batch_size * model_cfg.block_size
    flops_per_token = model_cfg.flops_per_token()

    started = time.perf_counter()
    window_start, window_tokens = time.perf_counter(), 0
    val_loss = None
    engine.train()
    for step in range(start_step, cfg.max_steps):
        step_loss = 0.0
        step_lr = scheduler.get_last_lr()[0]  # the rate this step uses; the scheduler advances inside engine.step()
        for micro in range(accum):
            window = torch.from_numpy(batches.batch(step * accum + micro)).to(device)
            with autocast:
                _, loss = engine(window[:, :-1], window[:, 1:])
            engine.backward(loss)
            engine.step()
            step_loss += loss.item() / accum
        loss_value = step_loss
        window_tokens += tokens_per_step
        done = step + 1
        if done % cfg.log_every == 0 or done == cfg.max_steps:
            elapsed = time.perf_counter() - window_start
            grad_norm = engine.get_global_grad_norm()
            metrics = {
                "train/loss": loss_value,
                "train/lr": step_lr,
                "train/grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
                "train/tokens_per_s": window_tokens / elapsed,
                "train/step_s": elapsed / max(1, window_tokens // tokens_per_step),
            }
            if cfg.peak_tflops > 0:
                metrics["train/mfu"] = metrics["train/tokens_per_s"] * flops_per_token / (cfg.peak_tflops * 1e12)
            if val_shards is not None and cfg.eval_every and done % cfg.eval_every == 0 and done < cfg.max_steps:
                val_loss = evaluate_loss(engine.module, val_shards, model_cfg.block_size, cfg.eval_windows, cfg.precision)
                metrics["val/loss"] = val_loss
            if rank == 0:
                tracker.log_metrics(metrics, done)
                if progress:
                    progress({"step": done, "max_steps": cfg.max_steps, **metrics})
            window_start, window_tokens = time.perf_counter(), 0
        if cfg.checkpoint_every and done % cfg.checkpoint_every == 0 and done < cfg.max_steps:
            _save_checkpoint(engine, checkpoint_dir, done, done * tokens_per_step, loss_value, cfg.keep_checkpoints)

    _save_checkpoint(engine, checkpoint_dir, cfg.max_steps, cfg.max_steps * tokens_per_step, loss_value, cfg.keep_checkpoints)
    if val_shards is not None:
        val_loss = evaluate_loss(engine.module, val_shards, model_cfg.block_size, cfg.eval_windows, cfg.precision)
        if rank == 0:
            tracker.log_metrics({"val/loss": val_loss}, cfg.max_steps)
    final = _consolidated_model(engine, model_cfg, cfg, checkpoint_dir)
    return TrainResult(final, cfg.max_steps, cfg.max_steps * tokens_per_step, loss_value, val_loss,
                       time.perf_counter() - started, start_step)


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


def _save_checkpoint(engine, checkpoint_dir: Path, step: int, tokens: int, loss: float, keep: int) -> None:
    tag = f"step{step:08d}"
    engine.save_checkpoint(str(checkpoint_dir), tag=tag, client_state={"step": step, "tokens": tokens, "loss": loss})
    tags = sorted(p for p in checkpoint_dir.glob("step*") if p.is_dir())
    for old in tags[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def _consolidated_model(engine, model_cfg: GPTConfig, cfg: TrainConfig, checkpoint_dir: Path) -> GPT:
    """A plain fp32 GPT with full weights, whatever the ZeRO stage sharded."""
    if cfg.zero_stage < 3:
        model = engine.module
    else:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        model = GPT(model_cfg)
        state = get_fp32_state_dict_from_zero_checkpoint(str(checkpoint_dir))
        model.load_state_dict(state, strict=False)
        if model_cfg.tie_embeddings:
            model.lm_head.weight = model.wte.weight
    return model.float().cpu().eval()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
