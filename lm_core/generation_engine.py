"""The one generation engine: continuous batching over a slotted KV cache. `lmforge generate`, `lmforge
serve`, the MLflow model, evaluation and the benchmarks all generate through it (lm_core.generate has
the call-and-collect helpers).

Design
- The KV cache (lm_core.model.KVCache) is `slots` rows of `max_len` positions, allocated once. A request
  gets a free slot when it is admitted and gives it back the moment it finishes; the slot's contents are
  simply overwritten by the next request (stale keys sit past the new length and are masked).
- Each step is: admit waiting requests into free slots (FIFO), prefill them (prompts right-padded into
  one batch, at most `prefill_tokens` tokens per step so running rows are not stalled for long), one
  decode step of every other running row, then on the host: append each row's token, check eos, stop
  strings and max tokens, emit the row's event, free finished rows. New requests thus join the running
  batch at the next step boundary and never wait for the batch to drain.
- Every row keeps its own sampling settings, seed, stop strings, token budget and position; positions
  live on the host as plain ints (len(tokens) - 1), so planning a step reads nothing from the device.
  The decode step itself is in lm_core.decode_step (fixed shapes on CUDA, compilable).
- A row that outgrows the cache (max_len positions) slides: it is prefilled again from its last
  max_len tokens every step, which equals recomputing the model's window. `use_cache=False` does that
  on every step for every row: the recompute baseline, through the same loop.
- Threads: `submit` and `cancel` may be called from any thread. `step()` is called by one thread only:
  either the caller's (lm_core.generate does this) or the engine's own loop after `start()` (the server
  and the MLflow model). A cancelled request leaves the batch at the next step boundary.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import secrets
import threading
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from lm_core.decode_step import StepRunner
from lm_core.generation_rows import Detokenizer, GenerationEvent, Row, TokenLogprob
from lm_core.kv_cache import KVCache
from lm_core.model import GPT
from lm_core.sampling import SamplingConfig, seed_key, unpack_logprobs
from lm_core.typed_config import ConfigError

log = logging.getLogger(__name__)


@dataclass
class EngineConfig:
    slots: int = 8  # rows in the running batch (KV cache slots)
    max_len: int | None = None  # positions per slot; None: the model's block_size
    static: bool | None = None  # fixed-shape decode over every slot (see lm_core.decode_step); None: on CUDA
    compile: bool = False  # torch.compile(mode="reduce-overhead") the static decode step; CUDA only
    use_cache: bool = True  # False: recompute every row's window every step (the baseline)
    prefill_tokens: int = 4096  # prompt tokens prefilled per step at most (one prompt always goes)

    def validate(self, block_size: int, device: torch.device) -> None:
        def fail(msg: str) -> None:
            raise ConfigError(msg)

        if isinstance(self.slots, bool) or not isinstance(self.slots, int) or self.slots < 1:
            fail(f"engine.slots={self.slots!r} must be an integer >= 1; set it to the batch you want, e.g. 8")
        if self.max_len is not None and not 0 < self.max_len <= block_size:
            fail(f"engine.max_len={self.max_len} must be in 1..block_size={block_size}; leave it unset for the full context")
        if self.compile and device.type != "cuda":
            fail(f"engine.compile=True needs a CUDA device (the model is on {device.type}); on CPU the step runs eager, "
                 f"so leave compile off")
        if self.compile and self.static is False:
            fail("engine.compile=True needs the static decode step; leave engine.static unset or set it to true")
        if self.prefill_tokens < 1:
            fail(f"engine.prefill_tokens={self.prefill_tokens} must be >= 1; e.g. 4096")


@dataclass
class GenerationRequest:
    prompt: Sequence[int]
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    stop: Sequence[str] = ()  # text is cut before the first of these (needs the engine's tokenizer)
    logprobs: bool = False  # each generated token's logprob and its most likely alternatives
    prompt_logprobs: bool = False  # the same for the prompt's tokens (OpenAI's echo + logprobs)
    on_event: Callable[[GenerationEvent], None] | None = None  # called on the stepping thread


@dataclass
class EngineStats:
    requests: int = 0
    tokens_generated: int = 0
    steps: int = 0
    running: int = 0
    waiting: int = 0


class GenerationEngine:
    """Continuous batching for one model; see the module doc. `tokenizer` (decode + eos_id) gives events text
    and stop strings; without it events carry ids only and `eos_id` (if any) ends a row."""

    def __init__(self, model: GPT, config: EngineConfig | None = None, *, tokenizer: Detokenizer | None = None,
                 eos_id: int | None = None):
        self.config = config = config or EngineConfig()
        device = model.norm_f.weight.device
        config.validate(model.cfg.block_size, device)
        self.model, self.tokenizer = model, tokenizer
        self.eos_id = tokenizer.eos_id if eos_id is None and tokenizer is not None else eos_id
        self.max_len = config.max_len or model.cfg.block_size
        self.static = device.type == "cuda" if config.static is None else config.static
        # the cache holds what the model computes in: bf16 for the bf16 and int8 models (lm_core.quantize)
        self.cache = KVCache(model.cfg, config.slots, self.max_len, dtype=model.norm_f.weight.dtype, device=device)
        self.runner = StepRunner(model, self.cache, static=self.static, compile=config.compile)
        self.stats = EngineStats()
        self._lock = threading.Condition(threading.RLock())
        self._waiting: deque[Row] = deque()
        self._cancelled: set[int] = set()
        self._running: dict[int, Row] = {}  # slot -> row; touched by the stepping thread only
        self._free = list(range(config.slots))  # a heap: the lowest free slot first
        self._ids = itertools.count()
        self._thread: threading.Thread | None = None
        self._stopping = False

    # --- requests ------------------------------------------------------------------------------

    def submit(self, request: GenerationRequest) -> int:
        """Queue a request; returns its id (events carry it). Raises ValueError for a request that cannot run."""
        prompt = [int(t) for t in request.prompt]
        if not prompt:
            raise ValueError("a prompt is empty; generation needs at least one token (e.g. a BOS id)")
        vocab = self.model.cfg.vocab_size
        if bad := [t for t in prompt if not 0 <= t < vocab][:5]:
            raise ValueError(f"token ids {bad} are outside the vocabulary (0..{vocab - 1})")
        request.sampling.validate()
        if request.stop and self.tokenizer is None:
            raise ValueError("stop strings need text: build the engine with a tokenizer")
        seed = request.sampling.seed
        row = Row(next(self._ids), request, prompt, seed_key(secrets.randbits(32) if seed is None else seed),
                  self.tokenizer)
        with self._lock:
            self._waiting.append(row)
            self.stats.requests += 1
            self.stats.waiting = len(self._waiting)
            self._lock.notify()
        return row.id

    def cancel(self, request_id: int) -> None:
        """Stop a request at the next step boundary (its slot is freed); it gets a final "cancelled" event."""
        with self._lock:
            self._cancelled.add(request_id)
            self._lock.notify()

    @property
    def active(self) -> int:
        """Requests admitted or waiting (a live count; stats are updated once per step)."""
        return len(self._running) + len(self._waiting)

    def has_work(self) -> bool:
        with self._lock:
            return bool(self._waiting or self._running or self._cancelled)

    # --- the step ------------------------------------------------------------------------------

    @torch.inference_mode()  # not just no_grad: no view or version tracking per op (measured: ~5-10% of a CPU step)
    def step(self) -> None:
        """One scheduling step: admit, prefill, decode, emit (see the module doc)."""
        self._admit()
        prefill, decode = self._plan()
        if decode:
            for row, out in zip(decode, self._decode(decode)):
                self._accept(row, out)
        for group in prefill:
            outs, prompt = self._prefill(group)
            for row, out in zip(group, outs):
                self._accept(row, out, prompt)
        self.stats.steps += 1
        self.stats.running = len(self._running)

    def _admit(self) -> None:
        done: list[Row] = []
        with self._lock:
            cancelled, self._cancelled = self._cancelled, set()
            if cancelled:
                done += [r for r in self._waiting if r.id in cancelled]
                self._waiting = deque(r for r in self._waiting if r.id not in cancelled)
            while self._free and self._waiting:
                row = self._waiting.popleft()
                if row.request.sampling.max_new_tokens == 0 and not row.request.prompt_logprobs:
                    self._emit(row, row.finish("length"))  # nothing to compute
                    continue
                row.slot = heapq.heappop(self._free)
                self._running[row.slot] = row
            self.stats.waiting = len(self._waiting)
        done += [r for r in self._running.values() if r.id in cancelled]
        for row in done:
            self._finish(row, "cancelled")

    def _plan(self) -> tuple[list[list[Row]], list[Row]]:
        """(prefill groups, decode rows). A prefill that reports prompt logprobs runs alone (its full logits
        are (T, V)); the others share one batch up to the step's token budget."""
        rows = sorted(self._running.values(), key=lambda r: r.id)
        waiting = [r for r in rows if r.needs_prefill]
        decode = [r for r in rows if not r.needs_prefill]
        groups: list[list[Row]] = []
        batch: list[Row] = []
        budget = self.config.prefill_tokens if self.config.use_cache else float("inf")
        for row in waiting:
            cost = min(len(row.tokens), self.max_len)
            if (groups or batch) and cost > budget:
                break  # the rest are prefilled at a later step
            budget -= cost
            if row.wants_prompt_logprobs:
                groups.append([row])
            else:
                batch.append(row)
        return groups + ([batch] if batch else []), decode

    def _decode(self, rows: list[Row]) -> list:
        rows.sort(key=lambda r: r.slot)
        first, last = rows[0].slot, rows[-1].slot
        if self.static:
            span = range(self.cache.slots)  # one row per slot: the fixed shape
        elif last - first + 1 <= 2 * len(rows):
            # the rows' slots and the few idle ones between them (a slot prefilling this step, or waiting for its
            # client's next request): consecutive slots read the cache as a view, and an idle slot's extra row
            # costs less than gathering every row's keys and values (measured: 8 rows around one idle slot,
            # ~15% of the step)
            span = range(first, last + 1)
        else:
            span = [r.slot for r in rows]  # scattered slots: gather only the rows that decode
        by_slot = {r.slot: r for r in rows}
        # slots without a token to decode write to the scratch column, and their output is dropped
        ints = [by_slot[s].ints(s, len(by_slot[s].tokens) - 1) if s in by_slot else [s, 0, self.cache.scratch, 0, 0, 0]
                for s in span]
        floats = [by_slot[s].floats() if s in by_slot else [0.0, 1.0] for s in span]
        outs = self.runner.decode(ints, floats, filters=any(r.request.sampling.filters for r in rows),
                                  logprobs=any(r.request.logprobs for r in rows), greedy=all(f[0] == 0 for f in floats))
        return [outs[r.slot - span[0]] for r in rows] if span[-1] - span[0] + 1 == len(span) else outs

    def _prefill(self, rows: list[Row]) -> tuple[list, list | None]:
        inputs = [r.tokens[-self.max_len:] for r in rows]  # a row longer than the cache slides (module doc)
        return self.runner.prefill(inputs, [r.ints(r.slot, 0) for r in rows], [r.floats() for r in rows],
                                   filters=any(r.request.sampling.filters for r in rows),
                                   logprobs=any(r.request.logprobs for r in rows),
                                   greedy=all(r.request.sampling.temperature == 0 for r in rows),
                                   prompt_logprobs=len(rows) == 1 and rows[0].wants_prompt_logprobs)

    def _accept(self, row: Row, out, prompt: list | None = None) -> None:
        """Book one step's result for a row: its new token (id, or a logprob row) and, after the first
        prefill of an echo request, the prompt's logprobs."""
        if row.done:
            return
        token, logprob = (out, None) if isinstance(out, int) else self._logprob(out)
        prompt_lp = None
        if row.wants_prompt_logprobs:
            prompt_lp = [TokenLogprob(row.tokens[0], None, [])] + [TokenLogprob(*unpack_logprobs(p)) for p in prompt]
        row.needs_prefill = row.wants_prompt_logprobs = False
        if row.request.sampling.max_new_tokens == 0:  # only the prompt's logprobs were asked for
            return self._finish(row, "length", prompt_lp)
        event = row.push(token, self.eos_id, logprob if row.request.logprobs else None)
        event.prompt_logprobs = prompt_lp
        if event.token_ids:
            self.stats.tokens_generated += 1
        if event.finish_reason is not None:
            return self._finish(row, event.finish_reason, event=event)
        # the next decode feeds the last token at position len - 1; past the cache the row slides
        row.needs_prefill = not self.config.use_cache or len(row.tokens) - 1 >= self.max_len
        self._emit(row, event)

    @staticmethod
    def _logprob(out: list[float]) -> tuple[int, TokenLogprob]:
        token, lp, top = unpack_logprobs(out)
        return token, TokenLogprob(token, lp, top)

    def _finish(self, row: Row, reason: str, prompt_lp: list | None = None, event: GenerationEvent | None = None) -> None:
        if row.slot is not None and self._running.get(row.slot) is row:
            del self._running[row.slot]
            heapq.heappush(self._free, row.slot)
        event = event or row.finish(reason)
        event.finish_reason = reason
        if prompt_lp is not None:
            event.prompt_logprobs = prompt_lp
        row.done = True  # nothing more is booked for it
        self._emit(row, event)

    @staticmethod
    def _emit(row: Row, event: GenerationEvent) -> None:
        if row.request.on_event is not None:
            row.request.on_event(event)

    # --- the engine's own loop (server, MLflow model) --------------------------------------------

    def start(self) -> GenerationEngine:
        """Step on a background thread whenever there is work, until stop()."""
        if self._thread is None:
            self._stopping = False
            self._thread = threading.Thread(target=self._loop, name="lmforge-generation", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        with self._lock:
            self._stopping = True
            self._lock.notify()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    @property
    def background(self) -> bool:
        return self._thread is not None

    def _loop(self) -> None:
        while True:
            with self._lock:
                while not self._stopping and not (self._waiting or self._running or self._cancelled):
                    self._lock.wait()
                if self._stopping:
                    return
            try:
                self.step()
            except Exception as exc:  # e.g. out of memory: fail what is in flight, keep serving
                log.exception("generation step failed")
                self._fail_all(f"{type(exc).__name__}: {exc}")

    def _fail_all(self, message: str) -> None:
        with self._lock:
            rows = [*self._running.values(), *self._waiting]
            self._waiting.clear()
        for row in rows:
            event = row.finish("error")
            event.error = message
            self._finish(row, "error", event=event)
