"""Random patch masks for SparK pretraining.

Convention used everywhere in sparkme: a mask is a bool tensor of shape ``(B, h, w)`` over the patch grid of images
(``(B, d, h, w)`` for volumes: the number of spatial dims is the mask's ``dim() - 1``) and **True means visible**
(the patch is kept and encoded); False means masked (to be reconstructed).
"""

from __future__ import annotations

import math

import torch

PATCH_SIZE = 32  # total down-sampling of every supported encoder; one patch = one cell of the stride-32 map


def check_mask_ratio(ratio: float) -> float:
    """Return ``ratio`` as a float, or raise ValueError when it is outside [0, 1)."""
    ratio = float(ratio)
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"mask ratio must be in [0, 1) (fraction of patches hidden), got {ratio}")
    return ratio


def check_image_size(height: int, width: int, patch_size: int = PATCH_SIZE) -> tuple[int, int]:
    """Return the patch grid ``(h, w)`` for an image, or raise ValueError when a side is not a multiple of
    ``patch_size``."""
    if height <= 0 or width <= 0 or height % patch_size or width % patch_size:
        raise ValueError(
            f"image size {height}x{width} is not supported: both sides must be positive multiples of the "
            f"patch size {patch_size} (e.g. 224x224, 192x256)"
        )
    return height // patch_size, width // patch_size


def check_grid_size(size: tuple[int, ...], patch_size: int = PATCH_SIZE) -> tuple[int, ...]:
    """Return the patch grid of an image ``(H, W)`` or a volume ``(D, H, W)``, or raise ValueError when a side is
    not a positive multiple of ``patch_size``."""
    size = tuple(int(side) for side in size)
    if len(size) == 2:
        return check_image_size(*size, patch_size=patch_size)
    if len(size) != 3 or any(side <= 0 or side % patch_size for side in size):
        shown = "x".join(str(side) for side in size)
        raise ValueError(f"volume size {shown} is not supported: every side must be a positive multiple of the "
                         f"patch size {patch_size} (e.g. {patch_size * 2}x{patch_size * 2}x{patch_size * 2})")
    return tuple(side // patch_size for side in size)


def num_visible(h: int, w: int, ratio: float) -> int:
    """Visible patches per image: ``round(h * w * (1 - ratio))``, at least 1 so every image has an input."""
    return num_visible_of(h * w, ratio)


def num_visible_of(cells: int, ratio: float) -> int:
    """Visible patches of a grid of ``cells`` patches (any dimension): ``round(cells * (1 - ratio))``, at least 1."""
    return max(1, round(cells * (1.0 - check_mask_ratio(ratio))))


def random_mask(
    batch: int,
    h: int,
    w: int,
    ratio: float,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Sample a patch mask with exactly ``num_visible(h, w, ratio)`` visible patches per image.

    Args:
        batch: number of images B (>= 1).
        h, w: patch grid size (image side // 32).
        ratio: fraction of patches hidden, in [0, 1).
        generator: optional ``torch.Generator`` (on ``device``) for reproducible masks.

    Returns:
        ``(B, h, w)`` bool tensor, True = visible.
    """
    if h < 1 or w < 1:
        raise ValueError(f"patch grid must be at least 1x1, got {h}x{w}")
    return random_grid_mask(batch, (h, w), ratio, generator=generator, device=device)


def random_grid_mask(
    batch: int,
    grid: tuple[int, ...],
    ratio: float,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """``random_mask`` for a patch grid of any dimension, e.g. ``(d, h, w)`` for volumes: ``(B, *grid)`` bool with
    exactly ``num_visible_of(prod(grid), ratio)`` visible patches per sample."""
    if batch < 1:
        raise ValueError(f"batch size must be >= 1, got {batch}")
    if not grid or min(grid) < 1:
        raise ValueError(f"patch grid must be at least 1 along every side, got {grid}")
    cells = math.prod(grid)
    keep = num_visible_of(cells, ratio)
    noise = torch.rand(batch, cells, generator=generator, device=device)
    # The keep-count smallest noise values are visible: an exact count per image, uniformly random positions.
    keep_index = noise.argsort(dim=1)[:, :keep]
    mask = torch.zeros(batch, cells, dtype=torch.bool, device=noise.device)
    mask.scatter_(1, keep_index, True)
    return mask.view(batch, *grid)


def upsample_mask(mask: torch.Tensor, factor: int) -> torch.Tensor:
    """Repeat each mask cell ``factor`` times along every spatial axis.

    Args:
        mask: ``(B, h, w)`` (or ``(B, d, h, w)``) bool, True = visible.
        factor: positive integer, e.g. ``32 // stride`` to get the mask of a stride-``stride`` feature map.

    Returns:
        ``(B, h * factor, w * factor)`` bool (every spatial side times ``factor``).
    """
    if factor < 1 or int(factor) != factor:
        raise ValueError(f"upsampling factor must be a positive integer, got {factor}")
    if mask.dim() not in (3, 4) or mask.dtype != torch.bool:
        raise ValueError(f"mask must be a (B, h, w) or (B, d, h, w) bool tensor, got {tuple(mask.shape)} {mask.dtype}")
    for dim in range(1, mask.dim()):
        mask = mask.repeat_interleave(factor, dim=dim)
    return mask


def mask_at_stride(mask: torch.Tensor, stride: int, patch_size: int = PATCH_SIZE) -> torch.Tensor:
    """The visible set of a feature map with total stride ``stride`` (1, 2, 4, ..., ``patch_size``).

    Returns:
        ``(B, h * patch_size // stride, w * patch_size // stride)`` bool (every spatial side), True = visible.
    """
    if stride < 1 or patch_size % stride:
        raise ValueError(f"stride must divide the patch size {patch_size}, got {stride}")
    return upsample_mask(mask, patch_size // stride)
