"""A deterministic, resumable loader of training windows over memory-mapped token shards.

Each shard is cut into windows of `block_size + 1` tokens with a stride of `block_size`: consecutive
windows share one token (the last target of one is the first input of the next), so every token after
a shard's first is a target exactly once per epoch, and no window spans two shards (reads stay one
contiguous slice of one memory map, no copy until the batch itself).

Order: epoch e visits every window once, in the permutation drawn from (seed, e). A run of W ranks
splits that global order by stride: rank r reads order[r::W], so the ranks' parts are disjoint and the
first n samples of every rank together are exactly the first n*W of the global order. Every rank
reads the same number of samples per epoch (the last `windows % W` of the order are skipped), so
ranks never disagree on how many batches an epoch holds.

State: (epoch, samples read by each rank in that epoch). `state_dict()` goes into the checkpoint;
`load_state_dict()` continues exactly where the saved run stopped, so a resumed run yields the same
batches an uninterrupted one would have. A batch that reaches the end of an epoch continues with the
start of the next. The world size may change on resume when the samples consumed so far divide evenly
among the new ranks (the strided split makes the consumed set the same prefix of the order).

Document boundaries (optional, off by default): windows cross documents, as in GPT-2-style packing.
`segment_ids(batch, bos_id)` numbers the documents inside each window (a new one starts at every bos),
and `train.document_attention=true` passes them to the model, whose attention then stays inside each
document (block-diagonal causal mask; positions are not reset, which RoPE's relative form tolerates).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from lm_core.shards import ShardError

STATE_VERSION = 1


class TokenLoader:
    """Batches of (batch_size, block_size + 1) int64 windows; `next(loader)` gives the next one."""

    def __init__(self, shards: list[np.ndarray], block_size: int, batch_size: int, seed: int,
                 rank: int = 0, world_size: int = 1):
        if block_size < 1 or batch_size < 1:
            raise ValueError(f"block_size={block_size} and batch_size={batch_size} must be >= 1")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank={rank} must be in [0, world_size={world_size})")
        self.shards, self.block_size, self.batch_size = shards, block_size, batch_size
        self.seed, self.rank, self.world_size = seed, rank, world_size
        counts = np.array([max(0, (s.size - 1) // block_size) for s in shards], dtype=np.int64)
        # first window id of each shard: window w lives in shard k where offsets[k] <= w < offsets[k+1]
        self._offsets = np.concatenate([[0], np.cumsum(counts)])
        self.windows_per_epoch = int(self._offsets[-1])
        self.samples_per_rank = self.windows_per_epoch // world_size
        if self.samples_per_rank == 0:
            raise ShardError(
                f"the train shards hold {self.windows_per_epoch} windows of block_size+1={block_size + 1} tokens, "
                f"fewer than world_size={world_size}; lower model.block_size or add data"
            )
        self.epoch, self.position = 0, 0
        self._order_epoch, self._order = -1, np.empty(0, dtype=np.int64)
        # per position of the rank's order: the window's shard and its index inside that shard (see rank_order)
        self._order_shard, self._order_local = np.empty(0, dtype=np.int32), np.empty(0, dtype=np.int64)
        self._run_end = np.empty(0, dtype=np.int32)
        # each shard as a (windows, block_size + 1) strided view (no copy): a batch from one shard is then
        # a single fancy-indexed gather instead of one slice copy per row
        self._views = [np.lib.stride_tricks.as_strided(s, shape=(int(n), block_size + 1),
                                                       strides=(block_size * s.strides[0], s.strides[0]), writeable=False)
                       for s, n in zip(shards, counts)]
        self.last_window_ids: list[int] = []  # the windows of the last batch, in row order

    # --- order ------------------------------------------------------------------------------------

    def rank_order(self, epoch: int) -> np.ndarray:
        """Window ids this rank reads in `epoch`, in order: (samples_per_rank,)."""
        if epoch != self._order_epoch:
            # uint32 halves the memory of the permutation (4 bytes per window) while the ids fit
            dtype = np.uint32 if self.windows_per_epoch < 2**32 else np.int64
            order = np.arange(self.windows_per_epoch, dtype=dtype)
            np.random.default_rng([self.seed, epoch]).shuffle(order)
            used = self.samples_per_rank * self.world_size
            self._order = np.ascontiguousarray(order[self.rank:used:self.world_size])
            # located once per epoch rather than per batch (16 more bytes per window): the per-batch cost is what
            # the training step waits on
            ids = self._order.astype(np.int64)
            shard = np.searchsorted(self._offsets, ids, side="right") - 1
            self._order_local = ids - self._offsets[shard]
            self._order_shard = shard.astype(np.int32)
            # _run_end[p]: where the run of same-shard windows that holds position p ends, so "is this batch
            # from one shard" is one comparison
            starts = np.flatnonzero(np.diff(shard)) + 1
            ends = np.append(starts, len(shard)).astype(np.int32)
            self._run_end = np.repeat(ends, np.diff(np.concatenate([[0], ends])))
            self._order_epoch = epoch
        return self._order

    def window(self, window_id: int) -> np.ndarray:
        """The (block_size + 1)-token zero-copy view of one window."""
        k, start = self.locate(window_id)
        return self.shards[k][start : start + self.block_size + 1]

    def locate(self, window_id: int) -> tuple[int, int]:
        """(shard index, first token offset) of a window."""
        k = int(np.searchsorted(self._offsets, window_id, side="right")) - 1
        return k, (int(window_id) - int(self._offsets[k])) * self.block_size

    # --- batches ----------------------------------------------------------------------------------

    def __iter__(self) -> Iterator[np.ndarray]:
        return self

    def __next__(self) -> np.ndarray:
        out = np.empty((self.batch_size, self.block_size + 1), dtype=np.int64)
        position, end = self.position, self.position + self.batch_size
        if self._order_epoch == self.epoch and end < self.samples_per_rank:  # the common case: inside the epoch
            rows = slice(position, end)
            self._gather(self._order_shard[rows], self._order_local[rows], self._run_end[position] >= end, out)
            self.last_window_ids = self._order[rows].tolist()
            self.position = end
            return out
        filled = 0
        window_ids = []
        while filled < self.batch_size:
            order = self.rank_order(self.epoch)
            position = self.position
            take = min(self.batch_size - filled, self.samples_per_rank - position)
            rows = slice(position, position + take)
            one_shard = self._run_end[position] >= position + take
            self._gather(self._order_shard[rows], self._order_local[rows], one_shard, out[filled : filled + take])
            window_ids.append(order[rows])
            filled += take
            self.position += take
            if self.position == self.samples_per_rank:
                self.epoch, self.position = self.epoch + 1, 0
        self.last_window_ids = (window_ids[0] if len(window_ids) == 1 else np.concatenate(window_ids)).tolist()
        return out

    def _gather(self, shard: np.ndarray, local: np.ndarray, one_shard: bool, out: np.ndarray) -> None:
        """Copy windows (shard[i], local[i]) into the rows of out, casting uint16 -> int64 on the way."""
        if one_shard:
            out[...] = self._views[int(shard[0])][local]  # one gather from the strided view: (rows, block_size + 1)
            return
        # rows from several shards: one concatenate writes every row's window straight into out (a row of a
        # strided view costs less to make than a slice of the shard)
        views = self._views
        np.concatenate([views[k][w] for k, w in zip(shard.tolist(), local.tolist())], out=out.reshape(-1))

    # --- state ------------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """Where the loader stands; the same on every rank, so rank 0's copy in a checkpoint suffices."""
        return {
            "version": STATE_VERSION,
            "epoch": self.epoch,
            "samples_in_epoch": self.position * self.world_size,  # global: all ranks together
            "seed": self.seed,
            "block_size": self.block_size,
            "world_size": self.world_size,
            "windows_per_epoch": self.windows_per_epoch,
        }

    def load_state_dict(self, state: dict) -> None:
        if set(state) == {"index"}:  # a checkpoint from before loader state was saved: `index` batches drawn
            samples = int(state["index"]) * self.batch_size
            self.epoch, self.position = divmod(samples, self.samples_per_rank)
            return
        for key in ("seed", "block_size", "windows_per_epoch"):
            if state[key] != getattr(self, key):
                raise ValueError(
                    f"the checkpoint's data loader had {key}={state[key]}, this run has {getattr(self, key)}: "
                    "resuming would not continue the same order; resume with the same train.seed, "
                    "model.block_size and shards, or start a new run"
                )
        samples = int(state["samples_in_epoch"])
        if samples % self.world_size:
            raise ValueError(
                f"the checkpoint's data loader stopped after {samples} samples of epoch {state['epoch']} "
                f"(world_size={state['world_size']}), which {self.world_size} ranks cannot split evenly; "
                f"resume with world_size={state['world_size']}"
            )
        self.epoch, self.position = int(state["epoch"]), samples // self.world_size
        if self.position >= self.samples_per_rank:  # fewer samples per rank after a world-size change
            self.epoch, self.position = self.epoch + 1, 0


