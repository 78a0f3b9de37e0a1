"""Generated NIfTI volumes for the 3D demo and tests: a head-like ellipsoid with smooth blobs, on a zero background.

Structure that masked reconstruction can learn (smooth shapes, a boundary, a background), made in seconds on a CPU.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def blob_volume(shape: tuple[int, int, int], rng: np.random.Generator, blobs: int = 6) -> np.ndarray:
    """A float32 volume of ``shape``: an ellipsoid (intensity about 100) holding ``blobs`` Gaussian blobs of
    either sign, plus mild noise, zero outside the ellipsoid."""
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, n, dtype=np.float32) for n in shape], indexing="ij"))
    radii = rng.uniform(0.6, 0.9, size=3).astype(np.float32).reshape(3, 1, 1, 1)
    inside = (np.square(grid / radii).sum(0) <= 1.0)
    volume = np.full(shape, 100.0, dtype=np.float32)
    for _ in range(blobs):
        centre = rng.uniform(-0.5, 0.5, size=3).astype(np.float32).reshape(3, 1, 1, 1)
        width = rng.uniform(0.1, 0.3)
        volume += rng.uniform(-60, 60) * np.exp(-np.square(grid - centre).sum(0) / (2 * width**2))
    volume += rng.normal(0, 3, size=shape).astype(np.float32)
    return np.where(inside, volume, 0.0).astype(np.float32)


def write_blob_volumes(folder: str | Path, count: int, shape: tuple[int, int, int] = (48, 48, 48), seed: int = 0,
                       spacing: tuple[float, float, float] = (1.0, 1.0, 1.0), compressed: bool = True) -> list[Path]:
    """Write ``count`` blob volumes as ``blob_XXX.nii.gz`` (or ``.nii``) into ``folder``; returns their paths."""
    import nibabel

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for index in range(count):
        image = nibabel.Nifti1Image(blob_volume(tuple(shape), rng), np.diag([*spacing, 1.0]))
        path = folder / f"blob_{index:03d}.nii{'.gz' if compressed else ''}"
        nibabel.save(image, str(path))
        paths.append(path)
    return paths
