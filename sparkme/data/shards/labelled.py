"""Labelled images from shards, for feature extraction (kNN, linear probe): ``(image, label)`` of every sample, the
label read from its ``.cls`` member (``sparkme-shards write`` stores the class index of a class-folder layout).

Worker w of a loader reads shards ``w, w + W, ...`` in full; unreadable images and samples without a label are
skipped with one warning each (the features then have fewer rows than the manifest's count).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence

from torch.utils.data import IterableDataset, get_worker_info

from sparkme.data.shards.manifest import shard_sizes
from sparkme.data.shards.sources import expand_urls
from sparkme.data.shards.stream import decode
from sparkme.data.shards.tar_samples import iter_samples

log = logging.getLogger(__name__)


class LabelledShards(IterableDataset):
    """``(transform(image), label)`` of every sample of the shards.

    Args:
        urls: shard addresses, as ``data.urls`` (paths, brace patterns, globs, ``pipe:<command>``).
        transform: PIL image -> tensor (e.g. ``sparkme.evaluation.features.probe_transform``).
        manifest: samples per shard; None: the one beside local shards, or count them.
    """

    def __init__(self, urls: str | Sequence[str], transform, manifest: str | None = None):
        self.urls = expand_urls(urls)
        self.sizes = shard_sizes(self.urls, manifest)
        self.transform = transform

    def __len__(self) -> int:
        return sum(self.sizes)

    def __iter__(self) -> Iterator[tuple]:
        info = get_worker_info()
        worker, workers = (0, 1) if info is None else (info.id, info.num_workers)
        for url in self.urls[worker::workers]:
            for key, members in iter_samples(url, extra=frozenset({"cls"})):
                image, why = decode(members.get("image"))
                if image is None or "cls" not in members:
                    log.warning("skipping sample %s of %s (%s)", key, url, why or "no .cls label")
                    continue
                yield self.transform(image), int(members["cls"])
