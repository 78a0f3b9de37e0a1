"""The embedded default data set: real photographs bundled with scikit-image (no download).

Each item is a fresh random-resized crop of one photo, so a handful of photos gives an endless stream of views.
The hold-out split keeps photos that training never sees, for measuring generalisation of the reconstruction.
"""

from __future__ import annotations

import numpy as np
import skimage.data
from PIL import Image
from torch.utils.data import Dataset

TRAIN_PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry", "retina",
                "colorwheel", "camera", "coins", "clock", "brick", "grass", "gravel", "moon", "page", "text")
HOLDOUT_PHOTOS = ("cat", "cell", "microaneurysms")


def _load_rgb(name: str) -> Image.Image:
    array = np.asarray(getattr(skimage.data, name)())
    if array.dtype == bool:
        array = array.astype(np.uint8) * 255
    image = Image.fromarray(array)
    return image.convert("RGB")  # grayscale and RGBA photos become 3-channel RGB


class SamplePhotos(Dataset):
    """Random crops of scikit-image's bundled photos.

    Args:
        transform: PIL image -> tensor (e.g. ``pretrain_transform``).
        split: ``train`` (17 photos) or ``holdout`` (3 other photos).
        crops_per_epoch: length of one epoch; item i is a crop of photo ``i % num_photos``.
    """

    def __init__(self, transform, split: str = "train", crops_per_epoch: int = 512):
        if split not in ("train", "holdout"):
            raise ValueError(f"split must be 'train' or 'holdout', got {split!r}")
        if crops_per_epoch < 1:
            raise ValueError(f"crops_per_epoch must be >= 1, got {crops_per_epoch}")
        self.names = TRAIN_PHOTOS if split == "train" else HOLDOUT_PHOTOS
        self.photos = [_load_rgb(name) for name in self.names]
        self.transform = transform
        self.crops_per_epoch = crops_per_epoch

    def __len__(self) -> int:
        return self.crops_per_epoch

    def __getitem__(self, index: int):
        return self.transform(self.photos[index % len(self.photos)])
