"""Deterministic, resumable, sharded data order.

The order of epoch e is a permutation seeded by (seed, e); each rank takes every world_size-th item. Every item's
augmentation is seeded by (seed, epoch, index), so a resumed run sees exactly the crops an uninterrupted run
would, with any number of data-loader workers.
"""

from __future__ import annotations

import math
import random

import torch
from torch.utils.data import Dataset, Sampler

# timm's RepeatAugSampler keeps a multiple of this many images per epoch (its ``selected_round``)
REPEATED_AUG_ROUND = 256


def items_per_rank(length: int, world_size: int = 1, repeats: int = 1) -> int:
    """How many items one rank takes per epoch, as the samplers of SparK's fine-tuning count them.

    - ``repeats == 1``: torch's ``DistributedSampler(drop_last=True)``: ``length // world_size`` (equal shards, the
      remainder left out).
    - ``repeats > 1``: timm's ``RepeatAugSampler``: ``length`` rounded down to a multiple of 256 (all of it below
      256 images, rounded up), divided by ``world_size``, at most ``ceil(length x repeats / world_size)``.
    """
    if repeats == 1:
        return length // world_size
    if length >= REPEATED_AUG_ROUND:
        selected = length // REPEATED_AUG_ROUND * REPEATED_AUG_ROUND // world_size
    else:
        selected = math.ceil(length / world_size)
    return min(selected, math.ceil(length * repeats / world_size))


class ResumableSampler(Sampler):
    """Yields ``(key, index)`` pairs for one rank, starting ``start`` items into the epoch; ``key`` seeds the item's
    augmentation (``SeededItems``): the epoch, or with ``repeats`` > 1 the epoch and which repeat it is.

    Args:
        repeats: repeated augmentation (timm's ``RepeatAugSampler``, SparK's ConvNeXt fine-tuning): each image of
            the permutation appears ``repeats`` times in a row, each time with its own augmentation, and the
            repeats go to different ranks; rank r takes items r, r + world_size, ... of that list (wrapping round
            to its start when it runs out), ``items_per_rank`` of them.
    """

    def __init__(self, length: int, seed: int, epoch: int, rank: int = 0, world_size: int = 1, start: int = 0,
                 repeats: int = 1):
        self.length, self.seed, self.epoch = length, seed, epoch
        self.rank, self.world_size, self.start, self.repeats = rank, world_size, start, repeats

    def per_rank(self) -> int:
        return items_per_rank(self.length, self.world_size, self.repeats)  # every rank makes the same steps

    def __iter__(self):
        order = torch.randperm(self.length, generator=torch.Generator().manual_seed(self.seed * 10_007 + self.epoch))
        if self.repeats == 1:
            mine = order[self.rank: self.per_rank() * self.world_size: self.world_size].tolist()
            return iter([(self.epoch, index) for index in mine[self.start:]])
        repeated = [(self.epoch * self.repeats + copy, index) for index in order.tolist()
                    for copy in range(self.repeats)]
        positions = range(self.rank, self.per_rank() * self.world_size, self.world_size)
        return iter([repeated[position % len(repeated)] for position in positions][self.start:])

    def __len__(self) -> int:
        return max(0, self.per_rank() - self.start)


class SeededItems(Dataset):
    """Wraps a dataset so item ``(epoch, index)`` is augmented with its own RNG seed: torch's, and Python's (timm's
    random erasing draws from ``random``); the global RNG states are untouched."""

    def __init__(self, dataset: Dataset, seed: int):
        self.dataset, self.seed = dataset, seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]):
        epoch, index = key
        item_seed = (self.seed * 1_000_003 + epoch * 100_003 + index) % 2**63
        python_state = random.getstate()
        try:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(item_seed)
                random.seed(item_seed)
                return self.dataset[index]
        finally:
            random.setstate(python_state)
