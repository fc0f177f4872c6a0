"""A small decoder-only GPT: config and the model, in one readable file (its KV cache: lm_core.kv_cache).

Defaults follow the modern Llama-style recipe (RoPE, RMSNorm, SwiGLU, no biases, tied embeddings);
the classic GPT-2 pieces (learned positions, LayerNorm, GELU) are config switches so the two can be
compared on equal footing. Module names mirror Llama's (q_proj, gate_proj, ...) so checkpoints can be
mapped to Hugging Face layouts by renaming keys alone.

Shape letters: B batch, T new tokens, S attended positions (cache + new), C n_embd,
H query heads, K kv heads, D head_dim, V vocab.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from lm_core.kv_cache import CacheAccess
from lm_core.typed_config import ConfigError  # a ValueError; lets the pipeline report all config errors alike

# Model shapes by name, from the CI model to GPT-2 small and medium. The gpt2-* presets are GPT-2's own
# recipe (learned positions, LayerNorm, GELU, biases, 1024 tokens of context): 124M / 355M parameters
# with GPT-2's 50257-token vocabulary (the vocabulary size comes from the tokenizer; embeddings scale
# with it). Any key set next to a preset wins over it.
PRESETS: dict[str, dict] = {
    "tiny": dict(n_layer=2, n_head=4, n_embd=64, block_size=64),
    "small": dict(n_layer=4, n_head=4, n_embd=256, block_size=256),
    "gpt2-124m": dict(n_layer=12, n_head=12, n_embd=768, block_size=1024, pos="learned", norm="layernorm", mlp="gelu",
                      bias=True),
    "gpt2-350m": dict(n_layer=24, n_head=16, n_embd=1024, block_size=1024, pos="learned", norm="layernorm",
                      mlp="gelu", bias=True),
}


def preset_fields(name: str) -> dict:
    """The GPTConfig fields a named shape (PRESETS) sets."""
    if name not in PRESETS:
        raise ConfigError(f"model.preset={name!r} is not a preset; choose one of {', '.join(PRESETS)}")
    return dict(PRESETS[name])


def preset(name: str, **overrides) -> GPTConfig:
    """The GPTConfig of a named shape, with `overrides` on top."""
    return GPTConfig(**{**preset_fields(name), **overrides})


@dataclass
class GPTConfig:
    vocab_size: int = 4096
    block_size: int = 256  # max context length
    n_layer: int = 4
    n_head: int = 4
    n_kv_head: int | None = None  # grouped-query attention; None means n_head
    n_embd: int = 256
    mlp: str = "swiglu"  # "swiglu" | "gelu"
    mlp_hidden: int | None = None  # None: 4*n_embd for gelu; 8/3*n_embd rounded up to a multiple of 64 for swiglu
    norm: str = "rmsnorm"  # "rmsnorm" | "layernorm"
    pos: str = "rope"  # "rope" | "learned"
    rope_theta: float = 10000.0
    dropout: float = 0.0
    bias: bool = False  # biases in linears and LayerNorm (RMSNorm never has one)
    tie_embeddings: bool = True
    norm_eps: float = 1e-5

    def validate(self) -> None:
        def fail(msg: str) -> None:
            raise ConfigError(msg)

        for key in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd", "n_kv_head", "mlp_hidden"):
            value = getattr(self, key)
            if value is None and key in ("n_kv_head", "mlp_hidden"):
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                fail(f"model.{key}={value!r} must be a positive integer; set model.{key} to e.g. 1 or more")
        choices = {"mlp": ("swiglu", "gelu"), "norm": ("rmsnorm", "layernorm"), "pos": ("rope", "learned")}
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                fail(f"model.{key}={getattr(self, key)!r} is not supported; "
                     f"set model.{key} to one of {', '.join(allowed)}")
        if self.n_embd % self.n_head:
            fail(f"model.n_embd={self.n_embd} is not divisible by model.n_head={self.n_head}; "
                 f"set model.n_embd to a multiple of {self.n_head}")
        if self.pos == "rope" and self.head_dim % 2:
            fail(f"model.n_embd/model.n_head={self.head_dim} must be even for rope (pairs of dims rotate together); "
                 f"set model.n_embd to a multiple of {2 * self.n_head} or use model.pos=learned")
        if self.n_head % self.kv_heads:
            fail(f"model.n_head={self.n_head} is not divisible by model.n_kv_head={self.n_kv_head}; "
                 f"set model.n_kv_head to a divisor of {self.n_head}")
        if not 0.0 <= self.dropout < 1.0:
            fail(f"model.dropout={self.dropout} must be in [0, 1); set model.dropout to e.g. 0.0 or 0.1")
        for key in ("rope_theta", "norm_eps"):
            if not getattr(self, key) > 0:
                fail(f"model.{key}={getattr(self, key)} must be > 0; set model.{key} to a positive number")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def kv_heads(self) -> int:
        return self.n_head if self.n_kv_head is None else self.n_kv_head

    @property
    def hidden_dim(self) -> int:
        """The resolved MLP width. SwiGLU has three matrices instead of two, so 8/3*C keeps params ~ GELU's 4*C."""
        if self.mlp_hidden is not None:
            return self.mlp_hidden
        if self.mlp == "gelu":
            return 4 * self.n_embd
        return 64 * math.ceil(round(8 * self.n_embd / 3) / 64)

    def num_params(self, exclude_embeddings: bool = False) -> int:
        """Parameter count from config arithmetic alone (no model needed, e.g. for sizing sweeps).

        exclude_embeddings drops the lookup tables wte and wpe (the Kaplan "non-embedding" N);
        an untied lm_head stays counted, a tied one is wte and goes with it.
        """
        C, D, L = self.n_embd, self.head_dim, self.n_layer
        b = int(self.bias)
        linear = lambda n_in, n_out: n_in * n_out + b * n_out  # noqa: E731
        norm = C * (2 if self.norm == "layernorm" and self.bias else 1)
        attn = linear(C, self.n_head * D) + 2 * linear(C, self.kv_heads * D) + linear(self.n_head * D, C)
        n_mats = 3 if self.mlp == "swiglu" else 2
        mlp = (n_mats - 1) * linear(C, self.hidden_dim) + linear(self.hidden_dim, C)
        total = L * (attn + mlp + 2 * norm) + norm  # + final norm
        embeddings = self.vocab_size * C + (self.block_size * C if self.pos == "learned" else 0)
        lm_head = 0 if self.tie_embeddings else self.vocab_size * C
        return total + lm_head + (0 if exclude_embeddings else embeddings)

    def flops_per_token(self) -> int:
        """Training FLOPs per token (forward + backward), nanoGPT/Chinchilla style.

        6 per weight that takes part in a matmul, plus the attention score/value matmuls
        (12 * L * C * T at full context). A tied lm_head is excluded from num_params(True) but still
        does a V x C matmul per token, so it is added back here.
        """
        matmul_params = self.num_params(exclude_embeddings=True)
        if self.tie_embeddings:
            matmul_params += self.vocab_size * self.n_embd
        return 6 * matmul_params + 12 * self.n_layer * self.n_embd * self.block_size


