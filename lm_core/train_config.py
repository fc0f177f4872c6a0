"""The training configuration, and the DeepSpeed JSON derived from it (no batch size or lr written twice).

TrainConfig validates itself before any work starts (the messages name the key and the fix), says how
many ranks it asks for (`world_size`, a DeepSpeed hostfile included) and gives the lr schedule.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from lm_core.model import GPTConfig
from lm_core.stability import StabilityConfig


@dataclass
class TrainConfig:
    micro_batch_size: int = 16
    global_batch_size: int = 16  # sequences per optimizer step; accumulation = global / (micro * world)
    max_steps: int = 1000  # optimizer steps
    lr: float = 1e-3
    min_lr_ratio: float = 0.1  # the schedule decays to lr * min_lr_ratio
    warmup_steps: int = 50
    schedule: Literal["cosine", "wsd"] = "cosine"  # wsd: warmup, constant, then linear decay
    decay_fraction: float = 0.2  # wsd: the last fraction of max_steps that decays
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    # bf16: DeepSpeed's bf16 mode: parameters, activations and gradients in bf16, fp32 master weights and
    # Adam moments inside the (ZeRO-partitioned) optimizer, exported as the fp32 masters. fp16: the same with
    # fp16 and dynamic loss scaling (a GPU: DeepSpeed refuses fp16 where the device has no fp16 kernels).
    # fp32: no casting.
    precision: Literal["fp32", "bf16", "fp16"] = "bf16"
    zero_stage: int = 1
    # ZeRO's gradient reduce / parameter all-gather buckets, in elements; 0: auto (5e6 on a CPU, DeepSpeed's
    # 5e8 on a GPU; see resolved_bucket_elements)
    zero_bucket_elements: int = 0
    activation_checkpointing: bool = False  # recompute each block's activations in backward
    document_attention: bool = False  # attention stays inside each packed document (block-diagonal causal mask)
    compile: bool = False  # torch.compile the module DeepSpeed runs (static shapes); falls back to eager if it fails
    # CUDA: make any host sync inside an ordinary (non-log) step raise (torch.cuda.set_sync_debug_mode("error"));
    # a check for the engine's own hot path, used by `python -m bench gpu`. Nothing on a CPU.
    sync_check: bool = False
    seed: int = 1337
    log_every: int = 10
    eval_every: int = 0  # validation loss every N steps (0: only at the end)
    eval_windows: int = 16
    checkpoint_every: int = 0  # 0: only the final checkpoint (and one on SIGTERM/SIGINT)
    keep_checkpoints: int = 2
    num_threads: int = 0  # torch intra-op threads; 0 leaves torch's default
    peak_tflops: float = 0.0  # for MFU; 0 skips it, < 0 measures a matmul peak at start
    # ranks: 1 trains in the calling process; more start `launcher` on this node (or on every node of a
    # DeepSpeed hostfile: `host slots=N` lines), see lm_core.launch
    # a model directory (lm_core.weights format, e.g. an export) whose weights start the run instead of a
    # random init: continued pretraining; its model config must equal this run's
    init_from: str = ""
    nproc_per_node: int = 1
    launcher: Literal["torchrun", "deepspeed"] = "torchrun"
    hostfile: str = ""  # multi-node: DeepSpeed's launcher only
    stability: StabilityConfig = field(default_factory=StabilityConfig)

    def validate(self) -> None:
        for key in ("micro_batch_size", "global_batch_size", "max_steps", "log_every", "eval_windows", "keep_checkpoints"):
            if getattr(self, key) < 1:
                raise ValueError(f"train.{key}={getattr(self, key)} must be >= 1")
        if self.zero_bucket_elements < 0:
            raise ValueError(f"train.zero_bucket_elements={self.zero_bucket_elements} must be >= 0 (0: auto)")
        if self.global_batch_size % self.micro_batch_size:
            raise ValueError(
                f"train.global_batch_size={self.global_batch_size} is not divisible by train.micro_batch_size="
                f"{self.micro_batch_size}; set train.global_batch_size to a multiple of {self.micro_batch_size}"
            )
        if self.zero_stage not in (0, 1, 2, 3):
            raise ValueError(f"train.zero_stage={self.zero_stage} must be one of 0, 1, 2, 3")
        if self.precision == "fp16" and self.zero_stage == 0:
            raise ValueError("train.precision=fp16 needs train.zero_stage >= 1: DeepSpeed's ZeRO-0 fp16 optimizer "
                             "unscales gradients that its engine never scaled; set train.zero_stage=1 (or use bf16)")
        for key in ("lr", "weight_decay", "beta1", "beta2", "grad_clip", "min_lr_ratio", "decay_fraction", "peak_tflops"):
            if not math.isfinite(getattr(self, key)):
                raise ValueError(f"train.{key}={getattr(self, key)} is not a finite number; set a number, e.g. "
                                 f"train.{key}={getattr(TrainConfig, key)}")
        if self.lr <= 0 or not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"train.lr={self.lr} must be > 0 and train.min_lr_ratio={self.min_lr_ratio} in [0, 1]")
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1) or self.weight_decay < 0 or self.grad_clip < 0:
            raise ValueError(f"train.beta1={self.beta1} and train.beta2={self.beta2} must be in [0, 1), "
                             f"train.weight_decay={self.weight_decay} and train.grad_clip={self.grad_clip} >= 0")
        for key in ("eval_every", "checkpoint_every", "num_threads"):
            if getattr(self, key) < 0:
                raise ValueError(f"train.{key}={getattr(self, key)} must be >= 0 (0: {_ZERO_MEANS[key]})")
        if self.warmup_steps < 0 or self.warmup_steps > self.max_steps:
            raise ValueError(f"train.warmup_steps={self.warmup_steps} must be in [0, train.max_steps={self.max_steps}]")
        if self.schedule not in ("cosine", "wsd"):
            raise ValueError(f"train.schedule={self.schedule!r} is not supported; set train.schedule to cosine or wsd")
        if not 0 <= self.decay_fraction <= 1:
            raise ValueError(f"train.decay_fraction={self.decay_fraction} must be in [0, 1]")
        if self.nproc_per_node < 1:
            raise ValueError(f"train.nproc_per_node={self.nproc_per_node} must be >= 1")
        if self.launcher not in ("torchrun", "deepspeed"):
            raise ValueError(f"train.launcher={self.launcher!r} is not supported; set train.launcher to torchrun or deepspeed")
        if self.hostfile and self.launcher != "deepspeed":
            raise ValueError("train.hostfile needs DeepSpeed's launcher (torchrun takes no hostfile); "
                             "set train.launcher=deepspeed")
        if self.hostfile and (small := {h: n for h, n in read_hostfile(self.hostfile).items() if n < self.nproc_per_node}):
            raise ValueError(f"train.hostfile gives {small} slots, fewer than train.nproc_per_node={self.nproc_per_node}; "
                             "lower train.nproc_per_node or raise the slots")
        self.grad_accum_steps(self.world_size())
        self.stability.validate()

    def world_size(self) -> int:
        """Ranks in all: nproc_per_node on each node of the hostfile (one node without one)."""
        return self.nproc_per_node * (len(read_hostfile(self.hostfile)) if self.hostfile else 1)

    def grad_accum_steps(self, world_size: int) -> int:
        per_step = self.micro_batch_size * world_size
        if self.global_batch_size % per_step:
            raise ValueError(
                f"train.global_batch_size={self.global_batch_size} is not divisible by micro_batch_size*world_size="
                f"{self.micro_batch_size}*{world_size}; set train.global_batch_size to a multiple of {per_step}"
            )
        return self.global_batch_size // per_step

    def lr_multiplier(self, step: int) -> float:
        """Linear warmup, then cosine decay (or wsd: constant, then linear decay over the last decay_fraction)
        to min_lr_ratio; `step` counts optimizer steps from 0."""
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if self.schedule == "wsd":
            decay_steps = max(1, round(self.decay_fraction * self.max_steps))
            decay_start = max(self.warmup_steps, self.max_steps - decay_steps)
            if step < decay_start:
                return 1.0
            progress = min(1.0, (step - decay_start) / max(1, self.max_steps - decay_start))
            return 1.0 - (1.0 - self.min_lr_ratio) * progress
        progress = (step - self.warmup_steps) / max(1, self.max_steps - self.warmup_steps)
        cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        return self.min_lr_ratio + (1 - self.min_lr_ratio) * cosine


_ZERO_MEANS = {"eval_every": "validate at the end only", "checkpoint_every": "checkpoint at the end only",
               "num_threads": "torch's default"}


def read_hostfile(path: str | Path) -> dict[str, int]:
    """DeepSpeed's hostfile: one `hostname slots=N` per line (# comments): {host: slots}."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"train.hostfile={str(path)!r} does not exist; write one `hostname slots=N` line per node "
                         "(see infra/hostfile.example) or unset train.hostfile")
    hosts: dict[str, int] = {}
    for number, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        if len(parts) != 2 or not parts[1].startswith("slots=") or not parts[1][6:].isdigit():
            raise ValueError(f"{path}:{number}: {raw.strip()!r} is not `hostname slots=N`")
        hosts[parts[0]] = int(parts[1][6:])
    if not hosts:
        raise ValueError(f"train.hostfile={str(path)!r} names no host; add `hostname slots=N` lines")
    return hosts


