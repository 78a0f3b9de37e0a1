"""The visible-set geometry shared by every feature map of one forward pass.

A ``MaskContext`` is made once per (images, mask) pair and carried by every sparse map derived from the input, so
coordinates and neighbour tables are computed once per stride and reused by every layer and by the backward pass.
Nothing here is global: two forward passes never share a context.
"""

from __future__ import annotations

import torch

from sparkme.masking import PATCH_SIZE, check_grid_size, mask_at_stride


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

    The number of spatial dims (2 for images, 3 for volumes) is ``len(image_size)``; every method below works
    on coordinates ``(batch, y, x)`` or ``(batch, z, y, x)`` alike.

    Args:
        mask: ``(B, h, w)`` (or ``(B, d, h, w)``) bool patch mask, True = visible.
        image_size: ``(H, W)`` of the images (``(D, H, W)`` of volumes), each a multiple of ``patch_size``.
    """

    def __init__(self, mask: torch.Tensor, image_size: tuple[int, ...], patch_size: int = PATCH_SIZE):
        grid = check_grid_size(tuple(image_size), patch_size=patch_size)
        if mask.dim() != len(grid) + 1 or mask.dtype != torch.bool or tuple(mask.shape[1:]) != grid:
            shown_grid = ", ".join(str(side) for side in grid)
            shown_size = "x".join(str(int(side)) for side in image_size)
            kind = "images" if len(grid) == 2 else "volumes"
            raise ValueError(
                f"mask must be a (B, {shown_grid}) bool tensor for {shown_size} {kind} "
                f"(True = visible), got {tuple(mask.shape)} {mask.dtype}"
            )
        self.mask = mask
        self.image_size = tuple(int(side) for side in image_size)
        self.patch_size = patch_size
        self.batch_size = mask.shape[0]
        self._cache: dict = {}

    @property
    def spatial_dims(self) -> int:
        """2 for images, 3 for volumes."""
        return len(self.image_size)

    def cached(self, key, make):
        """Return ``self._cache[key]``, computing it with ``make()`` the first time."""
        if key not in self._cache:
            self._cache[key] = make()
        return self._cache[key]

    def grid_size(self, stride: int) -> tuple[int, ...]:
        return tuple(side // stride for side in self.image_size)

    def dense_mask(self, stride: int) -> torch.Tensor:
        """``(B, H/stride, W/stride)`` (``(B, D/stride, H/stride, W/stride)``) bool, True = visible."""
        return self.cached(("mask", stride), lambda: mask_at_stride(self.mask, stride, self.patch_size))

    def coords(self, stride: int) -> torch.Tensor:
        """``(N, 1 + spatial_dims)`` long grid coordinates ``(batch, y, x)`` (``(batch, z, y, x)``) of the visible
        sites, in row-major order."""
        return self.cached(("coords", stride), lambda: self.dense_mask(stride).nonzero().contiguous())

    def batch_index(self, stride: int) -> torch.Tensor:
        """``(N,)`` long: the image each visible site belongs to."""
        return self.coords(stride)[:, 0]

    def grid_shape(self, stride: int) -> tuple[int, ...]:
        """``(B, H/stride, W/stride)`` (``(B, D/stride, ...)``): the dense grid of the stride-``stride`` maps."""
        return (self.batch_size, *self.grid_size(stride))

    def flat_index(self, coords: torch.Tensor, stride: int) -> torch.Tensor:
        """``(N, 1 + spatial_dims)`` grid coordinates ``(batch, y, x)`` at ``stride`` -> ``(N,)`` flat indices
        ``(b * H + y) * W + x`` (``((b * D + z) * H + y) * W + x``) into that grid."""
        flat = coords[:, 0]
        for axis, side in enumerate(self.grid_size(stride), start=1):
            flat = flat * side + coords[:, axis]
        return flat

    def flat_sites(self, stride: int) -> torch.Tensor:
        """``(N,)`` long: each visible site's flat index in the stride-``stride`` grid, in ``coords`` order."""
        return self.cached(("flat", stride), lambda: self.flat_index(self.coords(stride), stride))

    def row_index(self, stride: int) -> torch.Tensor:
        """``(B, *grid)`` long: the row of each visible site in ``coords(stride)``, -1 where masked."""

        def make():
            mask = self.dense_mask(stride)
            grid = torch.full(mask.shape, -1, dtype=torch.long, device=mask.device)
            grid[mask] = torch.arange(int(mask.sum()), device=mask.device)
            return grid

        return self.cached(("rows", stride), make)

    def neighbours(self, in_stride: int, kernel_size: int, stride: int, padding: int) -> torch.Tensor:
        """Neighbour table of a k x k (k x k x k) convolution from the stride-``in_stride`` map to stride
        ``in_stride*stride``.

        Returns:
            ``(N_out, k**spatial_dims)`` long; entry ``[n, ky*k + kx]`` (``[n, (kz*k + ky)*k + kx]``) is the input
            row read by output row ``n`` at that kernel tap (dense ``conv2d`` / ``conv3d`` semantics), or ``N_in``
            (one past the last row) where that input site is masked or outside the image.
        """
        conv_geometry(kernel_size, stride, padding)

        def make():
            rows = self.row_index(in_stride)
            n_in = int((rows >= 0).sum())
            pad = kernel_size
            dims = self.spatial_dims
            padded = torch.nn.functional.pad(rows, (pad, pad) * dims, value=-1)
            out = self.coords(in_stride * stride)
            taps = torch.arange(kernel_size, device=rows.device)
            # One index per axis, shaped (N_out, 1.., k, 1..) so that indexing broadcasts to (N_out, k, ..., k)
            # with the taps of axis a on dim a + 1 (row-major tap order, as a dense conv's weight).
            index = [out[:, 0].view(-1, *[1] * dims)]
            for axis in range(dims):
                shape = [-1] + [kernel_size if a == axis else 1 for a in range(dims)]
                index.append((out[:, axis + 1, None] * stride - padding + pad + taps).view(shape))
            table = padded[tuple(index)].reshape(out.shape[0], kernel_size ** dims)
            return torch.where(table < 0, torch.full_like(table, n_in), table)

        return self.cached(("nbr", in_stride, kernel_size, stride, padding), make)
