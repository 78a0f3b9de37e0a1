"""The visible-set geometry shared by every feature map of one forward pass.

A ``MaskContext`` is made once per (images, mask) pair and carried by every sparse map derived from the input, so
coordinates and neighbour tables are computed once per stride and reused by every layer and by the backward pass.
Nothing here is global: two forward passes never share a context.
"""

from __future__ import annotations

import torch

from sparkme.masking import PATCH_SIZE, check_image_size, mask_at_stride


def conv_geometry(kernel_size: int, stride: int, padding: int) -> None:
    """Raise ValueError unless the conv keeps SparK's sparse semantics: a centred odd kernel (``padding == k//2``)
    or a non-overlapping patchify kernel (``kernel == stride``, ``padding == 0``)."""
    centred = kernel_size % 2 == 1 and padding == kernel_size // 2
    patchify = kernel_size == stride and padding == 0
    if not (centred or patchify):
        raise ValueError(
            f"unsupported convolution geometry kernel={kernel_size} stride={stride} padding={padding}: sparse "
            "convolutions support odd kernels with padding=kernel//2, or kernel == stride with padding=0"
        )


class MaskContext:
    """Coordinates of the visible sites at every stride, derived from one patch mask.

    Args:
        mask: ``(B, h, w)`` bool patch mask, True = visible.
        image_size: ``(H, W)`` of the images, each a multiple of ``patch_size``.
    """

    def __init__(self, mask: torch.Tensor, image_size: tuple[int, int], patch_size: int = PATCH_SIZE):
        h, w = check_image_size(*image_size, patch_size=patch_size)
        if mask.dim() != 3 or mask.dtype != torch.bool or tuple(mask.shape[1:]) != (h, w):
            raise ValueError(
                f"mask must be a (B, {h}, {w}) bool tensor for {image_size[0]}x{image_size[1]} images "
                f"(True = visible), got {tuple(mask.shape)} {mask.dtype}"
            )
        self.mask = mask
        self.image_size = (int(image_size[0]), int(image_size[1]))
        self.patch_size = patch_size
        self.batch_size = mask.shape[0]
        self._cache: dict = {}

    def cached(self, key, make):
        """Return ``self._cache[key]``, computing it with ``make()`` the first time."""
        if key not in self._cache:
            self._cache[key] = make()
        return self._cache[key]

    def grid_size(self, stride: int) -> tuple[int, int]:
        return self.image_size[0] // stride, self.image_size[1] // stride

    def dense_mask(self, stride: int) -> torch.Tensor:
        """``(B, H/stride, W/stride)`` bool, True = visible."""
        return self.cached(("mask", stride), lambda: mask_at_stride(self.mask, stride, self.patch_size))

    def coords(self, stride: int) -> torch.Tensor:
        """``(N, 3)`` long grid coordinates ``(batch, y, x)`` of the visible sites, in row-major order."""
        return self.cached(("coords", stride), lambda: self.dense_mask(stride).nonzero().contiguous())

    def batch_index(self, stride: int) -> torch.Tensor:
        """``(N,)`` long: the image each visible site belongs to."""
        return self.coords(stride)[:, 0]

    def grid_shape(self, stride: int) -> tuple[int, int, int]:
        """``(B, H/stride, W/stride)``: the dense grid of the stride-``stride`` maps."""
        return (self.batch_size, *self.grid_size(stride))

    def flat_index(self, coords: torch.Tensor, stride: int) -> torch.Tensor:
        """``(N, 3)`` grid coordinates ``(batch, y, x)`` at ``stride`` -> ``(N,)`` flat indices ``(b * H + y) * W + x``
        into that grid."""
        height, width = self.grid_size(stride)
        return (coords[:, 0] * height + coords[:, 1]) * width + coords[:, 2]

    def flat_sites(self, stride: int) -> torch.Tensor:
        """``(N,)`` long: each visible site's flat index in the stride-``stride`` grid, in ``coords`` order."""
        return self.cached(("flat", stride), lambda: self.flat_index(self.coords(stride), stride))

    def row_index(self, stride: int) -> torch.Tensor:
        """``(B, H/stride, W/stride)`` long: the row of each visible site in ``coords(stride)``, -1 where masked."""

        def make():
            mask = self.dense_mask(stride)
            grid = torch.full(mask.shape, -1, dtype=torch.long, device=mask.device)
            grid[mask] = torch.arange(int(mask.sum()), device=mask.device)
            return grid

        return self.cached(("rows", stride), make)

    def neighbours(self, in_stride: int, kernel_size: int, stride: int, padding: int) -> torch.Tensor:
        """Neighbour table of a k x k convolution from the stride-``in_stride`` map to stride ``in_stride*stride``.

        Returns:
            ``(N_out, k*k)`` long; entry ``[n, ky*k + kx]`` is the input row read by output row ``n`` at kernel
            tap ``(ky, kx)`` (dense ``conv2d`` semantics), or ``N_in`` (one past the last row) where that input
            site is masked or outside the image.
        """
        conv_geometry(kernel_size, stride, padding)

        def make():
            rows = self.row_index(in_stride)
            n_in = int((rows >= 0).sum())
            pad = kernel_size
            padded = torch.nn.functional.pad(rows, (pad, pad, pad, pad), value=-1)
            out = self.coords(in_stride * stride)
            taps = torch.arange(kernel_size, device=rows.device)
            ys = out[:, 1, None] * stride - padding + pad + taps  # (N_out, k)
            xs = out[:, 2, None] * stride - padding + pad + taps
            table = padded[out[:, 0, None, None], ys[:, :, None], xs[:, None, :]]  # (N_out, k, k)
            table = table.reshape(out.shape[0], kernel_size * kernel_size)
            return torch.where(table < 0, torch.full_like(table, n_in), table)

        return self.cached(("nbr", in_stride, kernel_size, stride, padding), make)
