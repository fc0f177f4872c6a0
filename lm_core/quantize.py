"""Lighter CPU inference: the same GPT with bf16 weights, or with int8 weights (weight-only quantization);
and for fp32 on CPU, the same weights stored input-major (TransposedLinear), which batched decoding reads faster.

int8 stores every Linear weight and the token embedding as int8 with one scale per output row
(symmetric, per-channel: w ~ q * scale, q in [-127, 127]) and computes in bf16. The matmul is
PyTorch's own weight-only int8 CPU kernel, `torch._weight_int8pack_mm` (what torchao's int8
weight-only path and gpt-fast call on CPU): it reads the int8 weight directly, with no fp32 copy.
Activations are not quantized, which is what keeps the loss close to fp32's.

Why not `torch.ao.quantization.quantize_dynamic`: in torch 2.13 it still works but warns that it is
deprecated (moved to torchao), and it quantizes activations too. torchao itself is a further
dependency, and its quantize_ would untie the embedding from the head (see below).

The tied head: with tie_embeddings the (V, C) token embedding is also the output projection. Its
per-row scale is the right granularity for both uses (a row is one token's vector, and one output
channel of the head), so one int8 matrix and one scale vector serve both; the model keeps a single
copy, and weight_bytes counts it once.

fp32 on CPU: F.linear multiplies by a transposed view of the (N, K) weight. Measured on the serving
benchmark's model (4 layers, 256 wide, one thread), a decode step of 8 rows took 15-20% less time with
each weight stored once as a contiguous (K, N) matrix and multiplied as x @ w (one row: no change), so
prepare_for_inference swaps every Linear but a tied head (which shares the embedding's (V, C) rows and
would need a second copy) for a TransposedLinear. Same values, a different summation order: logits agree
to float32 rounding, not bit for bit.

Converted models are ordinary GPT modules with some submodules swapped, so they run through
lm_core.generate's one loop and lm_core.evaluation's bits_per_byte unchanged. They are inference-only.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from lm_core.model import GPT, rope_tables
from lm_core.typed_config import ConfigError

DTYPES = ("fp32", "bf16", "int8")
COMPUTE_DTYPE = torch.bfloat16  # activations of the bf16 and int8 models


def quantize_rows(weight: Tensor) -> tuple[Tensor, Tensor]:
    """(V|N, K) float weight -> int8 weight of the same shape and a per-row scale (N,) in float32."""
    w = weight.detach().float()
    scales = w.abs().amax(dim=1).clamp(min=1e-12) / 127.0  # (N,): the largest |w| in a row maps to 127
    q = torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scales


def _kernel_fits(in_features: int, out_features: int) -> bool:
    # the kernel crashed (segfault, not an exception) on shapes like K=4 or K=8/N=6 in torch 2.13; it was
    # checked on K a multiple of 16 and N a multiple of 8, which every real model width is
    return in_features % 16 == 0 and out_features % 8 == 0


class Int8Linear(nn.Module):
    """y = x @ (q * scale).T + b with q int8 (N, K) and scale (N,); computes in x's dtype."""

    def __init__(self, qweight: Tensor, scales: Tensor, bias: Tensor | None = None):
        super().__init__()
        self.out_features, self.in_features = qweight.shape
        self.register_buffer("qweight", qweight)  # (N, K) int8
        self.register_buffer("scales", scales.to(COMPUTE_DTYPE))  # (N,)
        self.bias = None if bias is None else nn.Parameter(bias.detach().to(COMPUTE_DTYPE), requires_grad=False)
        self.use_kernel = _kernel_fits(self.in_features, self.out_features)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Int8Linear:
        q, scales = quantize_rows(linear.weight)
        return cls(q, scales, linear.bias)

    def forward(self, x: Tensor) -> Tensor:
        x = x.to(self.scales.dtype)
        if self.use_kernel:
            y = torch._weight_int8pack_mm(x.reshape(-1, self.in_features).contiguous(), self.qweight, self.scales)
            y = y.view(*x.shape[:-1], self.out_features)
        else:  # odd tiny shapes only: dequantize (costs a float copy of this one weight per call)
            y = F.linear(x, self.qweight.to(x.dtype) * self.scales[:, None])
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 per-row"


