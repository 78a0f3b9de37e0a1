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
    """

    def __init__(self, root: str, transform, max_bad_fraction: float = 0.1, files: list[Path] | None = None):
        self.root = Path(root).expanduser()
        if not self.root.is_dir():
            raise FileNotFoundError(f"data.root {str(self.root)!r} does not exist or is not a directory")
        self.files = list(files) if files is not None else sorted(
            p for p in self.root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
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
