"""float32 forward and backward of every sparse spatial op against float64 ``F.conv2d`` / ``F.max_pool2d`` from the
*same* numbers (inputs, weights and upstream gradient drawn in float64, then cast), so the allowance is float32
rounding alone: a float32-only slip in a kernel's backward (a gradient scaled by 1.5, negated, a scatter-add
dropped) fails here even when the float64 path is right.

The whole-encoder float32 checks are in ``tests/test_encoders.py``; why ResNet-50 needs a wider per-tensor
allowance there is measured by ``tools/float32_study.py`` (README, "How the tests prove correctness").
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import ALL_BACKENDS, DEVICE, relative_error
from sparkme.masking import mask_at_stride, random_mask
from sparkme.sparse import sparse_from_images

# float32 with reductions of at most a few hundred terms: measured errors are ~1e-7..1e-6 of the largest value.
TOLERANCE = 2e-5

# (in channels, out channels, kernel, stride, groups): every conv geometry the supported backbones use.
CONVS = {
    "3x3": (16, 24, 3, 1, 1),
    "3x3-s2": (16, 24, 3, 2, 1),
    "1x1": (16, 24, 1, 1, 1),
    "1x1-s2": (16, 24, 1, 2, 1),
    "7x7-s2-stem": (3, 16, 7, 2, 1),
    "2x2-s2-patchify": (16, 24, 2, 2, 1),
    "4x4-s4-patchify": (3, 16, 4, 4, 1),
    "7x7-depthwise": (16, 16, 7, 1, 16),
    "3x3-s2-depthwise": (16, 16, 3, 2, 16),
}


def _inputs(channels: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(2, channels, 64, 96, generator=generator, dtype=torch.float64)
    return images, random_mask(2, 2, 3, 0.5, generator=generator)


def _float32_and_float64(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A float32 leaf and the float64 leaf holding exactly the same numbers."""
    single = values.float().to(DEVICE).requires_grad_()
    return single, single.detach().double().requires_grad_()


@pytest.mark.parametrize("geometry", list(CONVS))
@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_float32_conv_output_and_gradients_match_float64_conv2d_from_the_same_numbers(backend, geometry):
    c_in, c_out, kernel, stride, groups = CONVS[geometry]
    padding = kernel // 2 if kernel % 2 else 0
    images, mask = _inputs(c_in)
    mask = mask.to(DEVICE)
    generator = torch.Generator().manual_seed(1)
    weight = torch.randn(c_out, c_in // groups, kernel, kernel, generator=generator, dtype=torch.float64)
    bias = torch.randn(c_out, generator=generator, dtype=torch.float64)
    images32, images64 = _float32_and_float64(images)
    weight32, weight64 = _float32_and_float64(weight)
    bias32, bias64 = _float32_and_float64(bias)

    pixel_mask = mask_at_stride(mask, 1)[:, None]
    out_mask = mask_at_stride(mask, stride)[:, None]
    reference = F.conv2d(images64 * pixel_mask, weight64, bias64, stride, padding, 1, groups) * out_mask
    upstream = torch.randn(reference.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    upstream = upstream.to(DEVICE)
    (reference * upstream).sum().backward()

    conv = torch.nn.Conv2d(c_in, c_out, kernel, stride, padding, groups=groups).to(DEVICE)
    del conv.weight, conv.bias  # the float32 leaves themselves, so their .grad is what the backend produced
    conv.weight, conv.bias = weight32, bias32
    out = sparse_from_images(images32, mask, backend).conv2d(conv).to_dense()
    assert out.dtype == torch.float32 and out.shape == reference.shape
    (out * upstream.float()).sum().backward()

    assert relative_error(out.detach().double(), reference.detach()) <= TOLERANCE, "output"
    assert relative_error(images32.grad.double(), images64.grad) <= TOLERANCE, "input gradient"
    assert relative_error(weight32.grad.double(), weight64.grad) <= TOLERANCE, "weight gradient"
    assert relative_error(bias32.grad.double(), bias64.grad) <= TOLERANCE, "bias gradient"


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_float32_max_pool_gradient_matches_float64_from_the_same_numbers(backend):
    """Inputs >= 0, as after ResNet's ReLU (where sparse max pooling is exact)."""
    images, mask = _inputs(8)
    images32, images64 = _float32_and_float64(images.abs())
    mask = mask.to(DEVICE)
    reference = F.max_pool2d(images64 * mask_at_stride(mask, 1)[:, None], 3, 2, 1) * mask_at_stride(mask, 2)[:, None]
    upstream = torch.randn(reference.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    upstream = upstream.to(DEVICE)
    (reference * upstream).sum().backward()
    out = sparse_from_images(images32, mask, backend).max_pool2d(3, 2, 1).to_dense()
    (out * upstream.float()).sum().backward()
    assert relative_error(out.detach().double(), reference.detach()) <= TOLERANCE
    assert relative_error(images32.grad.double(), images64.grad) <= TOLERANCE
