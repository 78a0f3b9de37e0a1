"""``torch`` backend: true-sparse convolution in pure PyTorch (no compiled code; CPU and CUDA alike).

Features are ``(N, C)`` rows of the visible sites in row-major ``(batch, y, x)`` (volumes: ``(batch, z, y, x)``)
order. A k x k (k x k x k) convolution is one gather through a neighbour table (built once per mask, stride and
kernel by the ``MaskContext``) and one GEMM. A volume's convolutions at its full-resolution stages run as dense
blocks around the visible patches instead (``sparse/block_conv.py``): far fewer copies than 27 gathered taps.
"""

from __future__ import annotations

import torch

from sparkme.sparse.base import SparseMap
from sparkme.sparse.block_conv import block_conv, uses_blocks
from sparkme.sparse.context import MaskContext
from sparkme.sparse.conv import ConvSpec
from sparkme.sparse.kernels import gather_avg_pool, gather_conv, gather_max_pool


class TorchSparseMap(SparseMap):
    """Visible sites as ``(N, C)`` rows; coordinates live in the shared ``MaskContext``."""

    backend_name = "torch"

    def __init__(self, context: MaskContext, stride: int, features: torch.Tensor):
        super().__init__(context, stride)
        self._features = features

    @classmethod
    def from_images(cls, images: torch.Tensor, context: MaskContext) -> TorchSparseMap:
        mask = context.dense_mask(1)
        return cls(context, 1, images.movedim(1, -1)[mask])

    def with_features(self, features: torch.Tensor) -> TorchSparseMap:
        return TorchSparseMap(self.context, self.stride, features)

    @property
    def features(self) -> torch.Tensor:
        return self._features

    def visible_rows(self, features: torch.Tensor) -> torch.Tensor:
        return features

    def from_visible_rows(self, rows: torch.Tensor) -> TorchSparseMap:
        return self.with_features(rows)

    def per_sample_sum(self, features: torch.Tensor) -> torch.Tensor:
        out = features.new_zeros(self.context.batch_size, features.shape[1])
        return out.index_add(0, self.context.batch_index(self.stride), features)

    def per_sample_broadcast(self, values: torch.Tensor) -> torch.Tensor:
        return values[self.context.batch_index(self.stride)]

    def row_samples(self) -> torch.Tensor:
        return self.context.batch_index(self.stride)

    def sample_row_ranges(self) -> list[tuple[int, int]]:
        """Rows are in row-major ``(batch, ...)`` order: each sample's rows are one range."""

        def make():
            ends = self.per_sample_count().cumsum(0).tolist()
            return list(zip([0, *ends[:-1]], ends))

        return self.context.cached(("sample_ranges", self.stride), make)

    def gather_conv(self, weight: torch.Tensor, bias: torch.Tensor | None, spec: ConvSpec) -> TorchSparseMap:
        if uses_blocks(self.context, self.stride, spec):  # volumes' large patches: dense blocks, not 27 copies
            out = block_conv(self._features, self.context, self.stride, weight, spec)
            out = out if bias is None else out + bias
        else:
            table = self.context.neighbours(self.stride, spec.kernel, spec.stride, spec.padding)
            out = gather_conv(self._features, table, weight, bias, spec)
        return TorchSparseMap(self.context, self.stride * spec.stride, out)

    def max_pool(self, kernel_size: int, stride: int, padding: int) -> TorchSparseMap:
        table = self.context.neighbours(self.stride, kernel_size, stride, padding)
        return TorchSparseMap(self.context, self.stride * stride, gather_max_pool(self._features, table))

    def avg_pool(self, kernel_size: int, stride: int, padding: int) -> TorchSparseMap:
        table = self.context.neighbours(self.stride, kernel_size, stride, padding)
        return TorchSparseMap(self.context, self.stride * stride, gather_avg_pool(self._features, table))

    def to_dense(self, fill: torch.Tensor | None = None) -> torch.Tensor:
        mask = self.dense_mask()
        dense = self._features.new_zeros(*mask.shape, self._features.shape[1])
        dense = dense.index_put((mask,), self._features) if mask.any() else dense
        # (B, C, H, W) in channels-last memory format, as scattered: the dense half runs channels-last on CPU
        # (SparK.dense_layout), so a contiguous NCHW copy here would be transposed straight back.
        return self._fill_masked(dense.movedim(-1, 1), fill)
