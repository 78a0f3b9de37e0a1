"""3D volumes from a folder of NIfTI files (``.nii``, ``.nii.gz``): seeded random crops for SparK pretraining.

>>> dataset = VolumeFolder("data/ct", crop_size=96, modality="ct")
>>> dataset[0].shape                                   # (C, 96, 96, 96) float32
torch.Size([1, 96, 96, 96])

Per item, in this order: the region to crop from (the whole volume, or its non-zero box with ``foreground_crop``),
a random crop of ``crop_size`` voxels at the target ``spacing`` (read lazily: only the crop's voxels are read, see
``sparkme.data.volumes_io``), resampling to that spacing (trilinear; off when ``spacing`` is None), intensity
normalisation per ``modality``, zero padding (centred) where the region is smaller than the crop, random flips along
each axis. Randomness comes from torch's global RNG, which ``SeededItems`` seeds per (epoch, index): crops are the
same in a resumed run. A volume that cannot be read mid-run is skipped (the next readable one takes its place),
logged and counted; only when no volume at all can be read does loading stop.
"""

from __future__ import annotations

import logging
import math
import struct
import zlib
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from sparkme.data.volumes_io import VolumeHeader, VolumeSummary, is_volume_file, read_header, read_region, summarise

log = logging.getLogger(__name__)

MODALITIES = ("mri", "ct", "none")
CHANNEL_MODES = ("stack", "split")
CT_WINDOW = (-175.0, 250.0)  # HU; nnssl's and the usual abdominal CT window, scaled to [0, 1]


def read_errors() -> tuple[type[BaseException], ...]:
    """What a broken volume file raises when read (nibabel's own error included)."""
    from nibabel.filebasedimages import ImageFileError

    return OSError, EOFError, ValueError, zlib.error, struct.error, ImageFileError


def list_volumes(root: Path) -> list[Path]:
    """Every ``.nii`` / ``.nii.gz`` file under ``root`` (recursively), sorted."""
    return sorted(p for p in root.rglob("*") if is_volume_file(p))


def holdout_split(files: list[Path], holdout: int) -> tuple[list[Path], list[Path]]:
    """``(train, holdout)``: ``holdout`` files chosen by a fixed seed (the same on every machine), the rest for
    training; with ``holdout=0`` both are every file."""
    if holdout == 0:
        return list(files), list(files)
    chosen = set(np.random.default_rng(0).permutation(len(files))[:holdout].tolist())
    return ([f for i, f in enumerate(files) if i not in chosen], [f for i, f in enumerate(files) if i in chosen])


def resampled_shape(header: VolumeHeader, spacing: tuple[float, ...] | None) -> tuple[int, ...]:
    """The spatial size of ``header``'s volume at ``spacing`` (mm; None keeps the voxels as they are)."""
    if spacing is None:
        return header.shape
    return tuple(max(1, round(n * s / t)) for n, s, t in zip(header.shape, header.spacing, spacing))


def describe_spacings(headers) -> str:
    """``"spacing 1.0x1.0x1.0 to 2.0x2.0x2.2 mm"``: the smallest and largest voxel of ``headers`` (by volume)."""
    spacings = sorted({tuple(round(s, 3) for s in h.spacing) for h in headers}, key=lambda s: math.prod(s))
    low, high = ("x".join(f"{v:g}" for v in s) for s in (spacings[0], spacings[-1]))
    return f"spacing {low} mm" if low == high else f"spacing {low} to {high} mm"


