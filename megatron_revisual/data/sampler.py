"""A deterministic, resumable batch sampler: its position (epoch, index) is its whole state.

    sampler = ResumableBatchSampler(len(dataset), batch_size=8, seed=1)
    rows = sampler.next_batch()
    checkpoint["sampler"] = sampler.state_dict()   # plain ints and bools (JSON-safe)
    ResumableBatchSampler(len(dataset), 8, seed=1).load_state_dict(checkpoint["sampler"])
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["ResumableBatchSampler"]


class ResumableBatchSampler:
    """Batches of row indices, reshuffled every epoch from (seed, epoch) alone, so the position
    (epoch, index into that epoch's order) is the whole state: saving it and loading it into a
    fresh sampler continues with exactly the batches an uninterrupted run would have drawn.

    drop_last: an epoch's tail shorter than batch_size is skipped (every batch full, as GRPO's
    rollout batch wants); otherwise it comes as a short last batch. Batches never span epochs.
    """

    def __init__(self, num_rows: int, batch_size: int, *, seed: int, shuffle: bool = True,
                 drop_last: bool = True) -> None:
        if num_rows < 1:
            raise ValueError("the dataset has no rows")
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be >= 1")
        if seed < 0:
            raise ValueError(f"seed={seed} must be >= 0")
        if drop_last and batch_size > num_rows:
            raise ValueError(
                f"batch_size={batch_size} exceeds the dataset's {num_rows} usable rows "
                f"with drop_last; use batch_size <= {num_rows}"
            )
        self.num_rows, self.batch_size, self.seed = num_rows, batch_size, seed
        self.shuffle, self.drop_last = shuffle, drop_last
        self.epoch, self.index = 0, 0
        self._order_epoch, self._order = -1, np.arange(0)

    @property
    def batches_per_epoch(self) -> int:
        whole, rest = divmod(self.num_rows, self.batch_size)
        return whole + (1 if rest and not self.drop_last else 0)

    def order(self, epoch: int) -> np.ndarray:
        """The row order of `epoch`: a permutation drawn from (seed, epoch) only, with numpy's
        PCG64 (the same numpy version gives the same order on every machine)."""
        if not self.shuffle:
            return np.arange(self.num_rows)
        if self._order_epoch != epoch:
            self._order = np.random.default_rng([self.seed, epoch]).permutation(self.num_rows)
            self._order_epoch = epoch
        return self._order

    def next_batch(self) -> list[int]:
        left = self.num_rows - self.index
        if left == 0 or (self.drop_last and left < self.batch_size):
            self.epoch, self.index = self.epoch + 1, 0
        batch = self.order(self.epoch)[self.index : self.index + self.batch_size]
        self.index += len(batch)
        return [int(i) for i in batch]

    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch, "index": self.index, "seed": self.seed, "num_rows": self.num_rows,
            "batch_size": self.batch_size, "shuffle": self.shuffle, "drop_last": self.drop_last,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        mine = self.state_dict()
        for key in ("seed", "num_rows", "batch_size", "shuffle", "drop_last"):
            if state[key] != mine[key]:
                raise ValueError(
                    f"sampler state has {key}={state[key]!r} but this sampler {mine[key]!r}; "
                    "an exact resume needs the same data and batching"
                )
        if not 0 <= state["index"] <= self.num_rows or state["epoch"] < 0:
            raise ValueError(f"sampler state out of range: {state}")
        self.epoch, self.index = int(state["epoch"]), int(state["index"])