class TransposedLinear(nn.Module):
    """y = x @ w + b with w the Linear's weight stored transposed, (K, N) contiguous (see the module doc)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.out_features, self.in_features = linear.weight.shape
        self.weight_t = nn.Parameter(linear.weight.detach().t().contiguous(), requires_grad=False)  # (K, N)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach(), requires_grad=False)

    def forward(self, x: Tensor) -> Tensor:
        y = x @ self.weight_t
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, weight stored (in, out)"


class Int8Embedding(nn.Module):
    """Embedding lookup from int8 rows: x[b, t] = q[idx] * scale[idx], in bf16."""

    def __init__(self, qweight: Tensor, scales: Tensor):
        super().__init__()
        self.register_buffer("qweight", qweight)  # (V, C) int8
        self.register_buffer("scales", scales.to(COMPUTE_DTYPE))  # (V,)

    def forward(self, idx: Tensor) -> Tensor:
        rows = F.embedding(idx, self.qweight)  # (B, T, C) int8
        return rows.to(self.scales.dtype) * self.scales[idx].unsqueeze(-1)

    def dequantized(self) -> Tensor:
        return self.qweight.float() * self.scales.float()[:, None]  # (V, C)


def prepare_for_inference(model: GPT, dtype: str) -> GPT:
    """The model converted in place for `dtype` inference ("fp32" | "bf16" | "int8") and put in eval mode."""
    if dtype not in DTYPES:
        raise ConfigError(f"dtype={dtype!r} is not supported; pass --dtype as one of {', '.join(DTYPES)}")
    model.eval().requires_grad_(False)
    if dtype == "fp32":
        if model.norm_f.weight.device.type == "cpu":
            _swap_linears(model, TransposedLinear)
        return model
    if dtype == "int8":
        _quantize_int8(model)
    model.to(COMPUTE_DTYPE)  # norms, biases and scales; int8 buffers keep their dtype
    if model.cfg.pos == "rope":
        # the angle tables stay float32: rounding cos/sin of large angles to bf16 would shift positions
        cos, sin = rope_tables(model.cfg, device=model.rope_cos.device)
        model.rope_cos, model.rope_sin = cos, sin
    return model


def _quantize_int8(model: GPT) -> None:
    tied = model.cfg.tie_embeddings and model.lm_head.weight is model.wte.weight
    wte_q, wte_scales = quantize_rows(model.wte.weight)
    model.wte = Int8Embedding(wte_q, wte_scales)
    # the head shares the embedding's int8 rows and scales when tied: one copy in memory, as in fp32
    model.lm_head = (Int8Linear(model.wte.qweight, model.wte.scales) if tied
                     else Int8Linear.from_linear(model.lm_head))
    _swap_linears(model, Int8Linear.from_linear)


def _swap_linears(model: GPT, convert) -> None:
    """Replace every block's Linear, and an untied head, by convert(linear)."""
    if isinstance(model.lm_head, nn.Linear) and model.lm_head.weight is not model.wte.weight:
        model.lm_head = convert(model.lm_head)
    for block in model.blocks:
        for parent in (block.attn, block.mlp):
            for name, child in list(parent.named_children()):
                if isinstance(child, nn.Linear):
                    setattr(parent, name, convert(child))


def weight_bytes(model: nn.Module) -> dict[str, int]:
    """Bytes of the weights the model holds: parameters and persistent buffers, each storage counted once
    (a tied embedding/head is one matrix). `embedding` is the token embedding (+ head when tied)."""
    persistent = {name for name, _ in model.named_buffers()} - _non_persistent(model)
    tensors = [t for _, t in model.named_parameters(remove_duplicate=False)]
    tensors += [t for name, t in model.named_buffers(remove_duplicate=False) if name in persistent]
    seen: dict[int, int] = {}
    for t in tensors:
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    wte = model.wte
    emb = [wte.weight] if isinstance(wte, nn.Embedding) else [wte.qweight, wte.scales]
    return {"total": sum(seen.values()), "embedding": sum(t.untyped_storage().nbytes() for t in emb)}


def _non_persistent(model: nn.Module) -> set[str]:
    names = set()
    for prefix, module in model.named_modules():
        for name in getattr(module, "_non_persistent_buffers_set", ()):
            names.add(f"{prefix}.{name}" if prefix else name)
    return names
