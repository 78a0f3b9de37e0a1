"""One sparse convolution: a frozen ``ConvSpec`` chosen once per layer, and ``conv2d`` that runs it.

The spec holds the layer's geometry and the algorithm that computes it; conversion computes it once per
``nn.Conv2d`` / ``nn.Conv3d`` and stores it on the module (``freeze_spec``), so no forward re-derives it. Backends
supply the kernels, not the choice: ``conv2d`` calls the map's kernel for the spec's algorithm
(``SparseMap.per_site_conv``, ``grid_depthwise_conv`` or ``gather_conv``).
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import TYPE_CHECKING

import torch
from torch import nn

from sparkme.sparse.context import conv_geometry

if TYPE_CHECKING:
    from sparkme.sparse.base import SparseMap

SPEC_ATTRIBUTE = "sparse_conv_spec"  # where conversion stores a Conv2d's ConvSpec on the module


class Algorithm(enum.Enum):
    """How a sparse conv is computed (on true-sparse backends; the masked oracle runs every one as ``F.conv2d``)."""

    PER_SITE = "per_site"  # 1x1, stride 1: one GEMM on each site's row
    GRID_DEPTHWISE = "grid_depthwise"  # stride-1 'same' depthwise: oneDNN on a zeroed scratch grid
    GATHER_GEMM = "gather_gemm"  # groups == 1, k x k or strided: gather the taps, one GEMM (or the backend's own)
    GATHER_DEPTHWISE = "gather_depthwise"  # strided depthwise: gathered taps times per-channel weights
    GATHER_GROUPED = "gather_grouped"  # other grouped convs: one batched GEMM over the groups


# The map's kernel method for each algorithm.
KERNEL_METHODS: Mapping[Algorithm, str] = MappingProxyType({
    Algorithm.PER_SITE: "per_site_conv",
    Algorithm.GRID_DEPTHWISE: "grid_depthwise_conv",
    Algorithm.GATHER_GEMM: "gather_conv",
    Algorithm.GATHER_DEPTHWISE: "gather_conv",
    Algorithm.GATHER_GROUPED: "gather_conv",
})


@dataclass(frozen=True)
class ConvSpec:
    """Geometry and algorithm of one square (cubic), undilated, zero-padded sparse conv.

    Attributes:
        kernel, stride, padding: of the dense ``nn.Conv2d`` or ``nn.Conv3d`` (one int each: the same along every
            axis); the output map is at ``stride`` times the input's. The number of spatial dims is the weight's.
        groups: the conv's groups (1 dense, ``C_in == C_out`` depthwise).
        algorithm: how true-sparse backends compute it.
    """

    kernel: int
    stride: int
    padding: int
    groups: int
    algorithm: Algorithm

    @property
    def same_sites(self) -> bool:
        """Stride 1: the output sites are the input sites (a submanifold conv)."""
        return self.stride == 1

    @classmethod
    def of(cls, conv: nn.Conv2d | nn.Conv3d) -> ConvSpec:
        """The spec of ``conv``.

        Raises:
            ValueError: the conv has no sparse meaning here (non-square, dilated, non-zero padding mode, or a
                geometry other than a centred odd kernel or a patchify kernel); the message names the setting.
        """
        if conv.padding_mode != "zeros":
            raise ValueError(f"padding_mode={conv.padding_mode!r} (only zero padding has a sparse meaning)")
        kernels, strides, padding, dilations = conv.kernel_size, conv.stride, conv.padding, conv.dilation
        if (isinstance(padding, str) or len(set(kernels)) != 1 or len(set(strides)) != 1 or len(set(padding)) != 1
                or set(dilations) != {1}):
            shape = "cubic" if len(kernels) == 3 else "square"
            raise ValueError(f"unsupported {type(conv).__name__} {conv}: sparse backends need {shape} kernels, equal "
                             "strides and paddings, and dilation 1")
        kernel, stride, padding, groups = kernels[0], strides[0], padding[0], conv.groups
        conv_geometry(kernel, stride, padding)
        depthwise = groups == conv.in_channels == conv.out_channels
        if kernel == 1 and stride == 1:
            algorithm = Algorithm.PER_SITE
        elif depthwise and stride == 1:
            algorithm = Algorithm.GRID_DEPTHWISE
        elif groups == 1:
            algorithm = Algorithm.GATHER_GEMM
        else:
            algorithm = Algorithm.GATHER_DEPTHWISE if depthwise else Algorithm.GATHER_GROUPED
        return cls(kernel, stride, padding, groups, algorithm)


def freeze_spec(conv: nn.Conv2d) -> str | None:
    """Store ``conv``'s ``ConvSpec`` on it (at conversion); the reason it has none, or None."""
    try:
        setattr(conv, SPEC_ATTRIBUTE, ConvSpec.of(conv))
    except ValueError as error:
        return str(error)
    return None


def conv2d(x: SparseMap, weight: torch.Tensor, bias: torch.Tensor | None, spec: ConvSpec) -> SparseMap:
    """Sparse convolution of ``x`` by a dense conv's weights.

    Args:
        x: a map of ``C_in`` channels at stride ``s``.
        weight: ``(C_out, C_in / groups, k, k)`` (volumes: ``k, k, k``); bias: ``(C_out,)`` or None.
        spec: the conv's ``ConvSpec``.

    Returns:
        A map of ``C_out`` channels at stride ``s * spec.stride`` on the visible sites there.
    """
    return getattr(x, KERNEL_METHODS[spec.algorithm])(weight, bias, spec)


def module_conv2d(x: SparseMap, conv: nn.Conv2d | nn.Conv3d) -> SparseMap:
    """``conv2d`` with a converted ``nn.Conv2d``'s (or ``nn.Conv3d``'s) weights and frozen spec."""
    return conv2d(x, conv.weight, conv.bias, getattr(conv, SPEC_ATTRIBUTE))
