"""Shuffled global batches, sharded over data-parallel ranks.

Every rank draws the same permutation from the same ``torch.Generator`` (the data-order
generator, saved in checkpoints), cuts it into global batches of ``batch_size`` and keeps its
contiguous slice of each (``torch.tensor_split`` over ``world_size``; sizes differ by at most
one). The union of the shards is exactly the single-process batch, so summed per-sample losses
divided by the *global* batch size give identical gradients after an all-reduce sum.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["ShardedBatches"]


class ShardedBatches:
    """Index batches over ``n`` samples: ``for global_size, local_idx in batches.epoch(): ...``."""

    def __init__(
        self, n: int, batch_size: int, *, shuffle: bool = True, drop_last: bool = False,
        rank: int = 0, world_size: int = 1, seed: int = 0,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        if n < 1:
            raise ValueError("the data set is empty")
        self.n, self.batch_size, self.shuffle, self.drop_last = n, batch_size, shuffle, drop_last
        self.rank, self.world_size = rank, world_size
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        full, rest = divmod(self.n, self.batch_size)
        return full + (1 if rest and not self.drop_last else 0)

    def get_state(self) -> Tensor:
        return self.generator.get_state()

    def set_state(self, state: Tensor) -> None:
        self.generator.set_state(state)

    def epoch(self) -> list[tuple[int, Tensor]]:
        """One epoch: ``(global batch size, this rank's indices)`` per step (draws one permutation)."""
        order = torch.randperm(self.n, generator=self.generator) if self.shuffle else torch.arange(self.n)
        out = []
        for b in range(len(self)):
            glob = order[b * self.batch_size:(b + 1) * self.batch_size]
            out.append((int(glob.numel()), torch.tensor_split(glob, self.world_size)[self.rank]))
        return out
