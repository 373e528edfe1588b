"""The training sampler whose order depends only on seed and epoch.

Shared by whole-section and sub-section training; resumed runs see the same batches.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Sampler


class EpochShuffleSampler(Sampler[int]):
    """Shuffle with a generator seeded by ``(seed, epoch)``; shard across DDP ranks.

    The order of epoch ``e`` depends on nothing but ``seed`` and ``e``, so a run resumed from
    a checkpoint sees exactly the batches an uninterrupted run would have seen.
    """

    def __init__(self, n_items: int, *, seed: int, shuffle: bool = True) -> None:
        self.n_items = n_items
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Called by Lightning before each epoch."""
        self.epoch = epoch

    def _rank_world(self) -> tuple[int, int]:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return torch.distributed.get_rank(), torch.distributed.get_world_size()
        return 0, 1

    def __iter__(self) -> Iterator[int]:
        # A generator, so the order is drawn at the first batch, not when the iterator is made:
        # a resumed Lightning run makes its first iterator before it calls set_epoch.
        yield from self._order()

    def _order(self) -> list[int]:
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            order = torch.randperm(self.n_items, generator=generator).tolist()
        else:
            order = list(range(self.n_items))
        rank, world = self._rank_world()
        if world > 1:  # every rank must take the same number of steps: pad by wrapping
            per_rank = -(-self.n_items // world)
            order = (order * world)[: per_rank * world]
            order = order[rank::world]
        return order

    def __len__(self) -> int:
        _, world = self._rank_world()
        return -(-self.n_items // world)
