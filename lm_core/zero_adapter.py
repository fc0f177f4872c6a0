"""The one module that touches DeepSpeed: start-up, the engine, and the internals lmforge relies on.

A DeepSpeed upgrade is this file's problem. What it reaches into, and why:
- the shared-memory comm op that every first `init_distributed` JIT-compiles (~90 s) and gloo never uses;
- the pre-clip gradient norm before the optimizer steps (ZeRO-1/2: `scaled_global_norm` of the reduced
  partitions; ZeRO-3: the norm its step computes before stepping the sub-groups);
- a step with no host read: DeepSpeed's clipping and overflow checks read the norm back every step, so
  clipping and the NaN/spike veto happen on the device in lm_core.gated_adamw instead; the JSON turns
  DeepSpeed's off (lm_core.train_config), and two places the JSON cannot reach are replaced here: the
  ZeRO-0 16-bit optimizer's step and ZeRO-3's host check of the norm;
- the tensors the optimizer stepped (for the update/param ratio) and the fp32 master weights (the model
  handed back), which live in different places at every stage.
"""

from __future__ import annotations

import importlib
import logging
import os
import socket
from pathlib import Path

import torch

from lm_core.gated_adamw import GatedAdamW
from lm_core.model import GPT, GPTConfig
from lm_core.train_config import TrainConfig, deepspeed_config

