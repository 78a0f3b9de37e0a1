"""The parts of the SparK model between encoder and loss, each against a reference written here: ``Densify`` (norm
of the visible features, mask token at the hidden ones, projection), the decoder's wiring of the four densified
maps, and ``SparK.reconstruct`` (input pasted on visible patches, un-normalised prediction on hidden ones)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import ALL_BACKENDS, relative_error
from sparkme.masking import mask_at_stride, random_mask
from sparkme.models import build_spark
from sparkme.models.spark import NORM_PIX_EPS, Densify
from sparkme.sparse import sparse_from_images

CHANNELS = 8


def _inputs(batch: int = 2, channels: int = CHANNELS, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 (B, C, 64, 96) images with per-channel offsets and a mask hiding 4 of the 6 patches per image."""
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(batch, channels, 64, 96, generator=generator, dtype=torch.float64)
    images = images + torch.randn(1, channels, 1, 1, generator=generator, dtype=torch.float64)
    return images, random_mask(batch, 2, 3, 0.6, generator=generator)


def _randomised_densify(densify: Densify) -> Densify:
    """Non-trivial norm affine and a mask token far from the normalised values (defaults 1, 0, ~0 hide bugs)."""
    generator = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for parameter in densify.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator, dtype=parameter.dtype) * 0.5 + 1.0)
        densify.mask_token.add_(3.0)
    return densify


def _expected_filled(densify: Densify, images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Plain-torch densify before the projection: normalised visible rows, the mask token everywhere else."""
    pixel_mask = mask_at_stride(mask, 1)
    rows = images.permute(0, 2, 3, 1)[pixel_mask]
    norm = densify.norm
    if isinstance(norm, torch.nn.BatchNorm2d):
        rows = F.batch_norm(rows, None, None, norm.weight, norm.bias, training=True, eps=norm.eps)
    else:
        rows = F.layer_norm(rows, (rows.shape[1],), norm.weight, norm.bias, norm.eps)
    dense = densify.mask_token.detach().expand(*pixel_mask.shape, rows.shape[1]).clone()
    dense[pixel_mask] = rows
    return dense.permute(0, 3, 1, 2)


@pytest.mark.parametrize("norm", ["bn", "ln"])
@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_densify_with_identity_projection_is_normalised_visible_features_and_mask_token_elsewhere(backend, norm):
    images, mask = _inputs()
    densify = _randomised_densify(Densify(CHANNELS, CHANNELS, norm, kernel_size=1).double()).train()
    assert isinstance(densify.proj, torch.nn.Identity)
    with torch.no_grad():
        out = densify(sparse_from_images(images, mask, backend))
    expected = _expected_filled(densify, images, mask)
    assert out.shape == images.shape
    assert relative_error(out, expected) <= 1e-10
    hidden = ~mask_at_stride(mask, 1)
    assert torch.equal(out.permute(0, 2, 3, 1)[hidden], densify.mask_token.detach().expand(int(hidden.sum()), -1))


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_densify_projection_is_a_3x3_conv_of_the_filled_map(backend):
    images, mask = _inputs()
    densify = _randomised_densify(Densify(CHANNELS, 5, "bn", kernel_size=3).double()).train()
    with torch.no_grad():
        out = densify(sparse_from_images(images, mask, backend))
        expected = F.conv2d(_expected_filled(densify, images, mask), densify.proj.weight, densify.proj.bias,
                            padding=1)
    assert out.shape == (2, 5, 64, 96)
    assert relative_error(out, expected) <= 1e-10


@pytest.fixture(scope="module")
def small_spark():
    torch.manual_seed(0)
    return build_spark("resnet18", "torch", decoder_width=64)


def test_decoder_adds_each_densified_map_before_its_block(small_spark):
    """The decoder against its recipe written out: x = d32; then per block: up-block, add the next map."""
    decoder = small_spark.decoder.eval()
    generator = torch.Generator().manual_seed(1)
    maps = [torch.randn(2, width, 2 * 2**i, 2 * 2**i, generator=generator)
            for i, width in enumerate(decoder.widths[:4])]
    with torch.no_grad():
        x = maps[0]
        for i, block in enumerate(decoder.blocks):
            x = block(x)
            if i + 1 < len(maps):
                x = x + maps[i + 1]
        expected = decoder.proj(x)
        assert relative_error(decoder(maps), expected) <= 1e-6
    decoder.train()


def test_a_nonzero_gradient_reaches_each_of_the_four_densified_maps(small_spark):
    model = small_spark.train()
    images, mask = _inputs(channels=3)
    images = images[:, :, :, :64].float()
    mask = mask[:, :, :2].clone()
    mask[:, 0, 0], mask[:, 1, 1] = True, False  # one visible and one hidden patch per image at least
    captured = []

    def keep(module, inputs, output):
        output.retain_grad()
        captured.append(output)

    handles = [densify.register_forward_hook(keep) for densify in model.densify]
    try:
        model(images, mask).backward()
    finally:
        for handle in handles:
            handle.remove()
    assert [tuple(c.shape) for c in captured] == [(2, w, 2 * 2**i, 2 * 2**i)
                                                  for i, w in enumerate(model.decoder.widths[:4])]
    for stride, densified in zip((32, 16, 8, 4), captured):
        assert densified.grad is not None and densified.grad.abs().sum() > 0, f"stride {stride}"
        assert torch.isfinite(densified.grad).all()
    for densify in model.densify:
        assert densify.mask_token.grad.abs().sum() > 0  # hidden sites exist at every scale
    model.zero_grad(set_to_none=True)


def test_reconstruct_pastes_the_input_on_visible_patches_and_the_unnormalised_prediction_on_hidden_ones(
        small_spark):
    model = small_spark.eval()
    generator = torch.Generator().manual_seed(2)
    images = torch.randn(2, 3, 64, 96, generator=generator) * 2 + 0.5
    mask = random_mask(2, 2, 3, 0.5, generator=generator)
    with torch.no_grad():
        predicted = model.reconstruct_normalised(images, mask)
    original, masked_input, reconstruction = model.reconstruct(images, mask)
    assert torch.equal(original, images)
    for b in range(2):
        for i in range(2):
            for j in range(3):
                rows, cols = slice(32 * i, 32 * i + 32), slice(32 * j, 32 * j + 32)
                patch = images[b, :, rows, cols]
                if mask[b, i, j]:
                    assert torch.equal(reconstruction[b, :, rows, cols], patch)
                    assert torch.equal(masked_input[b, :, rows, cols], patch)
                else:
                    std = (patch.var() + NORM_PIX_EPS).sqrt()  # SparK: unbiased variance of the whole patch
                    expected = predicted[b, :, rows, cols] * std + patch.mean()
                    assert relative_error(reconstruction[b, :, rows, cols], expected) <= 1e-5
                    assert not torch.equal(reconstruction[b, :, rows, cols], patch)
                    assert torch.all(masked_input[b, :, rows, cols] == 0)
    model.train()
