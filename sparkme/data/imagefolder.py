"""Images from a folder: ImageNet layout (``root/class/xxx.jpg``) or a flat folder, any format PIL reads.

Unreadable, truncated or non-image files are skipped with one warning each and counted; when more than
``max_bad_fraction`` of the files fail, loading stops with a clear error instead of training on too little.
"""

from __future__ import annotations

import logging
from pathlib import Path

from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}


class ImageFolderDataset(Dataset):
    """Every image file under ``root`` (recursively), converted to RGB (grayscale, RGBA and 16-bit included).

    Args:
        root: folder of images, flat or one sub-folder per class (labels are ignored: pretraining is unsupervised).
        transform: PIL image -> tensor.
        max_bad_fraction: abort when more than this fraction of files cannot be decoded.
    """

    def __init__(self, root: str, transform, max_bad_fraction: float = 0.1):
        self.root = Path(root).expanduser()
        if not self.root.is_dir():
            raise FileNotFoundError(f"data.root {str(self.root)!r} does not exist or is not a directory")
        self.files = sorted(p for p in self.root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        if not self.files:
            raise FileNotFoundError(
                f"data.root {str(self.root)!r} has no image files ({', '.join(sorted(IMAGE_SUFFIXES))})")
        self.transform = transform
        self.max_bad_fraction = max_bad_fraction
        self.bad: set[int] = set()

    def __len__(self) -> int:
        return len(self.files)

    def _open(self, index: int) -> Image.Image | None:
        path = self.files[index]
        try:
            with Image.open(path) as image:
                image.load()
                if image.mode in ("I;16", "I;16B", "I;16L", "I"):
                    image = image.point(lambda v: v / 256).convert("L")  # 16-bit: keep the top 8 bits
                return image.convert("RGB")
        except (UnidentifiedImageError, OSError, ValueError) as error:
            if index not in self.bad:
                self.bad.add(index)
                log.warning("skipping unreadable image %s (%s)", path, error)
            if len(self.bad) > self.max_bad_fraction * len(self.files):
                raise RuntimeError(
                    f"{len(self.bad)} of {len(self.files)} files under {str(self.root)!r} could not be read, more "
                    f"than data.max_bad_fraction={self.max_bad_fraction}") from error
            return None

    def __getitem__(self, index: int):
        # A bad file is replaced by the next readable one so batches keep their size.
        for offset in range(len(self.files)):
            image = self._open((index + offset) % len(self.files))
            if image is not None:
                return self.transform(image)
        raise RuntimeError(f"no readable image under {str(self.root)!r}")
