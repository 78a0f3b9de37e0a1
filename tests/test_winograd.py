"""Winograd F(m x m, 3 x 3) of the dense half against ``F.conv2d``: exact in float64 (forward and every gradient),
within float32 rounding in float32, and chosen only where it is meant to run."""

import pytest
import torch
import torch.nn.functional as F

from sparkme.models.winograd import F2X2_3X3, F4X4_3X3, TILES, Conv3x3, winograd_conv3x3, winograd_tile

SHAPES = [(14, 14), (7, 9), (8, 8), (1, 5)]  # multiples of the tile and not, a 1-pixel-high map


def _conv_and_grads(conv, x, weight, bias, grad):
    out = conv(x, weight, bias)
    return [out, *torch.autograd.grad(out, (x, weight, bias), grad)]


@pytest.mark.parametrize("tile", [F2X2_3X3, F4X4_3X3], ids=["f2x2", "f4x4"])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("channels_last", [False, True])
def test_equals_conv2d_in_float64_forward_and_gradients(tile, shape, channels_last):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, *shape, dtype=torch.float64, generator=generator)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    weight = torch.randn(7, 5, 3, 3, dtype=torch.float64, generator=generator, requires_grad=True)
    bias = torch.randn(7, dtype=torch.float64, generator=generator, requires_grad=True)
    grad = torch.randn(2, 7, *shape, dtype=torch.float64, generator=generator)
    expected = _conv_and_grads(lambda *a: F.conv2d(*a, padding=1), x, weight, bias, grad)
    actual = _conv_and_grads(lambda *a: winograd_conv3x3(*a, tile=tile), x, weight, bias, grad)
    for name, a, e in zip(["output", "grad x", "grad weight", "grad bias"], actual, expected):
        assert a.shape == e.shape, name
        assert torch.allclose(a, e, rtol=0, atol=1e-11 * e.abs().max().item()), name


@pytest.mark.parametrize("tile, bound", [(F2X2_3X3, 2e-5), (F4X4_3X3, 1e-4)], ids=["f2x2", "f4x4"])
def test_float32_error_is_float32_rounding(tile, bound):
    """Against the float64 truth, Winograd's float32 error is of the direct conv's order (~1e-6 of the output's
    scale; a wrong transform coefficient is off by O(1))."""
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(4, 64, 28, 28, generator=generator).contiguous(memory_format=torch.channels_last)
    weight = torch.randn(32, 64, 3, 3, generator=generator) * 0.05
    truth = F.conv2d(x.double(), weight.double(), padding=1)
    direct = (F.conv2d(x, weight, padding=1).double() - truth).abs().max() / truth.abs().max()
    winograd = (winograd_conv3x3(x, weight, tile=tile).double() - truth).abs().max() / truth.abs().max()
    assert winograd < bound and direct < bound


def test_auto_runs_winograd_only_on_wide_cpu_layers():
    wide, narrow = torch.zeros(1, 384, 28, 28), torch.zeros(1, 96, 112, 112)
    assert winograd_tile("auto", wide, 384, 192) is F4X4_3X3
    assert winograd_tile("auto", torch.zeros(1, 768, 14, 14), 768, 384) is F2X2_3X3
    assert winograd_tile("auto", narrow, 96, 48) is None
    assert winograd_tile("auto", torch.zeros(1, 384, 14, 14), 384, 384) is None
    assert winograd_tile("direct", wide, 384, 192) is None
    assert winograd_tile("auto", wide.half(), 384, 192) is None
    assert winograd_tile("f2x2", narrow, 96, 48) is F2X2_3X3
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert winograd_tile("auto", wide, 384, 192) is None
    with pytest.raises(ValueError, match="one of auto, direct, f2x2, f4x4"):
        winograd_tile("fast", wide, 384, 192)


@pytest.mark.parametrize("algorithm", sorted(TILES))
def test_conv3x3_module_is_a_conv2d_with_the_same_state_and_function(algorithm):
    torch.manual_seed(0)
    module = Conv3x3(6, 4).double()
    plain = torch.nn.Conv2d(6, 4, 3, padding=1).double()
    plain.load_state_dict(module.state_dict())  # same keys and shapes
    x = torch.randn(2, 6, 10, 10, dtype=torch.float64)
    module.algorithm = algorithm
    assert torch.allclose(module(x), plain(x), rtol=0, atol=1e-12)
