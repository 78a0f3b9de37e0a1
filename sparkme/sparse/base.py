"""The one sparse feature-map type that every encoder is written against.

A ``SparseMap`` is the set of visible sites of a feature map at one tensor stride plus their features. Pointwise
operations (1x1 conv, Linear, norms, activations, layer scale, residual add) are plain torch ops on ``features``,
whose **last dimension is channels** for every backend, so they are shared code (``sparkme.sparse.ops``). Only
spatial operations (k x k conv, strided conv, pooling) and densifying are backend work.
"""

from __future__ import annotations

import abc

import torch
import torch.nn.functional as F

from sparkme.sparse.context import MaskContext


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
    @classmethod
    @abc.abstractmethod
    def from_images(cls, images: torch.Tensor, context: MaskContext) -> SparseMap:
        """The stride-1 map of the visible pixels of ``images`` ``(B, C, H, W)``."""

    @abc.abstractmethod
    def with_features(self, features: torch.Tensor) -> SparseMap:
        """A map on the same sites with new features (same leading shape as ``self.features``)."""

    # --- features -----------------------------------------------------------------------------------------------
    @property
    @abc.abstractmethod
    def features(self) -> torch.Tensor:
        """The features, channels last: ``(N, C)`` for true-sparse backends, ``(B, H, W, C)`` for masked-dense."""

    @property
    def num_channels(self) -> int:
        return self.features.shape[-1]

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

    # --- spatial ops (backend work) -----------------------------------------------------------------------------
    @abc.abstractmethod
    def conv2d(self, conv: torch.nn.Conv2d) -> SparseMap:
        """Submanifold (stride 1) or strided sparse convolution with the weights of a dense ``nn.Conv2d``."""

    @abc.abstractmethod
    def max_pool2d(self, kernel_size: int, stride: int, padding: int) -> SparseMap:
        """Max pooling over visible neighbours only."""

    @abc.abstractmethod
    def to_dense(self, fill: torch.Tensor | None = None) -> torch.Tensor:
        """``(B, C, H/stride, W/stride)`` dense tensor; masked sites hold ``fill`` ``(C,)`` (zeros when None)."""

    # --- shared helpers -----------------------------------------------------------------------------------------
    def __add__(self, other: SparseMap) -> SparseMap:
        if not isinstance(other, SparseMap) or other.stride != self.stride or other.context is not self.context:
            raise ValueError("can only add sparse maps of the same forward pass and stride")
        return self.with_features(self.features + other.features)

    def dense_mask(self) -> torch.Tensor:
        """``(B, H/stride, W/stride)`` bool, True = visible."""
        return self.context.dense_mask(self.stride)

    def _fill_masked(self, dense: torch.Tensor, fill: torch.Tensor | None) -> torch.Tensor:
        if fill is None:
            return dense
        visible = self.dense_mask()[:, None]
        return torch.where(visible, dense, fill.to(dense.dtype).view(1, -1, 1, 1))


def conv_taps(conv: torch.nn.Conv2d) -> tuple[int, int, int]:
    """(kernel, stride, padding) of a square, undilated conv; clear error otherwise."""
    (kh, kw), (sh, sw), padding, (dh, dw) = conv.kernel_size, conv.stride, conv.padding, conv.dilation
    if isinstance(padding, str) or kh != kw or sh != sw or padding[0] != padding[1] or dh != 1 or dw != 1:
        raise ValueError(
            f"unsupported Conv2d {conv}: sparse backends need square kernels, equal strides and paddings, "
            "and dilation 1"
        )
    return kh, sh, padding[0]


