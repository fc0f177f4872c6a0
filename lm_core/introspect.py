"""Looking inside a trained GPT: nearest tokens in embedding space, and attention maps.

Attention maps without touching the model's fast path: SDPA never materialises the attention
probabilities, so forward hooks capture each layer's q and k projections during one plain forward
(no cache, no padding: positions 0..T-1) and the probabilities are recomputed from them exactly as
the model's Attention does (RoPE, 1/sqrt(D) scaling, causal mask, grouped-query heads shared).
A test checks that these probabilities times v give back what SDPA gave the output projection.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from lm_core.model import GPT, apply_rope

SPACE = "\u2581"  # SentencePiece's visible space


def embedding_matrix(model: GPT) -> Tensor:
    """(V, C) float32 token embeddings (dequantized for an int8 model)."""
    wte = model.wte
    weight = wte.dequantized() if hasattr(wte, "dequantized") else wte.weight
    return weight.detach().float()


@torch.no_grad()
def nearest_tokens(embeddings: Tensor, token_id: int, k: int = 10) -> list[tuple[int, float]]:
    """The k tokens whose embeddings (V, C) have the highest cosine similarity to token_id's, itself excluded,
    as (id, cosine) pairs, most similar first."""
    V = embeddings.size(0)
    if not 0 <= token_id < V:
        raise ValueError(f"token id {token_id} is outside the vocabulary (0..{V - 1})")
    if k < 1:
        raise ValueError(f"k={k} must be >= 1; pass --k 10 for example")
    unit = F.normalize(embeddings.float(), dim=-1)  # (V, C)
    sims = unit @ unit[token_id]  # (V,)
    sims[token_id] = -math.inf
    top = torch.topk(sims, min(k, V - 1))
    return [(int(i), float(s)) for s, i in zip(top.values, top.indices)]


def surface_variants(word: str) -> list[str]:
    """The case and leading-space variants of a word as SentencePiece pieces: word, Word, WORD, and each
    with a leading space (the tokenizer has no dummy prefix, so " the" is the piece '▁the')."""
    bare = word.lstrip(SPACE + " ")
    forms = dict.fromkeys([bare, bare.lower(), bare.capitalize(), bare.upper()])
    return list(dict.fromkeys([*forms, *(SPACE + f for f in forms)]))


def resolve_token(word: str, piece_to_id: Callable[[str], int | None], encode: Callable[[str], list[int]]) -> int:
    """The one token id for `word`: the piece itself (a leading space may be written ' ' or '▁'), else its
    encoding when that is a single token. Raises ValueError naming the pieces when it is several tokens."""
    piece = word.replace(" ", SPACE)
    found = piece_to_id(piece)
    if found is not None:
        return found
    ids = encode(word)
    if len(ids) == 1:
        return ids[0]
    raise ValueError(f"{word!r} is {len(ids)} tokens, not one; pass a single piece, e.g. one of its "
                     f"{len(ids)} parts, or a shorter or more common word")


@torch.no_grad()
def attention_maps(model: GPT, ids: list[int]) -> Tensor:
    """Attention probabilities (n_layer, n_head, T, T) of one forward pass over `ids`; row i is what
    query position i attends to (a causal row: zeros after i)."""
    T = len(ids)
    if not 0 < T <= model.cfg.block_size:
        raise ValueError(f"a prompt of {T} tokens does not fit; give 1..{model.cfg.block_size} tokens (model.block_size)")
    captured: dict[int, dict[str, Tensor]] = {}
    handles = []
    for i, block in enumerate(model.blocks):
        for name in ("q_proj", "k_proj"):
            def hook(_module, _inputs, output, i=i, name=name):
                captured.setdefault(i, {})[name] = output.detach()
            handles.append(getattr(block.attn, name).register_forward_hook(hook))
    was_training = model.training
    model.eval()
    try:
        model(torch.tensor([ids], dtype=torch.long, device=model.rope_cos.device))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    cfg = model.cfg
    H, K, D = cfg.n_head, cfg.kv_heads, cfg.head_dim
    cos, sin = model.rope_cos[:T], model.rope_sin[:T]  # (T, D/2)
    causal = torch.ones(T, T, dtype=torch.bool, device=cos.device).tril()
    maps = []
    for i in range(cfg.n_layer):
        q = captured[i]["q_proj"].float().view(1, T, H, D)  # (1, T, H, D)
        k = captured[i]["k_proj"].float().view(1, T, K, D)
        if cfg.pos == "rope":
            q, k = apply_rope(q, cos.float(), sin.float()), apply_rope(k, cos.float(), sin.float())
        q, k = q[0].transpose(0, 1), k[0].transpose(0, 1)  # (H, T, D), (K, T, D)
        k = k.repeat_interleave(H // K, dim=0)  # query head h uses kv head h // (H/K), as SDPA's enable_gqa
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(D)  # (H, T, T)
        maps.append(torch.softmax(scores.masked_fill(~causal, -math.inf), dim=-1))
    return torch.stack(maps)  # (L, H, T, T)