log = logging.getLogger(__name__)


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


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now (for a rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed() -> int:
    """Initialise torch.distributed for DeepSpeed; a process with no launcher becomes rank 0 of 1."""
    import deepspeed

    if "WORLD_SIZE" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    # NOTE: DeepSpeed JIT-compiles a shared-memory comm op (~90 s) at first init; gloo never uses it.
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    deepspeed.init_distributed(dist_backend="gloo" if not torch.cuda.is_available() else "nccl", verbose=False)
    return int(os.environ["WORLD_SIZE"])


def build_model(model_cfg: GPTConfig, cfg: TrainConfig, world_size: int, device: torch.device,
                state: dict[str, torch.Tensor] | None = None) -> GPT:
    """The GPT to train, with `state` (train.init_from's weights) or a fresh init. ZeRO-3 builds it inside
    `deepspeed.zero.Init`, so each rank only ever holds its partition of the weights; they are filled one
    module at a time, gathered, with the values a plain build gives on the same device."""
    if cfg.zero_stage != 3:
        model = GPT(model_cfg)
        if state is not None:
            model.load_state_dict(state)
        return model
    import deepspeed
    import torch._dynamo  # noqa: F401 - its first import checks torch.Tensor.__new__, which zero.Init replaces

    with deepspeed.zero.Init(config_dict_or_path=deepspeed_config(cfg, world_size, device.type)):
        model = GPT(model_cfg, init=False)
    for prefix, module in model.named_modules():  # GPT.init_weights' order: the global RNG draws the same values
        params = dict(module.named_parameters(prefix=prefix, recurse=False))
        with deepspeed.zero.GatheredParameters(list(params.values()), modifier_rank=0, enabled=bool(params)):
            if state is None:
                model.init_module(module)
            else:
                with torch.no_grad():
                    for name, param in params.items():
                        param.copy_(state[name])
    return model


def full_ndim(param: torch.nn.Parameter) -> int:
    """The parameter's number of dimensions; a ZeRO-3 partitioned one keeps its full shape in `ds_shape`."""
    return len(getattr(param, "ds_shape", param.shape))


class ZeroEngine:
    """A DeepSpeed engine around the GPT and a GatedAdamW, with the pieces the training loop needs."""

    def __init__(self, model: GPT, optimizer: GatedAdamW, scheduler, cfg: TrainConfig, world_size: int,
                 device: torch.device):
        import deepspeed

        self.cfg, self.world_size, self.device, self.optimizer = cfg, world_size, device, optimizer
        self.engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                                    config=deepspeed_config(cfg, world_size, device.type))
        if world_size == 1 and cfg.zero_stage == 0:
            # one rank has nothing to average with: skip flattening every gradient into a bucket, an all-reduce
            # with itself and copying back (ZeRO 1-3 collect their partitions in that step, so they keep it)
            self.engine.enable_backward_allreduce = False
        if cfg.zero_stage == 0 and cfg.precision != "fp32":
            _replace_zero0_lowp_step(self.engine.optimizer)
        if cfg.zero_stage == 3:
            _zero3_norm_on_device(self.engine.optimizer, world_size)
        self._norm: torch.Tensor | None = None

    @property
    def module(self) -> GPT:
        return self.engine.module

    def forward(self, inputs: torch.Tensor, targets: torch.Tensor, segments: torch.Tensor | None) -> torch.Tensor:
        _, loss = self.engine(inputs, targets, segments=segments)
        return loss

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)
        if not self.engine.is_gradient_accumulation_boundary():
            self.engine.step()  # DeepSpeed counts micro-batches in step(); it updates only at the boundary

    def grad_norm(self) -> torch.Tensor:
        """The global pre-clip gradient norm of this step (device, loss scale divided out). ZeRO-0/1/2 measure
        it at the accumulation boundary (`boundary`); ZeRO-3 inside its step, before the sub-groups step."""
        if self.cfg.zero_stage == 3:
            return torch.as_tensor(self.engine.optimizer._global_grad_norm, device=self.device).float()
        assert self._norm is not None, "ZeroEngine.boundary() measures the norm before step()"
        return self._norm

    def boundary(self) -> None:
        """After the last micro-batch's backward: gradients are reduced, the update not yet applied."""
        if self.cfg.zero_stage == 0:
            grads = [p.grad for p in self.module.parameters() if p.grad is not None]
            self._norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads, 2, dtype=torch.float32)))
        elif self.cfg.zero_stage in (1, 2):
            self._norm = _partitioned_grad_norm(self.engine.optimizer, self.world_size)
        if self._norm is not None and self.loss_scale is not None:
            self._norm = self._norm / self.loss_scale

    def step(self) -> bool:
        """Apply the update; False when DeepSpeed itself skipped it (fp16 loss-scale overflow: a host flag
        DeepSpeed has already read). A veto by the spike gate is not seen here (it stays on the device)."""
        self.engine.step()
        self._norm = None
        return self.engine.was_step_applied()

    @property
    def loss_scale(self) -> float | None:
        return float(self.engine.optimizer.loss_scale) if self.cfg.precision == "fp16" else None

    def stepped_tensors(self) -> list[tuple[torch.Tensor, int]]:
        """(tensor the optimizer stepped, its param group) pairs: the fp32 masters, or this rank's partitions."""
        if self.cfg.zero_stage == 3:  # ZeRO-3 hands the optimizer one sub-group at a time and empties the groups after
            zero = self.engine.optimizer
            return [(flat, zero.sub_group_to_group_id[i]) for i, flat in enumerate(zero.fp32_partitioned_groups_flat)]
        return [(p, index) for index, group in enumerate(self.optimizer.param_groups) for p in group["params"]]

    def compile(self, probe: tuple[int, int], segments: bool) -> str | None:
        """DeepSpeed's own compile of the module it runs, with static shapes, tried on one batch of the training
        shape (so the first step does not recompile); eager on failure. Returns why it fell back, or None."""
        module = self.module
        try:
            self.engine.compile(compile_kwargs={"dynamic": False})
            tokens = torch.zeros(probe, dtype=torch.long, device=self.device)
            module(tokens, tokens, segments=torch.zeros_like(tokens) if segments else None)
            return None
        except Exception as exc:  # noqa: BLE001 - any backend failure means: run eager
            module._compiled_call_impl = None  # what nn.Module.compile set
            self.engine._is_compiled = False
            return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"

    def consolidated_model(self, model_cfg: GPTConfig, checkpoint_dir: Path) -> GPT:
        """A plain fp32 GPT with the full fp32 weights, whatever ZeRO sharded: in 16-bit modes these are the
        optimizer's master weights, not the copies the forward ran on. Every rank calls it (ZeRO-1/2 gather)."""
        if self.cfg.zero_stage == 3:
            from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

            model = GPT(model_cfg)
            model.load_state_dict(get_fp32_state_dict_from_zero_checkpoint(str(checkpoint_dir)), strict=False)
            if model_cfg.tie_embeddings:
                model.lm_head.weight = model.wte.weight
            return model.float().cpu().eval()
        model = self.module
        if self.cfg.precision != "fp32":
            masters = self._fp32_masters()
            model.float()  # in place: the same Parameter objects, now fp32
            with torch.no_grad():
                for param, master in zip(model.parameters(), masters):
                    param.copy_(master.view_as(param))
        return model.cpu().eval()

    def _fp32_masters(self) -> list[torch.Tensor]:
        """The fp32 master weight of each parameter of the module (in parameters() order), full size."""
        params = list(self.module.parameters())
        if self.cfg.zero_stage == 0:  # DeepSpeed's unfused 16-bit optimizer: one fp32 tensor per parameter
            opt = self.engine.optimizer
            master_of = {id(low): high for lows, highs in zip(opt.fp16_groups, opt.fp32_groups) for low, high in zip(lows, highs)}
            return [master_of[id(p)] for p in params]
        from deepspeed.utils import safe_get_full_fp32_param

        return [safe_get_full_fp32_param(p) for p in params]  # ZeRO-1/2: gathers the rank partitions


