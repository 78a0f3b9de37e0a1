"""Which samples of an epoch each rank and data-loader worker reads, and in what order: a pure function of the
seed, the epoch, the shard sizes and the layout (ranks, workers, batch), so a resume needs no loader state.

- The epoch's shards are permuted (seeded by seed and epoch) and concatenated into one stream of N samples.
- Rank r takes the contiguous range ``[r P, (r + 1) P)`` of it, P = the per-rank samples of an epoch (whole steps,
  the same on every rank; the last ``N - world P`` samples wait for another epoch's permutation). A range may start
  and end inside a shard, so no rank runs short however uneven the shards are.
- Inside a rank, batch k comes from stream ``k mod W`` (W workers; the data loader takes batches from its workers
  in turn); each stream reads its own contiguous part of the rank's range through a seeded shuffle buffer.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Piece:
    """Samples ``first .. first + count - 1`` of shard number ``shard``."""

    shard: int
    first: int
    count: int


@dataclass(frozen=True)
class StreamPlan:
    """One stream of one rank in one epoch: the pieces it reads in order, the epoch position of its first sample,
    and the order (positions in the stream, from 0) in which the shuffle buffer hands its samples out."""

    pieces: tuple[Piece, ...]
    first_position: int
    order: tuple[int, ...]


def epoch_shards(num_shards: int, seed: int, epoch: int) -> list[int]:
    """The order of the shards in ``epoch`` (the folder sampler's seeding: the same seed and epoch, the same
    permutation generator)."""
    return torch.randperm(num_shards, generator=torch.Generator().manual_seed(seed * 10_007 + epoch)).tolist()


def pieces_of(sizes: list[int], shard_order: list[int], start: int, length: int) -> tuple[Piece, ...]:
    """The pieces of shards that hold positions ``start .. start + length - 1`` of the concatenated stream."""
    pieces, position, end = [], 0, start + length
    for shard in shard_order:
        size = sizes[shard]
        low, high = max(start, position), min(end, position + size)
        if low < high:
            pieces.append(Piece(shard, low - position, high - low))
        position += size
        if position >= end:
            break
    return tuple(pieces)


def buffer_order(length: int, buffer: int, rng: random.Random) -> tuple[int, ...]:
    """The order in which a shuffle buffer of ``buffer`` samples hands out a stream of ``length`` samples: full,
    it gives out a random held sample and holds the incoming one in its place; at the end it gives out the rest in
    random order. The i-th sample handed out is among the first ``i + buffer + 1`` read, so a reader holds at most
    ``buffer`` samples besides the one it hands out."""
    held: list[int] = []
    order: list[int] = []
    for position in range(length):
        if len(held) < buffer:
            held.append(position)
            continue
        slot = rng.randrange(buffer)
        order.append(held[slot])
        held[slot] = position
    rng.shuffle(held)
    return tuple(order + held)


def stream_batches(rank_batches: int, streams: int) -> list[int]:
    """Batches of each stream: stream l serves batches l, l + W, l + 2W, ... of the rank's epoch."""
    return [len(range(stream, rank_batches, streams)) for stream in range(streams)]


def rank_streams(sizes: list[int], seed: int, epoch: int, rank: int, rank_batches: int, batch: int, streams: int,
                 buffer: int) -> list[StreamPlan]:
    """The ``streams`` plans of ``rank`` in ``epoch``: ``rank_batches`` batches of ``batch`` samples in all."""
    shard_order = epoch_shards(len(sizes), seed, epoch)
    position = rank * rank_batches * batch
    plans = []
    for stream, batches in enumerate(stream_batches(rank_batches, streams)):
        length = batches * batch
        rng = random.Random(f"sparkme-shards/{seed}/{epoch}/{rank}/{stream}")
        plans.append(StreamPlan(pieces_of(sizes, shard_order, position, length), position,
                                buffer_order(length, buffer, rng)))
        position += length
    return plans
