"""The table of operations a traced dense backbone may apply to a sparse map, keyed like the fx graph's nodes: by
module class (``call_module``), by function (``call_function``) and by method name (``call_method``).

A value flowing through the graph is either a ``SparseMap`` (the visible sites of a feature map), a tuple of them
(``split``/``chunk``), or a plain tensor that is dense per sample (SE's pooled ``(B, C, 1, 1)`` gate, a shape). Nodes
that read no sparse map run as in the dense model; every node that reads one needs an entry here. Each entry says
what it returns and may ``check`` the layer's settings (or the node's literal arguments) so that anything without
exact sparse semantics is refused at conversion, never at the first forward.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import timm.layers
import timm.models.convnext as timm_convnext
import torch
import torch.nn.functional as F
from timm.layers.norm_act import BatchNormAct2d, SyncBatchNormAct
from torch import nn

from sparkme.convert import convnext_leaf
from sparkme.convert.pointwise import is_pointwise
from sparkme.sparse import ops
from sparkme.sparse.base import SparseMap
from sparkme.sparse.context import conv_geometry
from sparkme.sparse.conv import freeze_spec, module_conv2d

MAP, MAPS, DENSE = "map", "maps", "dense"


@dataclass(frozen=True)
class SparseOp:
    """How one graph operation acts when a sparse map flows into it.

    Attributes:
        run: ``run(target, *args, **kwargs)`` with the node's evaluated arguments; ``target`` is the module, the
            function or the method name.
        returns: ``MAP``, ``MAPS`` (a tuple of maps) or ``DENSE`` (a per-sample tensor or a plain value).
        check: ``check(target, args, kwargs) -> reason or None`` at conversion; ``args`` hold fx nodes where the
            value is only known at run time. A module's check may store on it what its ``run`` reads (a conv's
            ``ConvSpec``).
    """

    run: Callable[..., Any]
    returns: str = MAP
    check: Callable[..., str | None] | None = None


# --- modules --------------------------------------------------------------------------------------------------------
def _norm_act_settings(bn: BatchNormAct2d, args=(), kwargs=None) -> str | None:
    for part in ("drop", "act"):
        child = getattr(bn, part, None)
        if child is not None and not is_pointwise(child):
            return f"its {part} {type(child).__name__} is not an elementwise op"
    return None


def _pool_args(pool: nn.Module) -> tuple[int, int, int]:
    """(kernel, stride, padding) of a square (cubic) pool (an int or the first of a pair / triple)."""
    return tuple(v if isinstance(v, int) else v[0] for v in (pool.kernel_size, pool.stride, pool.padding))


def _pool_settings(pool: nn.Module, args=(), kwargs=None) -> str | None:
    kernel, stride, padding = _pool_args(pool)
    if any(not isinstance(v, int) and len(set(v)) != 1 for v in (pool.kernel_size, pool.stride, pool.padding)):
        return "a kernel, stride or padding that differs between axes"
    if getattr(pool, "dilation", 1) not in (1, (1, 1), (1, 1, 1)) or getattr(pool, "return_indices", False):
        return "dilation != 1 or return_indices"
    if getattr(pool, "divisor_override", None) is not None:
        return "divisor_override (the mean is over visible sites)"
    # ceil_mode only adds a partial last window; a kernel == stride window tiles every map exactly (map sides are
    # multiples of 32 / stride), so it changes nothing there (ResNet-D's 2x2 shortcut pool sets it).
    if pool.ceil_mode and not (kernel == stride and padding == 0):
        return "ceil_mode=True with overlapping windows"
    try:
        conv_geometry(kernel, stride, padding)
    except ValueError as error:
        return str(error)
    return None


def _identity(module, x, *args, **kwargs):
    return x


def _instance_norm_settings(norm: nn.Module, args=(), kwargs=None) -> str | None:
    if norm.track_running_stats:
        return "track_running_stats=True (sparse instance norm uses each sample's visible statistics only)"
    return None


def _conv_op() -> SparseOp:
    # The spec (geometry and algorithm) is frozen on the conv at conversion.
    return SparseOp(lambda conv, x: module_conv2d(x, conv), check=lambda conv, args, kwargs: freeze_spec(conv))


def _pool_ops(max_pool: type, avg_pool: type) -> dict:
    return {max_pool: SparseOp(lambda pool, x: x.max_pool(*_pool_args(pool)), check=_pool_settings),
            avg_pool: SparseOp(lambda pool, x: x.avg_pool(*_pool_args(pool)), check=_pool_settings)}


MODULE_OPS: Mapping[type, SparseOp] = MappingProxyType({
    nn.Identity: SparseOp(_identity),
    nn.Conv2d: _conv_op(),
    nn.Conv3d: _conv_op(),
    nn.BatchNorm2d: SparseOp(lambda bn, x: ops.batch_norm(x, bn)),
    nn.BatchNorm3d: SparseOp(lambda bn, x: ops.batch_norm(x, bn)),
    # Per-sample norms: statistics over each sample's visible sites only.
    nn.InstanceNorm2d: SparseOp(lambda norm, x: ops.instance_norm(x, norm), check=_instance_norm_settings),
    nn.InstanceNorm3d: SparseOp(lambda norm, x: ops.instance_norm(x, norm), check=_instance_norm_settings),
    nn.GroupNorm: SparseOp(lambda gn, x: ops.group_norm(x, gn.num_groups, gn.weight, gn.bias, gn.eps)),
    nn.PReLU: SparseOp(lambda act, x: ops.prelu(x, act)),
    nn.SyncBatchNorm: SparseOp(lambda bn, x: ops.batch_norm(x, bn)),
    # timm's BN + activation: fed the visible rows as (N, C, 1, 1), its activation is per site too.
    BatchNormAct2d: SparseOp(lambda bn, x: ops.batch_norm(x, bn), check=_norm_act_settings),
    SyncBatchNormAct: SparseOp(lambda bn, x: ops.batch_norm(x, bn), check=_norm_act_settings),
    timm.layers.LayerNorm2d: SparseOp(lambda ln, x: ops.layer_norm(x, ln)),
    **_pool_ops(nn.MaxPool2d, nn.AvgPool2d),
    **_pool_ops(nn.MaxPool3d, nn.AvgPool3d),
    timm.layers.DropPath: SparseOp(lambda drop, x: ops.drop_path(x, drop)),
    # Fast path: ConvNeXt's block runs channels-last internally (permute, Linear, LayerNorm), kept as one leaf.
    timm_convnext.ConvNeXtBlock: SparseOp(convnext_leaf.convnext_block, check=convnext_leaf.check_block),
})


def module_op(module: nn.Module) -> SparseOp | None:
    """The entry for ``module`` (exact class: a subclass may change ``forward``), activations by their file."""
    op = MODULE_OPS.get(type(module))
    if op is None and is_pointwise(module):
        return SparseOp(lambda act, x: ops.pointwise(x, act))
    return op


# --- functions and methods ------------------------------------------------------------------------------------------
def _per_sample_values(x: SparseMap, other: Any) -> Any:
    """``other`` as per-site values for ``x``: a scalar as is, a ``(B|1, C|1, 1, 1)`` (``1, 1, 1``) tensor spread
    per sample."""
    if not isinstance(other, torch.Tensor) or other.numel() == 1:
        return other
    ones = (1,) * x.spatial_dims
    if other.dim() == 2 + x.spatial_dims and other.shape[2:] == ones and other.shape[0] in (1, x.context.batch_size):
        per_sample = other.reshape(other.shape[0], other.shape[1]).expand(x.context.batch_size, x.num_channels)
        return x.per_sample_broadcast(per_sample)
    raise ValueError(f"cannot broadcast a dense tensor of shape {tuple(other.shape)} over a sparse map "
                     f"{tuple(x.shape)}: only scalars and per-sample (B, C, 1, 1) tensors are supported")


def _binary(fn, a, b):
    """``a op b`` for maps of one forward pass and stride, or a map and a scalar / per-sample tensor."""
    if isinstance(a, SparseMap) and isinstance(b, SparseMap):
        if fn in (operator.add, operator.iadd, torch.add):
            return a + b
        if a.stride != b.stride or a.context is not b.context:
            raise ValueError("can only combine sparse maps of the same forward pass and stride")
        return a.with_features(fn(a.features, b.features))
    sparse, other, sparse_first = (a, b, True) if isinstance(a, SparseMap) else (b, a, False)
    values = _per_sample_values(sparse, other)
    scales = fn in (operator.mul, operator.imul, torch.mul)
    return sparse.map_features(lambda f: fn(f, values) if sparse_first else fn(values, f), keeps_zeros=scales)


def _elementwise_function(fn, x, *args, **kwargs):
    return ops.pointwise(x, lambda features: fn(features, *args, **kwargs))


def _elementwise_method(name, x, *args, **kwargs):
    return ops.pointwise(x, lambda features: getattr(features, name)(*args, **kwargs))


def _channel_dim(args, kwargs, position: int, default: int | None = None) -> Any:
    return args[position] if len(args) > position else kwargs.get("dim", default)


def _cat(fn, tensors, dim=0):
    maps = list(tensors)
    first = maps[0]
    if any(not isinstance(m, SparseMap) or m.stride != first.stride or m.context is not first.context for m in maps):
        raise ValueError("torch.cat can only join sparse maps of the same forward pass and stride")
    return first.with_features(torch.cat([m.features for m in maps], dim=-1))


def _channels_only(args, kwargs, position: int, default: int | None = None) -> str | None:
    dim = _channel_dim(args, kwargs, position, default)
    return None if dim in (1, -3) else f"dim={dim} (only the channel dim 1 is supported on a sparse map)"


def _split(name, x, sizes, dim=0):
    parts = getattr(x.features, name)(sizes, dim=-1)
    return tuple(x.with_features(part) for part in parts)


SPATIAL_DIMS = ((2, 3), (3, 2), (-2, -1), (-1, -2), (2, 3, 4), (-3, -2, -1))


def _mean(name, x, dim, keepdim=False):
    """Spatial mean of each sample over its own visible sites: ``(B, C)``, or ``(B, C, 1, 1)`` (``1, 1, 1``) with
    keepdim."""
    if len(tuple(dim) if isinstance(dim, (list, tuple)) else (dim,)) != x.spatial_dims:
        raise ValueError(f"mean over dims {dim} of a map with {x.spatial_dims} spatial dims: only the mean over all "
                         "spatial dims is defined on a sparse map")
    pooled = x.per_sample_mean()
    return pooled.view(*pooled.shape, *[1] * x.spatial_dims) if keepdim else pooled


def _mean_settings(name, args, kwargs) -> str | None:
    dim = _channel_dim(args, kwargs, 1)
    if (tuple(dim) if isinstance(dim, (list, tuple)) else dim) not in SPATIAL_DIMS:
        return f"dim={dim} (a sparse map is only averaged over its spatial dims (2, 3))"
    return None


def _expand_as(name, tensor, x):
    """``gate.expand_as(x)`` (ECA): the per-sample gate broadcasts when multiplied, so it is kept as it is."""
    return tensor


def _shape_only(fn, args, kwargs) -> str | None:
    return None if args[1:] == ("shape",) else f"attribute {args[1]!r} (only .shape is defined on a sparse map)"


_SCALAR_ARITHMETIC = (operator.add, operator.iadd, torch.add, operator.mul, operator.imul, torch.mul)
_ELEMENTWISE_FUNCTIONS = (F.relu, F.relu6, F.silu, F.gelu, F.hardswish, F.hardsigmoid, F.leaky_relu, F.mish,
                          F.dropout, torch.relu, torch.sigmoid, torch.tanh, F.sigmoid, F.tanh)

FUNCTION_OPS: Mapping[Callable, SparseOp] = MappingProxyType({
    **{fn: SparseOp(_binary) for fn in _SCALAR_ARITHMETIC},
    **{fn: SparseOp(_elementwise_function) for fn in _ELEMENTWISE_FUNCTIONS},
    torch.cat: SparseOp(lambda fn, tensors, dim=0: _cat(fn, tensors, dim),
                        check=lambda fn, args, kwargs: _channels_only(args, kwargs, 1, 0)),
    getattr: SparseOp(lambda fn, x, name: getattr(x, name), returns=DENSE, check=_shape_only),
})

METHOD_OPS: Mapping[str, SparseOp] = MappingProxyType({
    "add": SparseOp(lambda name, a, b: _binary(operator.add, a, b)),
    "mul": SparseOp(lambda name, a, b: _binary(operator.mul, a, b)),
    **{name: SparseOp(_elementwise_method) for name in ("relu", "sigmoid", "tanh", "contiguous", "clone")},
    "mean": SparseOp(_mean, returns=DENSE, check=_mean_settings),
    "split": SparseOp(_split, returns=MAPS, check=lambda name, args, kwargs: _channels_only(args, kwargs, 2, 0)),
    "chunk": SparseOp(_split, returns=MAPS, check=lambda name, args, kwargs: _channels_only(args, kwargs, 2, 0)),
    "size": SparseOp(lambda name, x, *dim: x.shape if not dim else x.shape[dim[0]], returns=DENSE),
    "expand_as": SparseOp(_expand_as, returns=DENSE),
})


def supported_names() -> str:
    """One line listing every supported operation, for the refusal message."""
    modules = sorted({t.__name__ for t in MODULE_OPS} | {"elementwise activations"})
    functions = sorted({getattr(f, "__name__", str(f)) for f in FUNCTION_OPS})
    return (f"modules: {', '.join(modules)}; functions: {', '.join(functions)}; "
            f"methods: {', '.join(sorted(METHOD_OPS))}")