def _as_list(grads) -> list[torch.Tensor]:
    return [grads] if torch.is_tensor(grads) else [g for g in grads if g is not None]


def _replace_zero0_lowp_step(unfused) -> None:
    """ZeRO-0 in bf16/fp16 runs DeepSpeed's FP16_UnfusedOptimizer, whose step checks every gradient for
    overflow and computes the norm on the host (about 30 reads per step). The replacement does what is left
    when the gated optimizer clips and vetoes on the device: 16-bit gradients into persistent fp32 gradient
    buffers, the optimizer step on the fp32 masters, the masters copied back into the 16-bit weights."""
    lows = [p for group in unfused.fp16_groups for p in group]
    highs = [p for group in unfused.fp32_groups for p in group]
    grads = [torch.zeros_like(h) for h in highs]

    @torch.no_grad()
    def step(closure=None):
        torch._foreach_copy_(grads, [p.grad if p.grad is not None else torch.zeros_like(p) for p in lows])
        for high, grad in zip(highs, grads):
            high.grad = grad
        unfused.optimizer.step()
        torch._foreach_copy_(lows, highs)
        unfused.overflow = False
        return False

    unfused.step = step


def _partitioned_grad_norm(zero, world_size: int) -> torch.Tensor:
    """The global norm of ZeRO-1/2/3's reduced gradient partitions: this rank's, summed over the ranks.
    DeepSpeed's own helper computes the same but builds a tensor from a host value on every call (a
    blocking upload on a GPU)."""
    grads = [g for i in sorted(zero.averaged_gradients) for g in _as_list(zero.averaged_gradients[i])]
    squares = torch.stack(torch._foreach_norm(grads, 2, dtype=torch.float32)).square().sum()
    if world_size > 1:
        torch.distributed.all_reduce(squares, group=zero.dp_process_group)
    return squares.sqrt()


def _zero3_norm_on_device(zero, world_size: int) -> None:
    """ZeRO-3 computes the gradient norm inside its step: with DeepSpeed's helper (a host upload, above), and
    then asks `is_invalid_grad_norm(norm)` on the host before stepping the sub-groups. The instance gets our
    norm; tensors skip the host check, since the gated optimizer already vetoes a step whose norm is not
    finite on the device (fp16 overflow is still caught first by DeepSpeed's own gradient check)."""
    zero._get_norm_groups = lambda: [_partitioned_grad_norm(zero, world_size)]
    stage3 = importlib.import_module("deepspeed.runtime.zero.stage3")
    original = stage3.is_invalid_grad_norm
    if getattr(original, "lmforge_on_device", False):
        return

    def is_invalid_grad_norm(norm) -> bool:
        return False if torch.is_tensor(norm) else original(norm)

    is_invalid_grad_norm.lmforge_on_device = True
    stage3.is_invalid_grad_norm = is_invalid_grad_norm
