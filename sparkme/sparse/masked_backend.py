"""``masked`` backend: SparK's reference semantics on dense tensors, the oracle of every test.

Features are dense channels-last ``(B, H, W, C)`` (volumes: ``(B, D, H, W, C)``) tensors. Every op runs densely; masked
sites are zeroed (a multiply by the mask) only where the maths reads them, as in SparK's own masked formulation: before
a spatial op (conv, pooling), a per-sample sum, densifying, and whenever ``features`` is read. Per-site ops (Linear,
activations, LayerNorm, layer scale) run on the raw tensor (``unmasked_features``) and leave it to be masked later;
BatchNorm reads visible rows only and writes exact zeros; a residual sum of zeroed maps is zero. So a ResNet block masks
nowhere (BN follows every conv, ReLU keeps zeros) and a ConvNeXt block once, at its residual add.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from sparkme.sparse.base import SparseMap
from sparkme.sparse.context import conv_geometry
from sparkme.sparse.conv import ConvSpec


class MaskedDenseMap(SparseMap):
    """Dense ``(B, H, W, C)`` (``(B, D, H, W, C)``) features, zero at masked sites."""

    backend_name = "masked"

    def __init__(self, context, stride: int, features: torch.Tensor, already_masked: bool = False):
        super().__init__(context, stride)
        self._raw = features  # zero at masked sites once self._masked; any value there before
        self._masked = already_masked

    def _mask_multiplier(self, dtype: torch.dtype) -> torch.Tensor:
        return self.context.dense_mask(self.stride)[..., None].to(dtype)

    @classmethod
    def from_images(cls, images: torch.Tensor, context) -> MaskedDenseMap:
        return cls(context, 1, images.movedim(1, -1))

    def with_features(self, features: torch.Tensor) -> MaskedDenseMap:
        return MaskedDenseMap(self.context, self.stride, features)

    def map_features(self, fn, keeps_zeros: bool = False) -> MaskedDenseMap:
        return MaskedDenseMap(self.context, self.stride, fn(self._raw), already_masked=keeps_zeros and self._masked)

    @property
    def features(self) -> torch.Tensor:
        """Zero at masked sites: masked on the first read, then kept (every later reader shares the product)."""
        if not self._masked:
            self._raw = self._raw * self._mask_multiplier(self._raw.dtype)
            self._masked = True
        return self._raw

    @property
    def unmasked_features(self) -> torch.Tensor:
        return self._raw

    def __add__(self, other: SparseMap) -> MaskedDenseMap:
        summed = super().__add__(other)  # reads both ``features``: zero at masked sites, and so is their sum
        return MaskedDenseMap(self.context, self.stride, summed.unmasked_features, already_masked=True)

    def visible_rows(self, features: torch.Tensor) -> torch.Tensor:
        return features[self.dense_mask()]

    def from_visible_rows(self, rows: torch.Tensor) -> MaskedDenseMap:
        dense = rows.new_zeros(*self._raw.shape[:-1], rows.shape[1]).index_put((self.dense_mask(),), rows)
        return MaskedDenseMap(self.context, self.stride, dense, already_masked=True)

    def per_sample_sum(self, features: torch.Tensor) -> torch.Tensor:
        # ``features`` must be zero at masked sites (derived from ``features``, or through ``zero_masked``)
        return features.sum(dim=tuple(range(1, 1 + self.spatial_dims)))

    def per_sample_broadcast(self, values: torch.Tensor) -> torch.Tensor:
        per_sample = values.view(values.shape[0], *[1] * self.spatial_dims, values.shape[-1])
        return per_sample.expand(*self._raw.shape[:-1], values.shape[-1])

    def zero_masked(self, features: torch.Tensor) -> torch.Tensor:
        return features * self._mask_multiplier(features.dtype)

    def _dense_op(self, op, stride: int) -> MaskedDenseMap:
        out = op(self.features.movedim(-1, 1)).movedim(1, -1)  # masked on first read
        return MaskedDenseMap(self.context, self.stride * stride, out)

    def _dense_conv(self, weight: torch.Tensor, bias: torch.Tensor | None, spec: ConvSpec) -> MaskedDenseMap:
        conv = F.conv3d if self.spatial_dims == 3 else F.conv2d
        return self._dense_op(lambda x: conv(x, weight, bias, spec.stride, spec.padding, 1, spec.groups),
                              spec.stride)

    # The oracle runs every algorithm as the dense conv of the masked map.
    per_site_conv = grid_depthwise_conv = gather_conv = _dense_conv

    def max_pool(self, kernel_size: int, stride: int, padding: int) -> MaskedDenseMap:
        conv_geometry(kernel_size, stride, padding)
        # Masked sites read -inf, not SparK's 0: the max is over visible sites even for negative inputs (LeakyReLU
        # nets such as CSPNet); after a ReLU both agree. Windows with no visible site are masked afterwards.
        visible = self.dense_mask()[..., None]
        blocked = torch.where(visible, self.unmasked_features, float("-inf")).movedim(-1, 1)
        pool = F.max_pool3d if self.spatial_dims == 3 else F.max_pool2d
        out = pool(blocked, kernel_size, stride, padding).movedim(1, -1)
        out_visible = self.context.dense_mask(self.stride * stride)[..., None]
        return MaskedDenseMap(self.context, self.stride * stride, torch.where(out_visible, out, 0.0),
                              already_masked=True)

    def avg_pool(self, kernel_size: int, stride: int, padding: int) -> MaskedDenseMap:
        """Mean over the visible sites of each window: the pooled features divided by the pooled mask (the same
        divisor cancels, so padding never counts)."""
        conv_geometry(kernel_size, stride, padding)
        pool = F.avg_pool3d if self.spatial_dims == 3 else F.avg_pool2d
        visible = self._mask_multiplier(self.unmasked_features.dtype).movedim(-1, 1)
        total = pool(self.features.movedim(-1, 1), kernel_size, stride, padding)
        count = pool(visible, kernel_size, stride, padding)
        out = (total / count.clamp(min=torch.finfo(count.dtype).tiny)).movedim(1, -1)
        return MaskedDenseMap(self.context, self.stride * stride, out)

    def to_dense(self, fill: torch.Tensor | None = None) -> torch.Tensor:
        return self._fill_masked(self.features.movedim(-1, 1).contiguous(), fill)
