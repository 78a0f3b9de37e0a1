"""``masked`` backend: SparK's reference semantics on dense tensors, the oracle of every test.

Features are dense channels-last ``(B, H, W, C)`` tensors whose masked sites are kept at exactly zero: every op
runs densely and its output is multiplied by the mask, as SparK does. BatchNorm statistics use visible sites only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from sparkme.sparse.base import SparseMap, conv_taps
from sparkme.sparse.context import conv_geometry


class MaskedDenseMap(SparseMap):
    """Dense ``(B, H, W, C)`` features, zero at masked sites."""

    backend_name = "masked"

    def __init__(self, context, stride: int, features: torch.Tensor, already_masked: bool = False):
        super().__init__(context, stride)
        self._features = features if already_masked else features * self._mask_multiplier(features.dtype)

    def _mask_multiplier(self, dtype: torch.dtype) -> torch.Tensor:
        return self.context.dense_mask(self.stride)[..., None].to(dtype)

    @classmethod
    def from_images(cls, images: torch.Tensor, context) -> MaskedDenseMap:
        return cls(context, 1, images.permute(0, 2, 3, 1))

    def with_features(self, features: torch.Tensor) -> MaskedDenseMap:
        return MaskedDenseMap(self.context, self.stride, features)

    @property
    def features(self) -> torch.Tensor:
        return self._features

    def visible_rows(self, features: torch.Tensor) -> torch.Tensor:
        return features[self.dense_mask()]

    def from_visible_rows(self, rows: torch.Tensor) -> MaskedDenseMap:
        dense = rows.new_zeros(*self._features.shape[:-1], rows.shape[1]).index_put((self.dense_mask(),), rows)
        return MaskedDenseMap(self.context, self.stride, dense, already_masked=True)

    def per_sample_sum(self, features: torch.Tensor) -> torch.Tensor:
        return features.sum(dim=(1, 2))  # masked sites are zero

    def per_sample_broadcast(self, values: torch.Tensor) -> torch.Tensor:
        return values[:, None, None, :].expand_as(self._features)

    def _dense_op(self, op, stride: int) -> MaskedDenseMap:
        out = op(self._features.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        return MaskedDenseMap(self.context, self.stride * stride, out)

    def conv2d(self, conv: torch.nn.Conv2d) -> MaskedDenseMap:
        kernel, stride, padding = conv_taps(conv)
        conv_geometry(kernel, stride, padding)
        return self._dense_op(lambda x: F.conv2d(x, conv.weight, conv.bias, stride, padding, 1, conv.groups), stride)

    def max_pool2d(self, kernel_size: int, stride: int, padding: int) -> MaskedDenseMap:
        conv_geometry(kernel_size, stride, padding)
        # Masked sites read -inf, not SparK's 0: the max is over visible sites even for negative inputs (LeakyReLU
        # nets such as CSPNet); after a ReLU both agree. Windows with no visible site are masked afterwards.
        visible = self.dense_mask()[..., None]
        blocked = torch.where(visible, self.unmasked_features, float("-inf")).permute(0, 3, 1, 2)
        out = F.max_pool2d(blocked, kernel_size, stride, padding).permute(0, 2, 3, 1)
        out_visible = self.context.dense_mask(self.stride * stride)[..., None]
        return MaskedDenseMap(self.context, self.stride * stride, torch.where(out_visible, out, 0.0),
                              already_masked=True)

    def avg_pool2d(self, kernel_size: int, stride: int, padding: int) -> MaskedDenseMap:
        """Mean over the visible sites of each window: the pooled features divided by the pooled mask (the same
        divisor cancels, so padding never counts)."""
        conv_geometry(kernel_size, stride, padding)
        visible = self._mask_multiplier(self.unmasked_features.dtype).permute(0, 3, 1, 2)
        total = F.avg_pool2d(self.features.permute(0, 3, 1, 2), kernel_size, stride, padding)
        count = F.avg_pool2d(visible, kernel_size, stride, padding)
        out = (total / count.clamp(min=torch.finfo(count.dtype).tiny)).permute(0, 2, 3, 1)
        return MaskedDenseMap(self.context, self.stride * stride, out)


    def to_dense(self, fill: torch.Tensor | None = None) -> torch.Tensor:
        return self._fill_masked(self._features.permute(0, 3, 1, 2).contiguous(), fill)
