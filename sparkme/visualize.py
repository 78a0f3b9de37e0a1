"""Reconstruction pictures: one row per image, columns original | masked input | reconstruction."""

from __future__ import annotations

from pathlib import Path

import torch
from torchvision.utils import save_image

from sparkme.data.transforms import denormalize


def save_reconstruction_grid(model, images: torch.Tensor, mask: torch.Tensor, path: str | Path) -> Path:
    """Run ``model.reconstruct`` (eval mode, restored afterwards) and save the grid as PNG at ``path``."""
    was_training = model.training
    model.eval()
    try:
        original, masked, reconstruction = model.reconstruct(images, mask)
    finally:
        model.train(was_training)
    rows = torch.stack([denormalize(original), denormalize(masked), denormalize(reconstruction)], dim=1)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image(rows.flatten(0, 1).cpu(), path, nrow=3, padding=2, pad_value=1.0)
    return path