def deepspeed_config(cfg: TrainConfig, world_size: int, device_type: str = "cpu") -> dict:
    """The DeepSpeed JSON, derived from TrainConfig so no number is written twice.

    Gradient clipping and the NaN/Inf check are not DeepSpeed's here: its versions read the gradient norm
    back to the host at every step, so lm_core.gated_adamw clips (train.grad_clip) and vetoes on the device,
    and this JSON turns DeepSpeed's off (`gradient_clipping` 0, bf16 `check_grad_overflow` false, ZeRO-1/2
    `compute_grad_norm` false). fp16's dynamic loss scaling stays DeepSpeed's (it must read its overflow flag)."""
    bucket = resolved_bucket_elements(cfg, device_type)
    zero = {"stage": cfg.zero_stage, "reduce_bucket_size": bucket, "allgather_bucket_size": bucket}
    if cfg.zero_stage in (1, 2):
        zero["compute_grad_norm"] = False
    if device_type == "cuda":
        # gradients reduced while the backward still runs (needs >1 rank to matter), into one contiguous
        # buffer so the step reads no scattered tensors
        zero.update(overlap_comm=world_size > 1, contiguous_gradients=True)
    if cfg.zero_stage == 3:
        zero.update(_zero3_limits(bucket, device_type))
    return {
        "train_batch_size": cfg.global_batch_size,
        "train_micro_batch_size_per_gpu": cfg.micro_batch_size,
        "gradient_accumulation_steps": cfg.grad_accum_steps(world_size),
        "gradient_clipping": 0.0,  # lm_core.gated_adamw clips to train.grad_clip, on the device
        "bf16": {"enabled": cfg.precision == "bf16", "check_grad_overflow": False},
        # dynamic loss scaling: start at 2^16; a step whose gradients overflow is skipped and (from the second
        # overflow on: hysteresis 2) halves the scale; 1000 clean steps double it
        **({"fp16": {"enabled": True, "loss_scale": 0, "initial_scale_power": 16, "loss_scale_window": 1000,
                     "hysteresis": 2, "min_loss_scale": 1}} if cfg.precision == "fp16" else {}),
        # ZeRO-2 turns each rank's 16-bit gradient partition into an fp32 copy for the step anyway; accumulating
        # (and reducing) gradients in fp32 from the start makes that buffer the optimizer's gradient, with no
        # 16-bit partition and no copy. ZeRO-0 (DeepSpeed allows only the model's dtype there), ZeRO-1 (fp32
        # would switch bf16 to DeepSpeed's BF16_Optimizer with full-size fp32 gradients) and ZeRO-3 (whose step
        # converts one sub-group at a time) accumulate in the model's 16-bit dtype.
        **({"data_types": {"grad_accum_dtype": "fp32"}} if cfg.precision != "fp32" and cfg.zero_stage == 2 else {}),
        "zero_optimization": zero,
        # we pass a torch AdamW (no FusedAdam JIT compile), which ZeRO calls "untested"
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }


