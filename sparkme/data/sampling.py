"""Deterministic, resumable, sharded data order.

The order of epoch e is a permutation seeded by (seed, e); each rank takes every world_size-th item. Every item's
augmentation is seeded by (seed, epoch, index), so a resumed run sees exactly the crops an uninterrupted run
would, with any number of data-loader workers.
"""

from __future__ import annotations

import torch
from torch.utils.data import Dataset, Sampler


class ResumableSampler(Sampler):
    """Yields ``(epoch, index)`` pairs for one rank, starting ``start`` items into the epoch."""

    def __init__(self, length: int, seed: int, epoch: int, rank: int = 0, world_size: int = 1, start: int = 0):
        self.length, self.seed, self.epoch = length, seed, epoch
        self.rank, self.world_size, self.start = rank, world_size, start

    def per_rank(self) -> int:
        return self.length // self.world_size  # equal shards: every rank makes the same number of steps

    def __iter__(self):
        order = torch.randperm(self.length, generator=torch.Generator().manual_seed(self.seed * 10_007 + self.epoch))
        mine = order[self.rank: self.per_rank() * self.world_size: self.world_size].tolist()
        return iter([(self.epoch, index) for index in mine[self.start:]])

    def __len__(self) -> int:
        return max(0, self.per_rank() - self.start)


class SeededItems(Dataset):
    """Wraps a dataset so item ``(epoch, index)`` is augmented with its own RNG seed (global RNG untouched)."""

    def __init__(self, dataset: Dataset, seed: int):
        self.dataset, self.seed = dataset, seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]):
        epoch, index = key
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed((self.seed * 1_000_003 + epoch * 100_003 + index) % 2**63)
            return self.dataset[index]