def segment_ids(batch: np.ndarray, bos_id: int) -> np.ndarray:
    """Document index of every input token of each window: (B, T) int32, starting at 0 per window.

    Two positions may attend to each other only when their segment ids are equal (block-diagonal
    causal attention); a window that starts mid-document gives that tail segment 0.
    """
    inputs = batch[:, :-1]  # (B, T)
    starts = inputs == bos_id
    starts[:, 0] = False  # the first position opens segment 0 whatever it holds
    return np.cumsum(starts, axis=1, dtype=np.int32)


def batch_to_device(batch: np.ndarray, device, bos_id: int | None = None):
    """(inputs, targets, segments or None) of a (B, T+1) window batch on `device`; segments (document ids,
    `segment_ids`) when `bos_id` is given. On CUDA the copy goes through pinned memory and does not block the
    host: a copy from pageable memory waits for the GPU to drain its queue, a host sync every step."""
    import torch

    tensors = [torch.from_numpy(batch)]
    if bos_id is not None:
        tensors.append(torch.from_numpy(segment_ids(batch, bos_id)))
    if getattr(device, "type", device) == "cuda":
        tensors = [t.pin_memory().to(device, non_blocking=True) for t in tensors]
    else:
        tensors = [t.to(device) for t in tensors]
    tokens = tensors[0]
    return tokens[:, :-1], tokens[:, 1:], tensors[1] if bos_id is not None else None
