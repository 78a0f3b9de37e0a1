"""Run the modules of a dense torchvision/timm backbone on a ``SparseMap``.

The sparse encoder keeps the dense model's own modules (so its state dict *is* the dense state dict); this file is
the one place that says how each supported module type acts on sparse maps. Any other module type is refused with
a clear error at conversion time (``check_supported``), never silently run densely.
"""

from __future__ import annotations

from collections.abc import Callable

import timm.layers
import timm.models.convnext as timm_convnext
import timm.models.resnet as timm_resnet
import torchvision.models.resnet as tv_resnet
from timm.layers.grn import GlobalResponseNorm
from torch import nn

from sparkme.sparse import ops
from sparkme.sparse.base import SparseMap

# Every class of these modules is an elementwise activation (timm's GELU, GELUTanh, Swish, ...).
POINTWISE_MODULES = ("timm.layers.activations", "torch.nn.modules.activation")
ACTIVATIONS = (nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.LeakyReLU, nn.Hardswish, nn.Dropout)

# (main path attribute names, final activation) of the residual blocks; None entries are skipped.
RESIDUAL_BLOCKS: dict[type, tuple[tuple[str, ...], str]] = {
    tv_resnet.BasicBlock: (("conv1", "bn1", "relu", "conv2", "bn2"), "relu"),
    tv_resnet.Bottleneck: (("conv1", "bn1", "relu", "conv2", "bn2", "relu", "conv3", "bn3"), "relu"),
    timm_resnet.BasicBlock: (("conv1", "bn1", "drop_block", "act1", "aa", "conv2", "bn2", "se", "drop_path"),
                             "act2"),
    timm_resnet.Bottleneck: (("conv1", "bn1", "act1", "conv2", "bn2", "drop_block", "act2", "aa", "conv3", "bn3",
                              "se", "drop_path"), "act3"),
}

# MLPs of ConvNeXt blocks (Linear or 1x1-conv layers): the attributes applied in order, all pointwise.
MLPS: dict[type, tuple[str, ...]] = {
    timm.layers.Mlp: ("fc1", "act", "drop1", "norm", "fc2", "drop2"),
    timm.layers.GlobalResponseNormMlp: ("fc1", "act", "drop1", "grn", "fc2", "drop2"),
    timm.layers.ConvMlp: ("fc1", "norm", "act", "drop", "fc2"),
}


def apply_module(module: nn.Module | None, x: SparseMap) -> SparseMap:
    """Apply one supported dense module to a sparse map (``None`` is the identity)."""
    if module is None:
        return x
    handler = _handler(type(module))
    if handler is None:
        raise TypeError(unsupported_message(type(module)))
    return handler(x, module)


def _chain(module: nn.Module, names: tuple[str, ...], x: SparseMap) -> SparseMap:
    for name in names:
        x = apply_module(getattr(module, name, None), x)
    return x


def _sequential(x: SparseMap, module: nn.Sequential) -> SparseMap:
    for child in module:
        x = apply_module(child, x)
    return x


def _mlp(x: SparseMap, mlp: nn.Module) -> SparseMap:
    return _chain(mlp, MLPS[type(mlp)], x)


def _residual(x: SparseMap, block: nn.Module) -> SparseMap:
    main, final = RESIDUAL_BLOCKS[type(block)]
    out = _chain(block, main, x)
    shortcut = apply_module(block.downsample, x)
    return apply_module(getattr(block, final), out + shortcut)


def _convnext_block(x: SparseMap, block: timm_convnext.ConvNeXtBlock) -> SparseMap:
    out = apply_module(block.conv_dw, x)
    out = apply_module(block.norm, out)
    out = apply_module(block.mlp, out)
    if block.gamma is not None:
        gamma = block.gamma
        out = ops.pointwise(out, lambda features: features * gamma)
    return apply_module(block.drop_path, out) + apply_module(block.shortcut, x)


def _convnext_stage(x: SparseMap, stage: timm_convnext.ConvNeXtStage) -> SparseMap:
    return apply_module(stage.blocks, apply_module(stage.downsample, x))


def _max_pool(x: SparseMap, pool: nn.MaxPool2d) -> SparseMap:
    kernel, stride, padding = (v if isinstance(v, int) else v[0] for v in (pool.kernel_size, pool.stride,
                                                                            pool.padding))
    if pool.dilation not in (1, (1, 1)) or pool.ceil_mode:
        raise TypeError(f"unsupported {pool}: sparse max pooling needs dilation=1 and ceil_mode=False")
    return x.max_pool2d(kernel, stride, padding)


_HANDLERS: dict[type, Callable[[SparseMap, nn.Module], SparseMap]] = {
    nn.Sequential: _sequential,
    nn.Identity: lambda x, module: x,
    nn.Conv2d: lambda x, module: x.conv2d(module),
    nn.MaxPool2d: _max_pool,
    nn.BatchNorm2d: ops.batch_norm,
    nn.SyncBatchNorm: ops.batch_norm,
    nn.LayerNorm: ops.layer_norm,
    nn.Linear: ops.pointwise,
    GlobalResponseNorm: ops.global_response_norm,
    timm.layers.DropPath: ops.drop_path,
    timm_convnext.ConvNeXtBlock: _convnext_block,
    timm_convnext.ConvNeXtStage: _convnext_stage,
    **{block: _residual for block in RESIDUAL_BLOCKS},
    **{mlp: _mlp for mlp in MLPS},
    **{act: ops.pointwise for act in ACTIVATIONS},
}

# LayerNorm subclasses (timm LayerNorm, LayerNorm2d) normalise channels per site: the same sparse op.
_SUBCLASS_HANDLERS = ((nn.LayerNorm, ops.layer_norm),)


def _handler(module_type: type):
    if module_type in _HANDLERS:
        return _HANDLERS[module_type]
    if module_type.__module__ in POINTWISE_MODULES:
        return ops.pointwise
    for base, handler in _SUBCLASS_HANDLERS:
        if issubclass(module_type, base):
            return handler
    return None


def unsupported_message(module_type: type) -> str:
    supported = sorted({t.__name__ for t in _HANDLERS} | {"LayerNorm subclasses", "activations"})
    return (f"layer type {module_type.__module__}.{module_type.__name__} has no sparse implementation; "
            f"supported layer types: {', '.join(supported)}")


def check_supported(module: nn.Module, prefix: str = "") -> None:
    """Raise TypeError naming the first module (by path) whose type cannot run sparsely."""
    for name, child in module.named_modules(prefix=prefix):
        if _handler(type(child)) is None:
            raise TypeError(f"cannot make {name or type(module).__name__!r} sparse: "
                            + unsupported_message(type(child)))
