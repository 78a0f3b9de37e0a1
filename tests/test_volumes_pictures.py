"""3D reconstruction pictures: the three mid-slices of original | masked | reconstruction, one PNG."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from sparkme.volume_pictures import mid_slices, save_slice_grid


class Echo(torch.nn.Module):
    """A model whose reconstruction is known: the masked input is the volume with its masked blocks zeroed, and the
    reconstruction is the volume itself."""

    def reconstruct(self, volumes, mask):
        keep = mask[:, None].repeat_interleave(8, 2).repeat_interleave(8, 3).repeat_interleave(8, 4)
        return volumes, volumes * keep, volumes


def test_mid_slices_are_the_three_orthogonal_planes():
    volume = torch.arange(4 * 6 * 8).reshape(4, 6, 8)
    axial, coronal, sagittal = mid_slices(volume)
    assert axial.shape == (6, 8) and coronal.shape == (4, 8) and sagittal.shape == (4, 6)
    assert torch.equal(axial, volume[2]) and torch.equal(coronal, volume[:, 3]) and torch.equal(sagittal,
                                                                                                 volume[:, :, 4])


def test_grid_has_three_rows_per_volume_and_shows_the_mask(tmp_path):
    volumes = torch.linspace(0, 1, 2 * 16 * 24 * 32).reshape(2, 1, 16, 24, 32)
    mask = torch.zeros(2, 2, 3, 4, dtype=torch.bool)
    mask[:, :, :, :2] = True  # the first half along W visible
    model = Echo().train()
    path = save_slice_grid(model, volumes, mask, tmp_path / "step.png")
    assert model.training  # mode restored
    image = np.asarray(Image.open(path).convert("L")).astype(float) / 255
    tile, pad = 32, 2  # tiles padded to the largest edge (W = 32)
    assert image.shape == (6 * (tile + pad) + pad, 3 * (tile + pad) + pad)
    def tile_at(row, col):
        y, x = pad + row * (tile + pad), pad + col * (tile + pad)
        return image[y:y + tile, x:x + tile]
    for row in range(6):
        assert np.allclose(tile_at(row, 0), tile_at(row, 2), atol=1 / 255)  # original == reconstruction
    axial_masked, axial_original = tile_at(0, 1), tile_at(0, 0)
    assert np.allclose(axial_masked[:24, :16], axial_original[:24, :16], atol=1 / 255)  # visible half kept
    assert axial_masked[:24, 16:].max() == 0 and axial_original[:24, 16:].min() > 0  # masked half dark
