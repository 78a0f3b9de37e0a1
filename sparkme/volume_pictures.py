"""Reconstruction pictures of 3D volumes: per volume, the three orthogonal mid-slices (axial, coronal, sagittal),
each as a row original | masked input | reconstruction, in one PNG like the 2D grids.

Each volume's slices share one grey scale: the 1st to 99th percentile of its original, so that original and
reconstruction are comparable and masked voxels (zero in the masked input) show as the low end of the scale.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torchvision.utils import save_image


def mid_slices(volume: torch.Tensor) -> list[torch.Tensor]:
    """The three mid-slices of ``(D, H, W)``: ``volume[D//2]`` ``(H, W)``, ``[:, H//2]`` ``(D, W)``,
    ``[:, :, W//2]`` ``(D, H)``."""
    depth, height, width = volume.shape
    return [volume[depth // 2], volume[:, height // 2], volume[:, :, width // 2]]


def slice_rows(original: torch.Tensor, masked: torch.Tensor, reconstruction: torch.Tensor) -> torch.Tensor:
    """One volume's channel 0 as ``(9, 1, S, S)`` grey tiles in [0, 1]: per plane, original | masked |
    reconstruction (each slice padded to the largest edge ``S``)."""
    values = original[0].flatten().float()
    low, high = torch.quantile(values[:: max(1, values.numel() // 100_000)], torch.tensor([0.01, 0.99]))
    scale = (high - low).clamp_min(1e-6)
    tiles = []
    for planes in zip(*(mid_slices(v[0]) for v in (original, masked, reconstruction))):
        tiles += [((p.float() - low) / scale).clamp(0, 1) for p in planes]
    edge = max(max(t.shape) for t in tiles)
    return torch.stack([F.pad(t, (0, edge - t.shape[1], 0, edge - t.shape[0]), value=1.0) for t in tiles])[:, None]


def save_slice_grid(model, volumes: torch.Tensor, mask: torch.Tensor, path: str | Path) -> Path:
    """Run ``model.reconstruct`` on ``volumes`` ``(B, C, D, H, W)`` with ``mask`` (eval mode, restored afterwards)
    and save 3 rows per volume (axial, coronal, sagittal) of original | masked | reconstruction as PNG at ``path``."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            original, masked, reconstruction = model.reconstruct(volumes, mask)
    finally:
        model.train(was_training)
    tiles = torch.cat([slice_rows(o, m, r) for o, m, r in zip(original.cpu(), masked.cpu(), reconstruction.cpu())])
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image(tiles, path, nrow=3, padding=2, pad_value=1.0)
    return path
