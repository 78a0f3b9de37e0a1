"""The one sparse feature-map type that every encoder is written against.

A ``SparseMap`` is the set of visible sites of a feature map at one tensor stride plus their features. Pointwise
operations (1x1 conv, Linear, norms, activations, layer scale, residual add) are plain torch ops on ``features``,
whose **last dimension is channels** for every backend, so they are shared code (``sparkme.sparse.ops``). Only
spatial operations (k x k conv, strided conv, pooling) and densifying are backend work; their gather-GEMM kernels
live in ``sparkme.sparse.kernels``; ``sparkme.sparse.conv`` picks a conv's kernel once per layer.

The number of spatial dims is a property of the map (``spatial_dims``, from its ``MaskContext``): the same code runs
images ``(B, C, H, W)`` and volumes ``(B, C, D, H, W)``; only the masked oracle names ``conv2d`` / ``conv3d``.
"""

from __future__ import annotations

import abc
from collections.abc import Callable

import torch

from sparkme.sparse.context import MaskContext
from sparkme.sparse.conv import ConvSpec, conv2d
from sparkme.sparse.grid_depthwise import grid_depthwise_conv
from sparkme.sparse.kernels import linear_conv1x1


class SparseMap(abc.ABC):
    """Visible sites of one feature map.

    Attributes:
        context: the ``MaskContext`` of the forward pass.
        stride: total down-sampling of this map relative to the image (1, 2, 4, ..., 32).
    """

    backend_name: str = ""

    def __init__(self, context: MaskContext, stride: int):
        self.context = context
        self.stride = stride

    # --- construction -------------------------------------------------------------------------------------------
    @property
    def spatial_dims(self) -> int:
        """2 for images, 3 for volumes."""
        return self.context.spatial_dims

    @classmethod
    @abc.abstractmethod
    def from_images(cls, images: torch.Tensor, context: MaskContext) -> SparseMap:
        """The stride-1 map of the visible pixels of ``images`` ``(B, C, H, W)`` (voxels of ``(B, C, D, H, W)``)."""

    @abc.abstractmethod
    def with_features(self, features: torch.Tensor) -> SparseMap:
        """A map on the same sites with new features (same leading shape as ``self.features``)."""

    # --- features -----------------------------------------------------------------------------------------------
    @property
    @abc.abstractmethod
    def features(self) -> torch.Tensor:
        """The features, channels last: ``(N, C)`` for true-sparse backends, ``(B, H, W, C)`` (``(B, D, H, W, C)``)
        for masked-dense."""

    @property
    def num_channels(self) -> int:
        return self.features.shape[-1]

    @property
    def unmasked_features(self) -> torch.Tensor:
        """``features`` for reads that only use visible sites (per-site maths, ``visible_rows``): the masked-dense
        backend may hold anything at its masked sites here, since it zeroes them only where the maths reads them
        (spatial ops, per-sample sums, densifying, ``features``), as SparK does. True-sparse backends have no masked
        sites: this is ``features``."""
        return self.features

    def map_features(self, fn: Callable[[torch.Tensor], torch.Tensor], keeps_zeros: bool = False) -> SparseMap:
        """The same sites with features ``fn(features)`` for a per-site ``fn`` (Linear, activation, norm, scale).

        Args:
            keeps_zeros: ``fn`` maps a zero site to zero (ReLU, GELU, ...): a masked-dense map whose masked sites
                were zero still has them zero and need not be masked again.
        """
        return self.with_features(fn(self.unmasked_features))

    @abc.abstractmethod
    def visible_rows(self, features: torch.Tensor) -> torch.Tensor:
        """``(N, C)`` features of the visible sites only (for statistics such as BatchNorm's)."""

    @abc.abstractmethod
    def from_visible_rows(self, rows: torch.Tensor) -> SparseMap:
        """Inverse of ``visible_rows``: a map on the same sites whose visible features are ``rows``."""

    @abc.abstractmethod
    def per_sample_sum(self, features: torch.Tensor) -> torch.Tensor:
        """``(B, C)`` sum of ``features`` over each image's own visible sites."""

    @abc.abstractmethod
    def per_sample_broadcast(self, values: torch.Tensor) -> torch.Tensor:
        """Spread ``(B, C)`` per-image values to every site of that image, shaped like ``features``."""

    def zero_masked(self, features: torch.Tensor) -> torch.Tensor:
        """``features`` (shaped like ``self.features``) with masked sites set to zero before a per-sample sum; a
        true-sparse map has none."""
        return features

    def sample_row_ranges(self) -> list[tuple[int, int]] | None:
        """``[(start, end)]`` rows of each sample when the rows are grouped by sample in batch order, else None."""
        return None

    def row_samples(self) -> torch.Tensor | None:
        """``(N,)`` long: the sample of each row, when ``features`` are the visible rows (in any order); None for a
        map whose features include masked sites (the masked oracle)."""
        return None

    def per_sample_count(self) -> torch.Tensor:
        """``(B,)`` number of visible sites of each sample (at least 1: every sample keeps a patch)."""
        mask = self.dense_mask()
        return mask.sum(dim=tuple(range(1, mask.dim())))

    # --- convolution: the kernels ``sparkme.sparse.conv.conv2d`` calls by the spec's algorithm ---------------------
    def conv2d(self, conv: torch.nn.Conv2d) -> SparseMap:
        """Submanifold (stride 1) or strided sparse convolution with the weights of a dense ``nn.Conv2d`` (its spec
        derived now; converted encoders use the one frozen at conversion)."""
        return conv2d(self, conv.weight, conv.bias, ConvSpec.of(conv))

    def per_site_conv(self, weight: torch.Tensor, bias: torch.Tensor | None, spec: ConvSpec) -> SparseMap:
        """``PER_SITE``: a 1x1 stride-1 conv, one GEMM on the rows."""
        return self.with_features(linear_conv1x1(self.features, weight, bias, spec.groups))

    def grid_depthwise_conv(self, weight: torch.Tensor, bias: torch.Tensor | None, spec: ConvSpec) -> SparseMap:
        """``GRID_DEPTHWISE``: a stride-1 'same' depthwise conv through a dense scratch grid."""
        sites, grid = self.grid_sites()
        return self.with_features(grid_depthwise_conv(self.features, sites, grid, weight, bias))

    def grid_sites(self) -> tuple[torch.Tensor, tuple[int, ...]]:
        """``(N,)`` flat grid index of each row (in row order) and the grid ``(B, H/stride, W/stride)`` (or
        ``(B, D/stride, H/stride, W/stride)``); rows here
        are the ``MaskContext``'s row-major visible sites (a backend with its own row order overrides this)."""
        return self.context.flat_sites(self.stride), self.context.grid_shape(self.stride)

    @abc.abstractmethod
    def gather_conv(self, weight: torch.Tensor, bias: torch.Tensor | None, spec: ConvSpec) -> SparseMap:
        """``GATHER_*``: a k x k, strided or grouped conv through a neighbour table (or the backend's own kernel)."""

    # --- other spatial ops (backend work) -----------------------------------------------------------------------
    @abc.abstractmethod
    def max_pool(self, kernel_size: int, stride: int, padding: int) -> SparseMap:
        """Max pooling over visible neighbours only (any spatial dims): a masked site never wins a window, even
        when every visible value there is negative."""

    @abc.abstractmethod
    def avg_pool(self, kernel_size: int, stride: int, padding: int) -> SparseMap:
        """Average pooling: the mean over the *visible* sites of each window (masked sites are not counted)."""

    def max_pool2d(self, kernel_size: int, stride: int, padding: int) -> SparseMap:
        """``max_pool`` (its name in the 2-D API)."""
        return self.max_pool(kernel_size, stride, padding)

    def avg_pool2d(self, kernel_size: int, stride: int, padding: int) -> SparseMap:
        """``avg_pool`` (its name in the 2-D API)."""
        return self.avg_pool(kernel_size, stride, padding)

    @abc.abstractmethod
    def to_dense(self, fill: torch.Tensor | None = None) -> torch.Tensor:
        """``(B, C, H/stride, W/stride)`` (``(B, C, D/stride, H/stride, W/stride)``) dense tensor; masked sites hold
        ``fill`` ``(C,)`` (zeros when None)."""

    # --- shared helpers -----------------------------------------------------------------------------------------
    def __add__(self, other: SparseMap) -> SparseMap:
        if not isinstance(other, SparseMap) or other.stride != self.stride or other.context is not self.context:
            raise ValueError("can only add sparse maps of the same forward pass and stride")
        return self.with_features(self.features + other.features)

    @property
    def shape(self) -> torch.Size:
        """``(B, C, H/stride, W/stride)`` (or with ``D``): the dense shape this map stands for (read by traced
        ``x.shape[0]``)."""
        return torch.Size((self.context.batch_size, self.num_channels, *self.context.grid_size(self.stride)))

    def per_sample_mean(self) -> torch.Tensor:
        """``(B, C)`` mean of each image's features over its own visible sites (channel attention's pooling)."""
        counts = self.per_sample_count().clamp(min=1)
        return self.per_sample_sum(self.features) / counts[:, None].to(self.features.dtype)

    def dense_mask(self) -> torch.Tensor:
        """``(B, H/stride, W/stride)`` (``(B, D/stride, H/stride, W/stride)``) bool, True = visible."""
        return self.context.dense_mask(self.stride)

    def _fill_masked(self, dense: torch.Tensor, fill: torch.Tensor | None) -> torch.Tensor:
        if fill is None:
            return dense
        visible = self.dense_mask()[:, None]
        return torch.where(visible, dense, fill.to(dense.dtype).view(1, -1, *[1] * self.spatial_dims))