class _SubmanifoldDepthwise(torch.autograd.Function):
    """Stride-1 depthwise conv on visible rows, one tap at a time: memory O(N*C) instead of the O(N*K*C)
    im2col buffer (a 7x7 ConvNeXt conv would otherwise store 49 gathered copies of its input for backward).

    With equal input and output sites, input i sees output j at offset +d exactly when j sees i at -d, so the
    input gradient is the same op on ``grad_out`` with the kernel mirrored: a gather, never a scatter-add.
    """

    @staticmethod
    def forward(ctx, features: torch.Tensor, taps: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(features, taps, weight)
        return _depthwise_taps(features, taps, weight)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        features, taps, weight = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        grad_features = _depthwise_taps(grad_out, taps, weight.flip(0)) if ctx.needs_input_grad[0] else None
        grad_weight = None
        if ctx.needs_input_grad[2]:
            padded = _with_missing_row(features)
            grad_weight = torch.stack([(padded[tap] * grad_out).sum(0) for tap in taps])
        return grad_features, None, grad_weight


class _GatherGemmConv(torch.autograd.Function):
    """k x k conv as gather (im2col on visible rows) + one GEMM, saving only the input rows for backward: the
    ``(N_out, K*C_in)`` columns are rebuilt in backward instead of being kept alive (they are ~K times the input).

    For a stride-1 (same sites) conv the input gradient is again a gather + GEMM with the kernel mirrored and
    transposed; only strided convs need a scatter-add.
    """

    @staticmethod
    def forward(ctx, features, table, weight, same_sites: bool):
        ctx.same_sites = same_sites
        ctx.save_for_backward(features, table, weight)
        return _gather_rows(features, table) @ _gemm_weight(weight)

    @staticmethod
    def backward(ctx, grad_out):
        features, table, weight = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        c_out, c_in, k, _ = weight.shape
        grad_features = grad_weight = None
        if ctx.needs_input_grad[2]:
            grad_weight = (_gather_rows(features, table).t() @ grad_out).reshape(k, k, c_in, c_out)
            grad_weight = grad_weight.permute(3, 2, 0, 1)
        if ctx.needs_input_grad[0]:
            if ctx.same_sites:
                mirrored = weight.flip(2, 3).transpose(0, 1)  # (C_in, C_out, k, k)
                grad_features = _gather_rows(grad_out, table) @ _gemm_weight(mirrored)
            else:
                grad_columns = (grad_out @ _gemm_weight(weight).t()).reshape(-1, c_in)
                padded = features.new_zeros(features.shape[0] + 1, c_in)
                grad_features = padded.index_add_(0, table.reshape(-1), grad_columns)[:-1]
        return grad_features, None, grad_weight, None


def _with_missing_row(features: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
    """``(N, C)`` -> ``(N + 1, C)``: row ``N`` is what a neighbour table's "missing" entry reads."""
    return torch.cat([features, features.new_full((1, features.shape[1]), fill)])


def _gather_rows(features: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """``(N_in, C)`` rows through a ``(N_out, K)`` table (``N_in`` = zeros) -> ``(N_out, K*C)`` columns."""
    padded = _with_missing_row(features)
    return padded[table].reshape(table.shape[0], -1)


def _gemm_weight(weight: torch.Tensor) -> torch.Tensor:
    """Dense ``(C_out, C_in, k, k)`` -> ``(k*k*C_in, C_out)`` matching ``_gather_rows``' tap-major columns."""
    c_out, c_in, k, _ = weight.shape
    return weight.permute(2, 3, 1, 0).reshape(k * k * c_in, c_out)


def _depthwise_taps(features: torch.Tensor, taps: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``sum_k features[taps[k]] * weight[k]``: ``(N, C)``, ``(K, N)`` (N = missing), ``(K, C)`` -> ``(N, C)``."""
    padded = _with_missing_row(features)
    out = torch.zeros_like(features)
    for tap, tap_weight in zip(taps, weight):
        out.addcmul_(padded[tap], tap_weight)
    return out


def gather_conv(
    features: torch.Tensor, neighbours: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, groups: int,
    same_sites: bool,
) -> torch.Tensor:
    """Sparse k x k convolution as one gather and one GEMM, or a tap-by-tap depthwise product (custom autograd
    functions above keep only the input rows for backward).

    Args:
        features: ``(N_in, C_in)`` input rows.
        neighbours: ``(N_out, K)`` rows read by each output tap; ``N_in`` means "missing" (reads zeros).
        weight: dense ``(C_out, C_in/groups, k, k)`` with ``K = k*k`` taps ordered ``ky*k + kx``.
        bias: ``(C_out,)`` or None.
        groups: 1 (dense) or ``C_in == C_out`` (depthwise).
        same_sites: output sites are the input sites (a stride-1, submanifold conv).

    Returns:
        ``(N_out, C_out)``.
    """
    c_out, c_in_per_group, k, _ = weight.shape
    if groups == 1:
        out = _GatherGemmConv.apply(features.contiguous(), neighbours, weight, same_sites)
    elif groups == c_out == features.shape[1] and c_in_per_group == 1:
        tap_weight = weight.reshape(c_out, k * k).t().contiguous()  # (K, C)
        if same_sites:
            out = _SubmanifoldDepthwise.apply(features.contiguous(), neighbours.t().contiguous(), tap_weight)
        else:
            padded = _with_missing_row(features)
            out = torch.einsum("nkc,kc->nc", padded[neighbours], tap_weight)
    else:
        raise ValueError(f"unsupported groups={groups} for {c_out} output channels: use 1 or depthwise")
    return out if bias is None else out + bias


def gather_max_pool(features: torch.Tensor, neighbours: torch.Tensor) -> torch.Tensor:
    """Max over the visible neighbours: ``(N_in, C)`` and ``(N_out, K)`` -> ``(N_out, C)``."""
    padded = _with_missing_row(features, float("-inf"))
    return padded[neighbours].amax(dim=1)


def linear_conv1x1(features: torch.Tensor, conv: torch.nn.Conv2d) -> torch.Tensor:
    """A 1x1 stride-1 conv on channels-last features is one GEMM, identical for every backend."""
    return F.linear(features, conv.weight.flatten(1), conv.bias)
