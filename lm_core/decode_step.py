"""The tensor work of one generation-engine step: a prefill of newly admitted rows and one decode step of
the running rows. The scheduler (lm_core.generation_engine) decides which rows do what and keeps every
length on the host; this module turns that into forwards and reads back the chosen ids, once per call.

Inputs travel as two small packed tensors built from host lists, one row per batch row:
ints (B, 6) = slot, token, position, seed, counter, top_k; floats (B, 2) = temperature, top_p. On CUDA
they are pinned and copied without blocking, so the only wait per token is the read of the chosen ids
(with logprobs, of one packed float64 tensor that holds ids and logprobs together).

Two shapes of decode step:
- gathered (the CPU default): the rows that decode take part, attending to their slots' first `window`
  positions (the longest row's length). Rows in consecutive slots read the cache as a view; the engine
  fills a few idle slots between decoding ones with scratch rows (below) to keep them consecutive, and
  gathers the keys of rows in scattered slots. Eager, so shapes may vary.
- static (the CUDA default): every slot takes part and attends to the whole cache, with a length mask;
  slots with nothing to decode write to the cache's scratch column. Shapes never change, so the step can
  be compiled with torch.compile(mode="reduce-overhead"), which captures it in a CUDA graph.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lm_core.kv_cache import CacheAccess, KVCache
from lm_core.model import GPT
from lm_core.sampling import sample, token_keys, with_logprobs

SLOT, TOKEN, POSITION, SEED, COUNTER, TOP_K = range(6)  # columns of the ints pack
TEMPERATURE, TOP_P = range(2)  # columns of the floats pack


def upload(ints: list[list[int]], floats: list[list[float]], device: torch.device) -> tuple[Tensor, Tensor]:
    """The host's per-row inputs as device tensors, without waiting for the device (pinned + non_blocking)."""
    i = torch.tensor(ints, dtype=torch.int64)
    f = torch.tensor(floats, dtype=torch.float32)
    if device.type == "cuda":
        return i.pin_memory().to(device, non_blocking=True), f.pin_memory().to(device, non_blocking=True)
    return i.to(device), f.to(device)


class StepRunner:
    """Runs prefills and decode steps of `model` over `cache`. `static` picks the decode shape (see the module
    doc); `compile` wraps the static decode step in torch.compile(mode="reduce-overhead") (CUDA only)."""

    def __init__(self, model: GPT, cache: KVCache, *, static: bool, compile: bool = False):
        self.model, self.cache, self.static = model, cache, static
        self.device = cache.k.device
        self.compile_error: str | None = None
        self.keys = token_keys(model.cfg.vocab_size, self.device)  # the sampler's per-token hash, made once
        self._decode = self._decode_step
        if compile:
            if not static or self.device.type != "cuda":
                raise ValueError("compile needs the static decode step on a CUDA device; CPU decode runs eager")
            # the cache is written in place inside the graph: its address must stay fixed between replays
            torch._dynamo.mark_static_address(cache.k)
            torch._dynamo.mark_static_address(cache.v)
            self._decode = torch.compile(self._decode_step, mode="reduce-overhead", dynamic=False, fullgraph=True)

    def _decode_step(self, ints: Tensor, floats: Tensor, window: int | None, filters: bool, greedy: bool,
                     logprobs: bool, consecutive: slice | None, common_start: int | None = None) -> Tensor:
        slots = None if self.static else consecutive or ints[:, SLOT]
        access = CacheAccess(self.cache, start=ints[:, POSITION], slots=slots, window=window, common_start=common_start)
        logits = self.model(ints[:, TOKEN:TOKEN + 1], cache=access)[0][:, -1]  # (B, V)
        ids = sample(logits, floats[:, TEMPERATURE], ints[:, TOP_K], floats[:, TOP_P], ints[:, SEED], ints[:, COUNTER],
                     filters, self.keys, greedy)
        return with_logprobs(logits, ids) if logprobs else ids

    def decode(self, ints: list[list[int]], floats: list[list[float]], *, filters: bool, logprobs: bool,
               greedy: bool = False) -> list:
        """One token for each row: ids (B,), or with `logprobs` rows of sampling.with_logprobs, as host lists.
        Static: one row per slot, in slot order. Gathered: the rows given, each with its own slot.
        filters / greedy: some row uses top-k or top-p / no row samples (see sampling.sample)."""
        # exactly the longest row's keys: in bf16 a wider masked window changes the kernel's rounding. A row at the
        # scratch column has nothing to decode (an idle slot between decoding ones): it sets no window
        scratch = self.cache.scratch
        window = None if self.static else max(row[POSITION] for row in ints if row[POSITION] != scratch) + 1
        consecutive = None  # rows in consecutive slots read the cache as a view instead of a gather
        first = ints[0][SLOT]
        if not self.static and all(row[SLOT] == first + b for b, row in enumerate(ints)):
            consecutive = slice(first, first + len(ints))
        # rows of equal length (always so for one row) share their positions: no per-row mask or scatter
        common_start = window - 1 if not self.static and all(row[POSITION] == window - 1 for row in ints) else None
        i, f = upload(ints, floats, self.device)
        try:
            out = self._decode(i, f, window, filters, greedy, logprobs, consecutive, common_start)
        except Exception as exc:  # a compile that fails on this machine: say why once, then run eager
            if self._decode == self._decode_step:
                raise
            self.compile_error = f"{type(exc).__name__}: {exc}"
            self._decode = self._decode_step
            out = self._decode(i, f, window, filters, greedy, logprobs, consecutive, common_start)
        return out.tolist()  # the one host read of the step

    def prefill(self, inputs: list[list[int]], ints: list[list[int]], floats: list[list[float]], *, filters: bool,
                logprobs: bool, greedy: bool = False, prompt_logprobs: bool = False) -> tuple[list, list | None]:
        """Write each row's tokens at positions 0.. of its slot and choose the next token after the last one.

        Rows are right-padded to one (P, T) batch: causal attention never lets a real token see the padding
        after it, and the padding's keys land past the row's length, where the mask hides them. Returns the
        chosen ids (or logprob rows) and, with `prompt_logprobs` (one row only), a logprob row for every
        token of the input after the first."""
        lengths = [len(r) for r in inputs]
        T = max(lengths)
        x = torch.tensor([r + [0] * (T - len(r)) for r in inputs], dtype=torch.int64)  # (P, T)
        i, f = upload(ints, floats, self.device)
        x, last = x.to(self.device), torch.tensor(lengths, device=self.device) - 1  # (P, T), (P,)
        access = CacheAccess(self.cache, start=torch.zeros_like(last), slots=i[:, SLOT], window=T, common_start=0)
        if prompt_logprobs:
            if len(inputs) != 1:
                raise ValueError("prompt logprobs are computed for one prefill row at a time")
            logits = self.model(x, cache=access)[0]  # (1, T, V)
            prompt = with_logprobs(logits[0, :-1], x[0, 1:]).tolist()
            logits = logits[:, -1]
        else:
            logits = self.model(x, cache=access, logits_at=last)[0][:, -1]  # (P, V)
            prompt = None
        ids = sample(logits, f[:, TEMPERATURE], i[:, TOP_K], f[:, TOP_P], i[:, SEED], i[:, COUNTER], filters, self.keys,
                     greedy)
        return (with_logprobs(logits, ids) if logprobs else ids).tolist(), prompt