class VolumeFolder(Dataset):
    """Random crops ``(C, S, S, S)`` (float32, ``S = crop_size``) of the NIfTI volumes under ``root``.

    Args:
        root: folder of ``.nii`` / ``.nii.gz`` files, at any depth.
        crop_size: edge of the cubic crop in voxels (at ``spacing`` when given).
        channels: channels per item: 1, or a 4D file's channel count with ``channel_mode=stack``.
        channel_mode: ``stack``: a 4D file's fourth axis is its channels, stacked into one item; ``split``: each
            channel of a 4D file is an item of its own (one channel).
        modality: ``mri``: per-volume, per-channel z-score; ``ct``: clip to ``ct_window`` (HU) and scale to [0, 1];
            ``none``: values as stored.
        ct_window: ``(low, high)`` HU for ``modality=ct``.
        spacing: target voxel size ``(mm, mm, mm)`` to resample to; None (default) keeps each volume's own voxels.
        foreground_crop: crop from the non-zero box of each volume only (nnU-Net's crop to non-zero); the z-score
            statistics are then those of that box.
        flips: random flips along each of the three axes.
        holdout: volumes kept out of training (chosen by a fixed seed); ``split`` picks which side this is.
        split: ``train`` or ``holdout``.
        crops_per_epoch: items per epoch (item ``i`` crops volume ``i % n``); None: one per volume.
        transform: accepted (the trainer passes one to every data set) and ignored: 2D transforms do not apply.
    """

    def __init__(self, root: str, crop_size: int, channels: int = 1, channel_mode: str = "stack",
                 modality: str = "mri", ct_window: tuple[float, float] = CT_WINDOW,
                 spacing: tuple[float, float, float] | None = None, foreground_crop: bool = False,
                 flips: bool = True, holdout: int = 0, split: str = "train", crops_per_epoch: int | None = None,
                 transform=None):
        if modality not in MODALITIES:
            raise ValueError(f"modality must be one of {', '.join(MODALITIES)}, got {modality!r}")
        if channel_mode not in CHANNEL_MODES:
            raise ValueError(f"channel_mode must be one of {', '.join(CHANNEL_MODES)}, got {channel_mode!r}")
        if split not in ("train", "holdout"):
            raise ValueError(f"split must be 'train' or 'holdout', got {split!r}")
        self.root = Path(root).expanduser()
        train, held = holdout_split(list_volumes(self.root), int(holdout))
        files = train if split == "train" else held
        if not files:
            raise FileNotFoundError(f"data.root {str(self.root)!r} has no NIfTI volumes (.nii, .nii.gz)")
        self.headers = {path: read_header(path) for path in files}
        if channel_mode == "split":
            self.items = [(path, (c,)) for path in files for c in range(self.headers[path].channels)]
        else:
            self.items = [(path, tuple(range(self.headers[path].channels))) for path in files]
        self.crop_size, self.channels = int(crop_size), int(channels)
        self.modality, self.ct_window = modality, tuple(float(v) for v in ct_window)
        self.spacing = None if spacing is None else tuple(float(s) for s in spacing)
        self.foreground_crop, self.flips = bool(foreground_crop), bool(flips)
        self.crops_per_epoch = crops_per_epoch
        self.summaries: dict[tuple[Path, tuple[int, ...]], VolumeSummary] = {}  # per process: computed on first use
        self.bad: set[int] = set()
        resampling = f"resampled to {list(self.spacing)} mm" if self.spacing else "not resampled"
        log.info("%s: %d volume(s) of %s, %d item(s); %s", split, len(files), describe_spacings(self.headers.values()),
                 len(self.items), resampling)

    def __len__(self) -> int:
        return self.crops_per_epoch or len(self.items)

    def __getitem__(self, index: int) -> torch.Tensor:
        """Crop ``(C, S, S, S)`` of volume ``index % n``, or of the next readable one when it cannot be read."""
        errors = read_errors()
        for offset in range(len(self.items)):
            position = (index + offset) % len(self.items)
            if position in self.bad:
                continue
            try:
                return self.crop(position)
            except errors as error:
                self.bad.add(position)
                log.warning("skipping unreadable volume %s (%s: %s); %d of %d volumes skipped so far",
                            self.items[position][0], type(error).__name__, str(error).splitlines()[0][:200],
                            len(self.bad), len(self.items))
        raise RuntimeError(f"none of the {len(self.items)} volumes under {str(self.root)!r} can be read")

    def _summary(self, position: int) -> VolumeSummary | None:
        if self.modality != "mri" and not self.foreground_crop:
            return None  # nothing needs a pass over the volume
        key = self.items[position]
        if key not in self.summaries:
            self.summaries[key] = summarise(key[0], key[1], self.foreground_crop)
        return self.summaries[key]

    def crop(self, position: int) -> torch.Tensor:
        """One random crop of item ``position`` (raises what a broken file raises)."""
        path, channels = self.items[position]
        header = self.headers[path]
        summary = self._summary(position)
        box = summary.box if summary is not None and self.foreground_crop else tuple((0, n) for n in header.shape)
        factors = (1.0,) * 3 if self.spacing is None else tuple(s / t for s, t in zip(header.spacing, self.spacing))
        source, target = [], []
        for (low, high), factor in zip(box, factors):
            extent = max(1, round((high - low) * factor))  # the region's length at the target spacing
            size = min(self.crop_size, extent)
            start = int(torch.randint(0, extent - size + 1, ()).item())
            first = low + int(start / factor)
            source.append(slice(first, min(high, first + max(1, math.ceil(size / factor)))))
            target.append(size)
        volume = torch.from_numpy(read_region(path, tuple(source), channels))
        if tuple(volume.shape[1:]) != tuple(target):
            volume = F.interpolate(volume[None], size=tuple(target), mode="trilinear", align_corners=False)[0]
        volume = self._normalise(volume, summary, channels)
        volume = _pad_centred(volume, self.crop_size)
        if self.flips:
            axes = [axis + 1 for axis in range(3) if torch.rand(()) < 0.5]
            if axes:
                volume = volume.flip(axes)
        return volume

    def _normalise(self, volume: torch.Tensor, summary: VolumeSummary | None, channels: tuple[int, ...]) \
            -> torch.Tensor:
        """``(C, d, h, w)`` in the units of the model's input (see ``modality``)."""
        if self.modality == "ct":
            low, high = self.ct_window
            return volume.clamp_(low, high).sub_(low).div_(high - low)  # in place: a crop may be large
        if self.modality == "mri":
            mean = volume.new_tensor(summary.mean).view(-1, 1, 1, 1)
            std = volume.new_tensor(summary.std).view(-1, 1, 1, 1)
            return volume.sub_(mean).div_(std)
        return volume


def _pad_centred(volume: torch.Tensor, size: int) -> torch.Tensor:
    """Zero-pad ``(C, d, h, w)`` to ``(C, size, size, size)``, the volume centred (0 is the mean after a z-score,
    the window's low end after the CT scaling)."""
    pads = []
    for length in reversed(volume.shape[1:]):
        missing = size - length
        pads += [missing // 2, missing - missing // 2]
    return F.pad(volume, pads) if any(pads) else volume
