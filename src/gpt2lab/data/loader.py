"""The step-indexed token loader: the global batch of a step is a pure function of (seed, step).

    loader = TokenLoader("data/shakespeare_char", "train", block_size=256, global_batch_size=64,
                         rank=rank, world_size=world_size, seed=1337)
    x, y = loader.get_batch(step)      # this rank's rows of step `step`: (64 // world_size, 256) int64 each

Because a batch depends only on (seed, step), resuming at step s gives the same data as the run that
never stopped, and the global batch does not change with the number of ranks: rank r takes the
contiguous rows [r*G/W, (r+1)*G/W) of the G-row global batch.

Orders:
- `random` (nanoGPT): each row is a window at a uniformly random offset of the split's token
  stream (all shards end to end), drawn by a numpy Generator seeded with (seed, step).
- `sequential`: the stream cut into consecutive windows of block_size tokens; global batch b holds
  windows [b*G, (b+1)*G), wrapping to the start after the last one (the next epoch).

Shards are memory-mapped; only the rows a rank uses are read and converted to int64.
"""

from __future__ import annotations

import hashlib
import json
import os
import typing
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from gpt2lab.config import DataOrder
from gpt2lab.data.prepare import check_min_tokens, load_meta
from gpt2lab.data.shards import open_shard
from gpt2lab.errors import UserError
from gpt2lab.tokenizer import same_tokenizer

ORDERS = typing.get_args(DataOrder)


def dataset_fingerprint(meta: dict) -> str:
    """A short hash of a dataset's identity (tokenizer, source, shards and their sizes), read from its meta."""
    identity = {
        "tokenizer": meta["tokenizer"],
        "source": meta.get("source"),
        "splits": {name: {"shards": s["shards"], "tokens": s["tokens"]} for name, s in meta["splits"].items()},
    }
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode("utf-8")).hexdigest()[:16]


