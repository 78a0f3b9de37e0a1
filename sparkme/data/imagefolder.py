"""Images from a folder: ImageNet layout (``root/class/xxx.jpg``) or a flat folder, any format PIL reads.

Unreadable, truncated or non-image files are skipped with one warning each and counted; when more than
``max_bad_fraction`` of the files fail, loading stops with a clear error instead of training on too little.
A seeded ``holdout_fraction`` of the files can be set aside: ``split="train"`` reads the others, ``split="holdout"``
those (pretraining's ``holdout_loss`` is measured on them).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from sparkme.errors import UsageError

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}
SPLITS = ("train", "holdout")


def holdout_indices(count: int, fraction: float, seed: int) -> set[int]:
    """The indices, among ``count`` files, that a seeded ``fraction`` sets aside: ``round(fraction * count)``, at
    least one when ``fraction > 0`` and never all (empty for ``fraction == 0``).

    Raises:
        UsageError: ``fraction`` outside [0, 1), or a fraction > 0 of fewer than two files.
    """
    if not 0.0 <= float(fraction) < 1.0:
        raise UsageError(f"data.holdout_fraction must be a number in [0, 1) (0: no held-out images), got {fraction!r}")
    if fraction == 0:
        return set()
    if count < 2:
        raise UsageError(f"data.holdout_fraction={fraction} needs at least 2 images to hold one out, found {count}; "
                         "use data.holdout_fraction=0 data.holdout=null")
    held = min(max(round(fraction * count), 1), count - 1)
    order = torch.randperm(count, generator=torch.Generator().manual_seed(int(seed)))
    return set(order[:held].tolist())


def read_rgb(path: str | Path) -> Image.Image:
    """Decode one image file as RGB (grayscale, RGBA, palette and 16-bit included).

    Raises:
        UnidentifiedImageError, OSError, ValueError: the file is not an image PIL decodes, or is truncated.
    """
    with Image.open(path) as image:
        image.load()
        if image.mode in ("I;16", "I;16B", "I;16L", "I"):
            image = image.point(lambda v: v / 256).convert("L")  # 16-bit: keep the top 8 bits
        return image.convert("RGB")


class ImageFolderDataset(Dataset):
    """Every image file under ``root`` (recursively), converted to RGB (grayscale, RGBA and 16-bit included).

    Args:
        root: folder of images, flat or one sub-folder per class (labels are ignored: pretraining is unsupervised).
        transform: PIL image -> tensor.
        max_bad_fraction: abort when more than this fraction of files cannot be decoded.
        files: the image files to read, when already listed (``sparkme.data.labelled``); None lists ``root``.
        holdout_fraction: the fraction of the files set aside (seeded by ``seed``; see ``holdout_indices``).
        split: ``"train"``: the files not set aside; ``"holdout"``: those set aside.
        seed: seeds the choice of the held-out files (the same for both splits).

    Raises:
        FileNotFoundError: ``root`` is not a folder or holds no image.
        UsageError: a bad ``split`` or ``holdout_fraction``, or ``split="holdout"`` with nothing held out.
    """

    def __init__(self, root: str, transform, max_bad_fraction: float = 0.1, files: list[Path] | None = None,
                 holdout_fraction: float = 0.0, split: str = "train", seed: int = 0):
        self.root = Path(root).expanduser()
        if not self.root.is_dir():
            raise FileNotFoundError(f"data.root {str(self.root)!r} does not exist or is not a directory")
        self.files = list(files) if files is not None else sorted(
            p for p in self.root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        if not self.files:
            raise FileNotFoundError(
                f"data.root {str(self.root)!r} has no image files ({', '.join(sorted(IMAGE_SUFFIXES))})")
        if split not in SPLITS:
            raise UsageError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
        if split == "holdout" and holdout_fraction == 0:
            raise UsageError("data.holdout_fraction=0 holds no image out: add data.holdout=null (holdout_loss is "
                             "then measured on training images), or give a fraction > 0")
        held = holdout_indices(len(self.files), holdout_fraction, seed)
        self.files = [f for i, f in enumerate(self.files) if (i in held) == (split == "holdout")]
        self.transform = transform
        self.max_bad_fraction = max_bad_fraction
        self.bad: set[int] = set()

    def __len__(self) -> int:
        return len(self.files)

    def _open(self, index: int) -> Image.Image | None:
        path = self.files[index]
        try:
            return read_rgb(path)
        except (UnidentifiedImageError, OSError, ValueError) as error:
            if index not in self.bad:
                self.bad.add(index)
                log.warning("skipping unreadable image %s (%s)", path, error)
            if len(self.bad) > self.max_bad_fraction * len(self.files):
                raise RuntimeError(
                    f"{len(self.bad)} of {len(self.files)} files under {str(self.root)!r} could not be read, more "
                    f"than data.max_bad_fraction={self.max_bad_fraction}") from error
            return None

    def _readable(self, index: int) -> tuple[int, Image.Image]:
        """The image at ``index``, or when it cannot be read the next readable one (so batches keep their size),
        with the index it was read from."""
        for offset in range(len(self.files)):
            position = (index + offset) % len(self.files)
            image = self._open(position)
            if image is not None:
                return position, image
        raise RuntimeError(f"no readable image under {str(self.root)!r}")

    def __getitem__(self, index: int):
        return self.transform(self._readable(index)[1])
