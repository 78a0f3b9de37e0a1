"""WebDataset tar shards for pretraining at scale: sources and manifests, the epoch layout over ranks and workers,
the resumable stream, and ``sparkme-shards`` to write and count shards."""

from sparkme.data.shards.labelled import LabelledShards
from sparkme.data.shards.stream import ShardImages

__all__ = ["LabelledShards", "ShardImages"]
