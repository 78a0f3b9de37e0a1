"""ConvNeXt's block as one leaf of the traced graph (its fast path).

Inside the block the features are permuted to channels-last and run through ``nn.LayerNorm`` and ``nn.Linear``,
which act on the *last* dim: traced op by op, those would need a layout flag on every value. Sparse features are
already channels-last, so the whole block is a few per-site ops around one depthwise conv, applied here directly.
"""

from __future__ import annotations

import timm.layers
import timm.models.convnext as timm_convnext
from timm.layers.grn import GlobalResponseNorm
from torch import nn

from sparkme.convert.pointwise import is_pointwise
from sparkme.sparse import ops
from sparkme.sparse.base import SparseMap
from sparkme.sparse.conv import SPEC_ATTRIBUTE, Algorithm, freeze_spec, module_conv2d

# The per-site layers of each ConvNeXt MLP, in the order its forward applies them.
MLPS: dict[type, tuple[str, ...]] = {
    timm.layers.Mlp: ("fc1", "act", "drop1", "norm", "fc2", "drop2"),
    timm.layers.GlobalResponseNormMlp: ("fc1", "act", "drop1", "grn", "fc2", "drop2"),
    timm.layers.ConvMlp: ("fc1", "norm", "act", "drop", "fc2"),  # conv_mlp=True (atto ... nano): 1x1 convs
}


def _per_site(layer: nn.Module | None, x: SparseMap) -> SparseMap:
    """One per-site layer of the block: Linear or 1x1 conv, activation, dropout, LayerNorm, GRN or Identity."""
    if layer is None or isinstance(layer, nn.Identity):
        return x
    if isinstance(layer, nn.LayerNorm):
        return ops.layer_norm(x, layer)
    if isinstance(layer, nn.Conv2d):
        return module_conv2d(x, layer)
    if isinstance(layer, GlobalResponseNorm):
        return ops.global_response_norm(x, layer)
    return ops.pointwise(x, layer)


def convnext_block(block: timm_convnext.ConvNeXtBlock, x: SparseMap) -> SparseMap:
    """``x + drop_path(gamma * mlp(norm(conv_dw(x))))`` on a sparse map ``x`` (C channels, any stride)."""
    out = _per_site(block.norm, module_conv2d(x, block.conv_dw))
    for name in MLPS[type(block.mlp)]:
        out = _per_site(getattr(block.mlp, name, None), out)
    if block.gamma is not None:
        gamma = block.gamma
        out = ops.pointwise(out, lambda features: features * gamma)
    if isinstance(block.drop_path, timm.layers.DropPath):
        out = ops.drop_path(out, block.drop_path)
    return out + x


def check_block(block: timm_convnext.ConvNeXtBlock, args=(), kwargs=None) -> str | None:
    """Why ``block`` cannot run as above, or None; freezes the ``ConvSpec`` of its convs on them."""
    if type(block.mlp) not in MLPS:
        return f"MLP {type(block.mlp).__name__} (supported: {', '.join(t.__name__ for t in MLPS)})"
    if not isinstance(block.shortcut, nn.Identity):
        return f"shortcut {type(block.shortcut).__name__} (only an identity shortcut)"
    reason = freeze_spec(block.conv_dw)
    if reason:
        return reason
    layers = [block.norm, *(getattr(block.mlp, n, None) for n in MLPS[type(block.mlp)])]
    for layer in layers:
        if isinstance(layer, nn.Conv2d):
            reason = freeze_spec(layer)
            if reason or getattr(layer, SPEC_ATTRIBUTE).algorithm is not Algorithm.PER_SITE:
                return f"MLP conv {layer} (only 1x1 stride-1 convs are per site)"
        if layer is not None and not isinstance(layer, (nn.LayerNorm, nn.Linear, nn.Conv2d, GlobalResponseNorm)) \
                and not is_pointwise(layer):
            return f"layer {type(layer).__name__} has no per-site meaning"
    return None
