"""Stride-1 depthwise convolution of visible rows through a dense scratch grid (ConvNeXt's 7x7, MobileNet's 3x3/5x5).

A depthwise k x k conv costs k*k multiply-adds per site and channel, ~1/C of a dense conv's: its time is memory
traffic, not arithmetic. Run tap by tap on rows it is k*k gathers plus k*k multiply-adds per layer in forward and
again twice in backward (ConvNeXt-S, one CPU thread: 36 layers of 49 taps, ~2 s of an 8.5 s training step).
Scattering the rows into a zeroed ``(B, H, W, C)`` grid and running oneDNN's vectorised depthwise kernel on it reads
every input once; the masked sites it also visits hold zeros, so the outputs gathered back at the visible sites are
exactly the submanifold conv's (sums of the same products, other order). Only the rows are kept for backward; the
grids are rebuilt there.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


class _GridDepthwise(torch.autograd.Function):
    @staticmethod
    def forward(ctx, features: torch.Tensor, sites: torch.Tensor, grid: tuple[int, ...],
                weight: torch.Tensor) -> torch.Tensor:
        ctx.grid = grid
        ctx.save_for_backward(features, sites, weight)
        with torch.autocast(features.device.type, enabled=False):  # oneDNN in the rows' own dtype
            return _gather(_conv(_scatter(features, sites, grid), weight.to(features.dtype)), sites)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        features, sites, weight = ctx.saved_tensors
        grid_out = _scatter(grad_out.to(features.dtype).contiguous(), sites, ctx.grid)
        grid_in = _scatter(features, sites, ctx.grid)
        k, dims = weight.shape[-1], weight.dim() - 2
        grad_in, grad_weight, _ = torch.ops.aten.convolution_backward(
            grid_out, grid_in, weight.to(features.dtype), None, [1] * dims, [k // 2] * dims, [1] * dims, False,
            [0] * dims, weight.shape[0], [ctx.needs_input_grad[0], ctx.needs_input_grad[3], False],
        )
        grad_features = None if grad_in is None else _gather(grad_in, sites)
        grad_weight = None if grad_weight is None else grad_weight.to(weight.dtype)
        return grad_features, None, None, grad_weight


def _scatter(rows: torch.Tensor, sites: torch.Tensor, grid: tuple[int, ...]) -> torch.Tensor:
    """``(N, C)`` rows at flat ``sites`` -> ``(B, C, H, W)`` (``(B, C, D, H, W)``) channels-last grid, zero
    elsewhere."""
    dense = rows.new_zeros(math.prod(grid), rows.shape[1]).index_copy_(0, sites, rows)
    return dense.view(*grid, -1).movedim(-1, 1)


def _gather(dense: torch.Tensor, sites: torch.Tensor) -> torch.Tensor:
    """``(B, C, H, W)`` (channels-last; or ``(B, C, D, H, W)``) -> ``(N, C)`` rows at flat ``sites``."""
    return dense.movedim(1, -1).reshape(-1, dense.shape[1]).index_select(0, sites)


def _conv(dense: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    conv = F.conv3d if weight.dim() == 5 else F.conv2d
    return conv(dense, weight, None, padding=weight.shape[-1] // 2, groups=weight.shape[0])


def grid_depthwise_conv(features: torch.Tensor, sites: torch.Tensor, grid: tuple[int, ...],
                        weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Submanifold (stride 1, 'same') depthwise conv of visible rows.

    Args:
        features: ``(N, C)`` rows.
        sites: ``(N,)`` long, each row's flat index ``(b * H + y) * W + x`` in the grid.
        grid: ``(B, H, W)`` (``(B, D, H, W)``) of this feature map.
        weight: ``(C, 1, k, k)`` (``(C, 1, k, k, k)``), k odd.
        bias: ``(C,)`` or None.

    Returns:
        ``(N, C)``: at each visible site, the sum over the visible sites of its k x k window.
    """
    out = _GridDepthwise.apply(features.contiguous(), sites, grid, weight)
    return out if bias is None else out + bias