def resolved_bucket_elements(cfg: TrainConfig, device_type: str) -> int:
    """train.zero_bucket_elements, or when 0 (auto): 5e6 elements on a CPU, where DeepSpeed's default (5e8) makes
    a bucket hold every gradient of a small model (a full-size copy per rank, undoing most of what ZeRO-2
    partitions away); DeepSpeed's default on a GPU, where fewer, larger collectives are faster."""
    if cfg.zero_bucket_elements:
        return cfg.zero_bucket_elements
    return 500_000_000 if device_type == "cuda" else 5_000_000


def _zero3_limits(elements: int, device_type: str) -> dict:
    """ZeRO-3's memory knobs. On a CPU all at the bucket size: DeepSpeed's defaults (1e9 elements) keep every
    gathered parameter alive from the forward to its reuse in the backward, which is the whole model for a
    small one; with these, a gathered parameter is released after use and fetched again, and the step works
    on sub-groups (its fp32 copy of the gradients is one sub-group, not the rank's whole partition). On a GPU
    DeepSpeed's defaults for live parameters and reuse (fetch less often) with a 5e7-element prefetch."""
    if device_type == "cuda":
        return {"stage3_prefetch_bucket_size": min(elements, 50_000_000), "sub_group_size": 1_000_000_000}
    return {"stage3_prefetch_bucket_size": elements, "stage3_max_live_parameters": elements,
            "stage3_max_reuse_distance": elements, "sub_group_size": elements}


def config_hash(model_cfg: GPTConfig, cfg: TrainConfig) -> str:
    data = {"model": dataclasses.asdict(model_cfg), "train": dataclasses.asdict(cfg)}
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]
