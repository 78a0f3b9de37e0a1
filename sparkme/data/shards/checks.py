"""Start-up check of ``data=shards``: the shards exist, are tar files and hold samples, and every worker of every
rank has batches to read, before a model is built (``sparkme.engine.config_checks``)."""

from __future__ import annotations

import os

from omegaconf import DictConfig, OmegaConf

from sparkme.data.shards.stream import ShardImages, check_workers

SHARD_TARGETS = ("sparkme.data.shards.ShardImages", f"{ShardImages.__module__}.{ShardImages.__qualname__}")


def reads_shards(cfg: DictConfig) -> bool:
    """Whether the run's pretraining data are WebDataset shards."""
    dataset = cfg.data.get("dataset")
    return dataset is not None and dataset.get("_target_") in SHARD_TARGETS


def check_shards(cfg: DictConfig) -> None:
    """Raise ``UsageError`` for a pattern that matches nothing, a missing shard, a shard that is not a tar file, a
    ``pipe:`` shard without a manifest, or more workers than a rank has batches per epoch. Reads the manifest (or
    counts the local shards' tar headers), no image; the world size is torchrun's ``WORLD_SIZE``."""
    if not reads_shards(cfg):
        return
    settings = OmegaConf.to_container(cfg.data.dataset, resolve=True)
    settings.pop("_target_")
    images = ShardImages(transform=None, **settings)  # not hydra's instantiate: it would wrap the UsageError
    check_workers(len(images), len(images.urls), int(cfg.trainer.batch_size), int(cfg.trainer.accum_steps),
                  int(cfg.data.num_workers), int(os.environ.get("WORLD_SIZE", "1")))
