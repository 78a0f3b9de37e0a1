"""Random images for speed tests: no decoding or augmentation cost."""

from __future__ import annotations

import torch
from torch.utils.data import Dataset


class SyntheticImages(Dataset):
    """``length`` items of ``(3, image_size, image_size)`` standard-normal noise, deterministic per index.

    ``transform`` is accepted (the trainer passes one to every data set) and ignored: noise needs no augmentation.
    """

    def __init__(self, image_size: int, length: int = 1024, transform=None):
        if length < 1:
            raise ValueError(f"length must be >= 1, got {length}")
        self.image_size = image_size
        self.length = length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(index)
        return torch.randn(3, self.image_size, self.image_size, generator=generator)
