"""Reading NIfTI volumes lazily: headers, regions and per-volume statistics, never the whole volume at once.

nibabel's ``ArrayProxy`` slices a file without loading it: an uncompressed ``.nii`` is memory-mapped (a region
touches only its own pages), and a ``.nii.gz`` is decompressed as a stream (Python's ``gzip``, or ``indexed_gzip``
when installed) up to the end of the region, keeping only the region's bytes. Statistics run slab by slab along the
last axis, so their memory is one slab whatever the volume's size.

Axes: nibabel's array axes ``(i, j, k)`` are the tensors' ``(D, H, W)``; a 4D file's fourth axis is its channels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

VOLUME_SUFFIXES = (".nii", ".nii.gz")
SLAB_BYTES = 4 * 2**20  # statistics read this much of a volume (as float32) at a time


def is_volume_file(path: Path) -> bool:
    return path.is_file() and path.name.lower().endswith(VOLUME_SUFFIXES)


@dataclass(frozen=True)
class VolumeHeader:
    """What a volume's header says, read without its data.

    Attributes:
        shape: spatial size ``(D, H, W)`` in voxels (after dropping a 5D file's singleton fourth axis).
        channels: 1 for a 3D file, the fourth (or singleton-squeezed fifth) axis of a 4D file.
        spacing: voxel size in mm along ``(D, H, W)``.
        ndim: the array's number of dimensions as stored (2 for a 2D image).
    """

    shape: tuple[int, ...]
    channels: int
    spacing: tuple[float, ...]
    ndim: int


def open_volume(path: str | Path):
    """The nibabel image of ``path`` (header read, data untouched; memory-mapped when uncompressed). Its file stays
    open between reads: slab after slab of a ``.nii.gz`` then continue one decompression stream instead of starting
    it again from the file's beginning each time.

    Raises:
        nibabel.filebasedimages.ImageFileError, OSError, EOFError, ValueError: not a readable NIfTI file.
    """
    import nibabel

    image = nibabel.load(str(path), mmap=True, keep_file_open=True)
    if not isinstance(image, nibabel.Nifti1Image | nibabel.Nifti2Image):
        raise ValueError(f"a {type(image).__name__}, not a NIfTI volume")
    return image


def read_header(path: str | Path) -> VolumeHeader:
    """The ``VolumeHeader`` of ``path``; raises as ``open_volume``."""
    image = open_volume(path)
    shape = tuple(int(n) for n in image.shape)
    zooms = tuple(float(z) for z in image.header.get_zooms())
    ndim = len(shape)
    if ndim == 5 and shape[3] == 1:
        shape = (*shape[:3], shape[4])
        ndim = 4
    channels = shape[3] if ndim == 4 else 1
    spatial = shape[:3]
    spacing = tuple(z if z > 0 and math.isfinite(z) else 1.0 for z in (*zooms[:3], 1.0, 1.0, 1.0)[:len(spatial)])
    return VolumeHeader(shape=spatial, channels=channels, spacing=spacing, ndim=len(image.shape))


def _channel_index(image, channel: int) -> tuple:
    """The trailing index of ``channel`` in the stored array: none for 3D, ``(c,)`` for 4D, ``(0, c)`` for 5D."""
    ndim = len(image.shape)
    return () if ndim == 3 else (channel,) if ndim == 4 else (0, channel)


def read_region(path: str | Path, box: tuple[slice, slice, slice], channels: tuple[int, ...]) -> np.ndarray:
    """The region ``box`` of each of ``channels`` as float32 ``(len(channels), d, h, w)``, read lazily (the file's
    scaling slope and intercept applied)."""
    image = open_volume(path)
    return np.stack([np.asarray(image.dataobj[(*box, *_channel_index(image, c))], dtype=np.float32)
                     for c in channels])


@dataclass(frozen=True)
class VolumeSummary:
    """Per-channel statistics and the foreground box of one volume.

    Attributes:
        box: ``(start, stop)`` per spatial axis: the voxels non-zero in any channel (nnU-Net's crop to non-zero)
            when asked for, else (or when every voxel is zero) the whole volume.
        mean, std: per channel, over the voxels of ``box`` (float64 sums; std floored at 1e-8).
    """

    box: tuple[tuple[int, int], ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]


def _slabs(image, box: tuple[tuple[int, int], ...], channel: int):
    """``box`` of one channel as float32 slabs along the last spatial axis, each about ``SLAB_BYTES``; yields
    ``(offset along the last axis, slab)``."""
    (d0, d1), (h0, h1), (w0, w1) = box
    step = max(1, SLAB_BYTES // max((d1 - d0) * (h1 - h0) * 4, 1))
    for start in range(w0, w1, step):
        region = (slice(d0, d1), slice(h0, h1), slice(start, min(start + step, w1)), *_channel_index(image, channel))
        yield start, np.asarray(image.dataobj[region], dtype=np.float32)


def foreground_box(image, shape: tuple[int, ...], channels: tuple[int, ...]) -> tuple[tuple[int, int], ...]:
    """The bounding box of the voxels non-zero in any of ``channels``; the whole volume when there are none."""
    low, high = [math.inf] * 3, [-math.inf] * 3
    whole = tuple((0, n) for n in shape)
    for channel in channels:  # channel outermost: a gzip stream is then read forwards once per channel
        for start, slab in _slabs(image, whole, channel):
            nonzero = slab != 0  # a bool per voxel: an eighth of what the coordinates of np.nonzero would take
            for axis, offset in enumerate((0, 0, start)):
                hits = np.flatnonzero(nonzero.any(axis=tuple(a for a in range(3) if a != axis)))
                if hits.size:
                    low[axis] = min(low[axis], int(hits[0]) + offset)
                    high[axis] = max(high[axis], int(hits[-1]) + offset + 1)
    return whole if math.isinf(low[0]) else tuple((int(a), int(b)) for a, b in zip(low, high))


def summarise(path: str | Path, channels: tuple[int, ...], foreground: bool) -> VolumeSummary:
    """Statistics of ``channels`` of ``path`` over its foreground box (``foreground``) or the whole volume, read in
    slabs (memory: one slab, whatever the volume's size)."""
    image = open_volume(path)
    shape = read_header(path).shape
    box = foreground_box(image, shape, channels) if foreground else tuple((0, n) for n in shape)
    moments = np.zeros((len(channels), 3))  # count, sum, sum of squares
    for index, channel in enumerate(channels):
        for _, slab in _slabs(image, box, channel):
            moments[index] += (slab.size, slab.sum(dtype=np.float64), np.square(slab).sum(dtype=np.float64))
    count, total, squares = moments.T
    mean = total / count
    std = np.sqrt(np.maximum(squares / count - mean**2, 0.0))
    return VolumeSummary(box=box, mean=tuple(mean.tolist()), std=tuple(np.maximum(std, 1e-8).tolist()))