class TokenLoader:
    """Rank-aware, resumable batches of (input, target) windows from a prepared dataset's split."""

    def __init__(
        self,
        data_dir: str | os.PathLike,
        split: str,
        *,
        block_size: int,
        global_batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        order: str = "random",
        device: str | torch.device = "cpu",
        pin_memory: bool = False,
    ) -> None:
        meta = load_meta(data_dir)
        self.data_dir = Path(data_dir)
        if split not in meta["splits"]:
            raise UserError(f"{data_dir} has no '{split}' split (it has {', '.join(meta['splits'])})")
        if order not in ORDERS:
            raise UserError(f"data order '{order}' is unknown; use one of {', '.join(ORDERS)}")
        if global_batch_size < 1 or global_batch_size % world_size:
            raise UserError(
                f"global batch of {global_batch_size} sequences does not divide among {world_size} ranks; "
                "choose a batch size that is a multiple of the number of ranks"
            )
        if not 0 <= rank < world_size:
            raise UserError(f"rank {rank} is outside world size {world_size}")
        self.split, self.block_size, self.global_batch_size = split, block_size, global_batch_size
        self.rank, self.world_size, self.seed, self.order = rank, world_size, seed, order
        self.device = torch.device(device)
        self.pin_memory = pin_memory and self.device.type == "cuda" and torch.cuda.is_available()
        self.tokenizer = meta["tokenizer"]
        self.vocab_size = meta["vocab_size"]
        self.fingerprint = dataset_fingerprint(meta)
        self.shards = []
        for path in meta["splits"][split]["paths"]:
            tokens, header = open_shard(path)
            if not same_tokenizer(header["tokenizer"], meta["tokenizer"]):
                raise UserError(f"{path} was written with another tokenizer than {self.data_dir / 'meta.json'}; "
                                "re-run gpt2lab prepare with --overwrite")
            # Every id is checked once, here (~10 GB/s): an id beyond the vocabulary would fail deep in a step.
            if len(tokens) and self.vocab_size < 2 ** (8 * tokens.itemsize) and int(tokens.max()) >= self.vocab_size:
                raise UserError(f"{path} holds token id {int(tokens.max())}, beyond the vocabulary of "
                                f"{self.vocab_size} ids in {self.data_dir / 'meta.json'}; the files do not belong "
                                "together: re-run gpt2lab prepare with --overwrite")
            self.shards.append(tokens)
        # starts[i] = position of shard i's first token in the split's stream
        self.starts = np.cumsum([0] + [len(s) for s in self.shards])
        self.tokens = int(self.starts[-1])
        check_min_tokens(self.tokens, block_size, f"{split} split of {self.data_dir}")
        self.windows = (self.tokens - 1) // block_size  # sequential windows per epoch
        self.step = 0  # the next step, for state_dict

    @property
    def local_batch_size(self) -> int:
        """Rows of this rank per step: global_batch_size // world_size."""
        return self.global_batch_size // self.world_size

    def _read(self, start: int, length: int) -> np.ndarray:
        """Tokens [start, start+length) of the split's stream, across shard boundaries if needed."""
        i = int(np.searchsorted(self.starts, start, side="right")) - 1
        pieces, need = [], length
        while need:
            offset = start + (length - need) - int(self.starts[i])
            piece = self.shards[i][offset:offset + need]
            pieces.append(piece)
            need -= len(piece)
            i += 1
        return pieces[0] if len(pieces) == 1 else np.concatenate(pieces)

    def _row_starts(self, step: int) -> np.ndarray:
        """Stream offsets of this rank's rows of the global batch of `step`."""
        lo = self.rank * self.local_batch_size
        hi = lo + self.local_batch_size
        if self.order == "random":
            rng = np.random.default_rng([self.seed, step])
            # draw the whole global batch so a rank's rows do not depend on the world size
            return rng.integers(0, self.tokens - self.block_size, size=self.global_batch_size)[lo:hi]
        first = step * self.global_batch_size
        return (np.arange(first + lo, first + hi) % self.windows) * self.block_size

    def get_batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's share of the global batch for optimizer step `step`.

        Returns x, y: int64 of shape (global_batch_size // world_size, block_size); y is x shifted by one.
        """
        rows = np.stack([self._read(int(s), self.block_size + 1) for s in self._row_starts(step)]).astype(np.int64)
        x, y = torch.from_numpy(rows[:, :-1].copy()), torch.from_numpy(rows[:, 1:].copy())
        self.step = step + 1
        if self.device.type == "cpu":
            return x, y
        if self.pin_memory:
            x, y = x.pin_memory(), y.pin_memory()
        # non_blocking overlaps the host-to-device copy with compute when the source is pinned
        return x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """`get_batch` of the step after the last one fetched (or the one restored by `load_state_dict`)."""
        return self.get_batch(self.step)

    def state_dict(self) -> dict:
        """What a checkpoint needs to continue exactly: seed, order, next step and the data's fingerprint."""
        return {"seed": self.seed, "order": self.order, "step": self.step, "fingerprint": self.fingerprint}

    def load_state_dict(self, state: dict) -> None:
        """Continue from `state` (its seed and order win); UserError if it was saved on other data."""
        if state.get("fingerprint") != self.fingerprint:
            raise UserError(
                f"{self.data_dir} is not the dataset this run was trained on (fingerprint {self.fingerprint}, "
                f"checkpoint has {state.get('fingerprint')}); resume with the original data or start a new run"
            )
        if state.get("order") not in ORDERS:
            raise UserError(f"checkpoint data order {state.get('order')!r} is unknown; use one of {', '.join(ORDERS)}")
        self.seed, self.order, self.step = int(state["seed"]), state["order"], int(state["step"])


def iter_eval_batches(
    data_dir: str | os.PathLike,
    split: str,
    block_size: int,
    batch_size: int,
    max_batches: int | None = None,
    rank: int = 0,
    world_size: int = 1,
    device: str | torch.device = "cpu",
    max_rows: int | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """A fixed set of evaluation batches: the same every call, whatever the world size.

    The set is the first `max_rows` consecutive windows of the split (all of them if fewer or None;
    at least one, wrapping a split shorter than a batch), read `batch_size` windows (the GLOBAL batch,
    all ranks) at a time; rank r yields its contiguous share of each, so every rank yields the same
    number of batches and the set does not depend on `batch_size` or `world_size`. The last batch
    may be smaller (a rank's share may be empty). `max_batches` caps the number of batches.
    """
    loader = TokenLoader(data_dir, split, block_size=block_size, global_batch_size=batch_size, rank=rank,
                         world_size=world_size, order="sequential", device=device)
    total = max(1, min(loader.windows, max_rows) if max_rows is not None else loader.windows)
    if max_rows is None:  # whole batches only, as before max_rows existed
        total = max(1, loader.windows // batch_size) * batch_size
    n_batches = -(-total // batch_size)
    if max_batches is not None:
        n_batches = min(n_batches, max_batches)
    for j in range(n_batches):
        first, n = j * batch_size, min(batch_size, total - j * batch_size)
        lo, hi = first + n * rank // world_size, first + n * (rank + 1) // world_size
        starts = (np.arange(lo, hi) % loader.windows) * block_size
        rows = np.stack([loader._read(int(s), block_size + 1) for s in starts]) if len(starts) else np.zeros(
            (0, block_size + 1), dtype=np.int64)
        rows = rows.astype(np.int64)
        x, y = torch.from_numpy(rows[:, :-1].copy()), torch.from_numpy(rows[:, 1:].copy())
        yield x.to(device), y.to(device)
