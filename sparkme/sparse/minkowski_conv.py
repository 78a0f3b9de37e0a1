"""MinkowskiEngine's convolution kernels behind an autograd function that keeps the dense weight, not a copy.

Weights stay in the dense ``nn.Conv2d`` / ``nn.Conv3d`` layout (``minkowski_backend``), and MinkowskiEngine's kernels
read ``(k**D, C_in, C_out)``. MinkowskiEngine's own ``MinkowskiConvolutionFunction`` keeps the kernel it is given
for backward, so a re-laid-out copy of every conv's weight lived until backward: for a 3-D ResEnc-L (weights of
3x3x3x320x320) that is hundreds of MiB per step, a third of the encoder's saved memory at 96^3. Here the re-layout
is redone in backward from the parameter itself (a copy of the weight: microseconds against the convolution), and
the forward and backward run MinkowskiEngine's very same C++ functions, so results are bit-identical.
"""

from __future__ import annotations

import torch
from MinkowskiEngine.MinkowskiCommon import get_minkowski_function


def dense_to_minkowski_kernel(weight: torch.Tensor) -> torch.Tensor:
    """Dense ``(C_out, C_in, k, k)`` conv weight -> MinkowskiEngine kernel ``(k*k, C_in, C_out)``.

    MinkowskiEngine numbers the offsets of a kernel with the *first* spatial coordinate (our y; z for volumes)
    varying fastest: offset index ``ix * k + iy`` (``(ix * k + iy) * k + iz``). So
    ``kernel[ix * k + iy, i, o] == weight[o, i, iy, ix]``: every axis reversed, then channels.
    """
    c_out, c_in = weight.shape[:2]
    return weight.permute(*reversed(range(weight.dim()))).reshape(-1, c_in, c_out).contiguous()


def minkowski_to_dense_kernel(kernel: torch.Tensor, kernel_size: int, spatial_dims: int = 2) -> torch.Tensor:
    """Inverse of ``dense_to_minkowski_kernel``: ``(k**D, C_in, C_out)`` -> ``(C_out, C_in, k, ..., k)``."""
    _, c_in, c_out = kernel.shape
    reshaped = kernel.reshape(*[kernel_size] * spatial_dims, c_in, c_out)
    return reshaped.permute(*reversed(range(reshaped.dim()))).contiguous()


class MinkowskiDenseWeightConv(torch.autograd.Function):
    """``MinkowskiConvolutionFunction`` with a dense-layout weight: forward ``(N_in, C_in)`` features and a
    ``(C_out, C_in, k, ..., k)`` weight -> ``(N_out, C_out)``; backward returns the weight's gradient in the dense
    layout. Saves the features and the weight parameter only."""

    @staticmethod
    def forward(ctx, features, weight, kernel_generator, convolution_mode, in_key, out_key, manager):
        features = features.contiguous()
        ctx.save_for_backward(features, weight)
        ctx.misc = (kernel_generator, convolution_mode, in_key, out_key, manager)
        generator = kernel_generator
        return get_minkowski_function("ConvolutionForward", features)(
            features, dense_to_minkowski_kernel(weight), generator.kernel_size, generator.kernel_stride,
            generator.kernel_dilation, generator.region_type, generator.region_offsets, generator.expand_coordinates,
            convolution_mode, in_key, out_key, manager._manager,
        )

    @staticmethod
    def backward(ctx, grad_out):
        features, weight = ctx.saved_tensors
        generator, convolution_mode, in_key, out_key, manager = ctx.misc
        grad_out = grad_out.contiguous()
        grad_features, grad_kernel = get_minkowski_function("ConvolutionBackward", grad_out)(
            features, grad_out, dense_to_minkowski_kernel(weight), generator.kernel_size, generator.kernel_stride,
            generator.kernel_dilation, generator.region_type, generator.region_offsets, convolution_mode, in_key,
            out_key, manager._manager,
        )
        grad_weight = minkowski_to_dense_kernel(grad_kernel, weight.shape[-1], weight.dim() - 2)
        return grad_features, grad_weight, None, None, None, None, None
