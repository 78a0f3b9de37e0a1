"""Shards shared by the tests that train on them across processes (``test_shards_resume``, ``test_multinode``)."""

from __future__ import annotations

import torch
from PIL import Image

from sparkme.data.shards.writer import write_shards


def uneven_shard_urls(tmp_path_factory) -> str:
    """``data.urls=...`` of 16 generated 40 x 48 images (seeded) in 4 shards of 5, 5, 5 and 1: uneven over 2 ranks."""
    folder, out = tmp_path_factory.mktemp("images"), tmp_path_factory.mktemp("shards")
    generator = torch.Generator().manual_seed(0)
    for index in range(16):
        pixels = torch.randint(0, 256, (40, 48, 3), generator=generator, dtype=torch.uint8).numpy()
        Image.fromarray(pixels).save(folder / f"{index}.png")
    write_shards(folder, out, per_shard=5)
    return f'data.urls="{out}/train-{{000000..000003}}.tar"'