def rope_tables(cfg: GPTConfig, device=None) -> tuple[Tensor, Tensor]:
    """cos, sin of shape (block_size, D/2): the rotation angle of each (position, frequency) pair."""
    dims = torch.arange(0, cfg.head_dim, 2, dtype=torch.float32, device=device)  # (D/2,)
    inv_freq = 1.0 / (cfg.rope_theta ** (dims / cfg.head_dim))
    angles = torch.outer(torch.arange(cfg.block_size, dtype=torch.float32, device=device), inv_freq)
    return angles.cos(), angles.sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate x (B, T, H, D) by position. Uses the "rotate half" pairing (dim i with i + D/2), as
    Hugging Face Llama does, so Llama q/k weights load without permuting."""
    x1, x2 = x.chunk(2, dim=-1)  # (B, T, H, D/2) each
    if cos.dim() == 2:
        cos, sin = cos[None, :, None, :], sin[None, :, None, :]  # (1, T, 1, D/2)
    else:
        cos, sin = cos[:, :, None, :], sin[:, :, None, :]  # per-row positions: (B, T, 1, D/2)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).type_as(x)


def make_norm(cfg: GPTConfig) -> nn.Module:
    if cfg.norm == "rmsnorm":
        return nn.RMSNorm(cfg.n_embd, eps=cfg.norm_eps)
    return nn.LayerNorm(cfg.n_embd, eps=cfg.norm_eps, bias=cfg.bias)


class Attention(nn.Module):
    def __init__(self, cfg: GPTConfig, layer: int):
        super().__init__()
        self.layer, self.n_head, self.n_kv_head, self.head_dim = layer, cfg.n_head, cfg.kv_heads, cfg.head_dim
        self.use_rope = cfg.pos == "rope"
        # separate projections (not fused qkv) map 1:1 onto Llama checkpoints
        self.q_proj = nn.Linear(cfg.n_embd, cfg.n_head * cfg.head_dim, bias=cfg.bias)
        self.k_proj = nn.Linear(cfg.n_embd, cfg.kv_heads * cfg.head_dim, bias=cfg.bias)
        self.v_proj = nn.Linear(cfg.n_embd, cfg.kv_heads * cfg.head_dim, bias=cfg.bias)
        self.o_proj = nn.Linear(cfg.n_head * cfg.head_dim, cfg.n_embd, bias=cfg.bias)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, cache: CacheAccess | None = None,
                mask: Tensor | bool | None = None, positions: Tensor | None = None) -> Tensor:
        """mask: (B, 1, T, S) bool; None for plain causal attention; False for none (every key visible).
        positions (B, T) or (T,): the cache positions of the new tokens (with a cache only)."""
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.head_dim)  # (B, T, H, D)
        k = self.k_proj(x).view(B, T, self.n_kv_head, self.head_dim)  # (B, T, K, D)
        v = self.v_proj(x).view(B, T, self.n_kv_head, self.head_dim)
        if self.use_rope:
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H|K, T, D)
        gqa = self.n_kv_head != self.n_head
        if cache is not None:
            window = cache.window or cache.cache.k.size(3)
            k, v = cache.cache.write_and_read(self.layer, k, v, positions, cache.slots, window,
                                              cache.common_start)  # (B, K, S, D)
        if mask is None:  # queries and keys cover the same positions: the plain causal mask is right (and fastest)
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        elif mask is False:
            y = F.scaled_dot_product_attention(q, k, v, enable_gqa=gqa)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
        y = y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim)  # (B, T, H*D)
        return self.dropout(self.o_proj(y))


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.kind, hidden = cfg.mlp, cfg.hidden_dim
        if cfg.mlp == "swiglu":
            self.gate_proj = nn.Linear(cfg.n_embd, hidden, bias=cfg.bias)
            self.up_proj = nn.Linear(cfg.n_embd, hidden, bias=cfg.bias)
            self.down_proj = nn.Linear(hidden, cfg.n_embd, bias=cfg.bias)
        else:
            self.fc = nn.Linear(cfg.n_embd, hidden, bias=cfg.bias)
            self.proj = nn.Linear(hidden, cfg.n_embd, bias=cfg.bias)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor) -> Tensor:
        if self.kind == "swiglu":
            h = F.silu(self.gate_proj(x)) * self.up_proj(x)  # (B, T, hidden)
            return self.dropout(self.down_proj(h))
        return self.dropout(self.proj(F.gelu(self.fc(x))))

    @property
    def out_proj(self) -> nn.Linear:
        return self.down_proj if self.kind == "swiglu" else self.proj


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig, layer: int):
        super().__init__()
        self.attn_norm = make_norm(cfg)
        self.attn = Attention(cfg, layer)
        self.mlp_norm = make_norm(cfg)
        self.mlp = MLP(cfg)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, cache: CacheAccess | None = None,
                mask: Tensor | bool | None = None, positions: Tensor | None = None) -> Tensor:
        x = x + self.attn(self.attn_norm(x), cos, sin, cache, mask, positions)
        return x + self.mlp(self.mlp_norm(x))


class GPT(nn.Module):
    activation_checkpointing = False  # the training engine sets it from train.activation_checkpointing

    def __init__(self, cfg: GPTConfig, init: bool = True):
        """init=False leaves the weights as their modules made them (lm_core.zero_adapter initialises a
        ZeRO-3-partitioned model one gathered module at a time with `init_module`)."""
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd) if cfg.pos == "learned" else None
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer))
        self.norm_f = make_norm(cfg)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.wte.weight  # one Parameter, two uses
        # RoPE tables are derived from the config, so keep them out of state_dict (non-persistent)
        cos, sin = rope_tables(cfg) if cfg.pos == "rope" else (torch.empty(0), torch.empty(0))
        self.register_buffer("rope_cos", cos, persistent=False)  # (block_size, D/2)
        self.register_buffer("rope_sin", sin, persistent=False)
        if init:
            self.init_weights()

    @torch.no_grad()
    def init_weights(self, seed: int | None = None) -> None:
        """Deterministic given `seed` (uses the global RNG when None). Residual output projections get
        std / sqrt(2 * n_layer) because 2 * n_layer of them add into the residual stream (GPT-2)."""
        gen = None
        if seed is not None:
            gen = torch.Generator(device=self.wte.weight.device).manual_seed(seed)
        for module in self.modules():  # fixed order, so the same seed gives the same weights
            self.init_module(module, gen)
        if self.cfg.pos == "rope":  # recompute too, so a model built on the meta device and moved is valid
            cos, sin = rope_tables(self.cfg, device=self.rope_cos.device)
            self.rope_cos.copy_(cos)
            self.rope_sin.copy_(sin)

    @torch.no_grad()
    def init_module(self, module: nn.Module, gen: torch.Generator | None = None) -> None:
        """Initialise one submodule's own weights (not its children's)."""
        std, resid_std = 0.02, 0.02 / math.sqrt(2 * self.cfg.n_layer)
        if isinstance(module, nn.Linear):
            if module is self.lm_head and self.cfg.tie_embeddings:
                return  # its weight is wte's, initialised once as an embedding
            residual = any(module is b.attn.o_proj or module is b.mlp.out_proj for b in self.blocks)
            nn.init.normal_(module.weight, 0.0, resid_std if residual else std, generator=gen)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, 0.0, std, generator=gen)
        elif isinstance(module, (nn.RMSNorm, nn.LayerNorm)):
            nn.init.ones_(module.weight)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)

    def forward(self, idx: Tensor, targets: Tensor | None = None, *, cache: CacheAccess | None = None,
                logits_at: Tensor | None = None, reduction: str = "mean",
                segments: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """cache, optional: run the new tokens idx (B, T) at positions in a KVCache (see CacheAccess); each row
        attends to its own slot's keys up to its own position, so rows of different lengths batch together.
        The caller keeps positions inside the cache and the context (lm_core.generation_engine does); checking
        them here would read the device's start positions back on every step.

        logits_at (B,) long, optional: compute logits only at this index of each row, (B, 1, V) (a right-padded
        prefill wants each prompt's last position only; the head is the largest matmul of a small model).

        segments (B, T) int, optional, no cache: the document each token belongs to; a token then attends
        only to earlier tokens of its own document (block-diagonal causal attention over packed windows)."""
        B, T = idx.shape
        if cache is None and T > self.cfg.block_size:
            raise ValueError(f"sequence of {T} tokens exceeds model.block_size={self.cfg.block_size}; crop the input")
        x = self.wte(idx)  # (B, T, C)
        positions, mask = torch.arange(T, device=idx.device), None  # (T,)
        if cache is not None:
            if segments is not None:
                raise ValueError("segments (document-boundary attention) is for training windows, not a KV cache")
            positions, mask = cache.positions_and_mask(T, idx.device)
        if segments is not None:
            causal = torch.ones(T, T, dtype=torch.bool, device=idx.device).tril()  # (T, T)
            same_doc = segments[:, :, None] == segments[:, None, :]  # (B, T, T); the diagonal keeps rows finite
            mask = (causal[None] & same_doc)[:, None]  # (B, 1, T, T)
        # the scratch column may sit one past the last position: clamp the table lookups (its output is unused)
        lookup = positions.clamp(max=self.cfg.block_size - 1)
        if self.wpe is not None:
            x = x + self.wpe(lookup)
        cos, sin = self.rope_cos, self.rope_sin  # empty without rope
        if self.cfg.pos == "rope":
            cos, sin = cos[lookup], sin[lookup]  # (T, D/2), or (B, T, D/2) with a cache
        for block in self.blocks:
            if self.activation_checkpointing and self.training and cache is None and torch.is_grad_enabled():
                # keep only the block's input; backward recomputes its activations (memory for ~1/3 more compute)
                x = torch.utils.checkpoint.checkpoint(block, x, cos, sin, None, mask, use_reentrant=False)
            else:
                x = block(x, cos, sin, cache, mask, positions if cache is not None else None)
        if logits_at is not None:
            x = x[torch.arange(B, device=idx.device), logits_at][:, None]  # (B, 1, C)
        logits = self.lm_head(self.norm_f(x)).float()  # (B, T, V); float32 so softmax/CE are stable under bf16
        if targets is None:
            return logits, None
        loss = F.cross_entropy(logits.view(B * T, -1), targets.reshape(B * T), ignore_index=-1, reduction=reduction)
        return logits, loss.view(B, T) if reduction == "none" else loss
