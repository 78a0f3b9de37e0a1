"""Volumes' patch-block convolution (``sparse/block_conv.py``) against the gather-GEMM it replaces on the ``torch``
backend: float64, outputs and both gradients, for every conv geometry volume encoders use, on masks with an
all-visible sample and a sample with one visible patch."""

import pytest
import torch
from torch import nn

from conftest import relative_error
from sparkme.masking import random_grid_mask
from sparkme.sparse import MaskContext
from sparkme.sparse.block_conv import MIN_BLOCK_SIDE, block_conv, uses_blocks
from sparkme.sparse.conv import Algorithm, ConvSpec
from sparkme.sparse.kernels import gather_conv

PATCH = 16
GEOMETRIES = {  # name -> (kernel, stride, padding, input stride)
    "3x3x3": (3, 1, 1, 1),
    "3x3x3 at stride 4": (3, 1, 1, 4),
    "3x3x3 stride 2": (3, 2, 1, 1),
    "1x1x1 stride 2 (shortcut)": (1, 2, 0, 2),
    "7x7x7 stride 2 (MONAI stem)": (7, 2, 3, 1),
    "2x2x2 patchify": (2, 2, 0, 1),
}


def _context() -> MaskContext:
    mask = random_grid_mask(3, (2, 3, 2), 0.5, generator=torch.Generator().manual_seed(0))
    mask[0] = True  # all visible
    mask[1] = False
    mask[1, 1, 2, 0] = True  # one visible patch, at the volume's edge
    return MaskContext(mask, (2 * PATCH, 3 * PATCH, 2 * PATCH), patch_size=PATCH)


@pytest.mark.parametrize("name", list(GEOMETRIES))
def test_block_conv_equals_the_gather_gemm(name):
    kernel, stride, padding, in_stride = GEOMETRIES[name]
    context = _context()
    spec = ConvSpec(kernel, stride, padding, 1, Algorithm.GATHER_GEMM)
    assert uses_blocks(context, in_stride, spec)
    generator = torch.Generator().manual_seed(1)
    rows = int(context.dense_mask(in_stride).sum())
    features = torch.randn(rows, 3, generator=generator, dtype=torch.float64)
    weight = torch.randn(5, 3, kernel, kernel, kernel, generator=generator, dtype=torch.float64)

    def run(fn):
        f, w = features.clone().requires_grad_(), weight.clone().requires_grad_()
        out = fn(f, w)
        (out * torch.linspace(-1, 2, out.numel(), dtype=out.dtype).view_as(out)).sum().backward()
        return out.detach(), f.grad, w.grad

    table = context.neighbours(in_stride, kernel, stride, padding)
    ours = run(lambda f, w: block_conv(f, context, in_stride, w, spec))
    reference = run(lambda f, w: gather_conv(f, table, w, None, spec))
    assert ours[0].shape == (int(context.dense_mask(in_stride * stride).sum()), 5)
    for what, a, b in zip(("output", "input gradient", "weight gradient"), ours, reference):
        assert relative_error(a, b) < 1e-12, f"{name}: {what}"


def test_blocks_are_for_volumes_with_large_enough_patches_only():
    spec = ConvSpec(3, 1, 1, 1, Algorithm.GATHER_GEMM)
    volumes = _context()
    assert uses_blocks(volumes, PATCH // MIN_BLOCK_SIDE, spec)
    assert not uses_blocks(volumes, 2 * PATCH // MIN_BLOCK_SIDE, spec)
    grouped = ConvSpec(3, 1, 1, 2, Algorithm.GATHER_GROUPED)
    assert not uses_blocks(volumes, 1, grouped)
    images = MaskContext(torch.ones(1, 2, 2, dtype=torch.bool), (64, 64))
    assert not uses_blocks(images, 1, spec)  # 2-D keeps its gather-GEMM, bit for bit


def test_block_conv_under_bf16_autocast_runs_in_bf16_and_returns_float32_gradients():
    context = _context()
    spec = ConvSpec(3, 1, 1, 1, Algorithm.GATHER_GEMM)
    conv = nn.Conv3d(3, 4, 3, padding=1, bias=False)
    features = torch.randn(int(context.dense_mask(1).sum()), 3, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = block_conv(features, context, 1, conv.weight, spec)
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert features.grad.dtype == torch.float32 and conv.weight.grad.dtype == torch.float32
    exact = gather_conv(features.detach(), context.neighbours(1, 3, 1, 1), conv.weight.detach(), None, spec)
    assert relative_error(out.float(), exact) < 2e-2
