"""The four feature levels SparK's decoder reads (strides 4, 8, 16, 32), chosen from a backbone's ``feature_info``.

timm lists, per model, the modules whose outputs are its features and their reductions (stride); when several
share a reduction the last one is the deepest feature at that stride (e.g. a DenseNet block before its transition
pool). torchvision's ResNets carry no ``feature_info``; their ``layer1`` ... ``layer4`` play the same role.
"""

from __future__ import annotations

import torchvision.models.resnet as tv_resnet
from torch import nn

from sparkme.errors import UsageError

STRIDES = (4, 8, 16, 32)


def _last_conv_channels(module: nn.Module) -> int:
    return [m for m in module.modules() if isinstance(m, nn.Conv2d)][-1].out_channels


def _feature_info(model: nn.Module) -> list[dict]:
    if isinstance(model, tv_resnet.ResNet):
        return [dict(module=f"layer{i}", reduction=2 ** (i + 1), num_chs=_last_conv_channels(getattr(model,
                                                                                                   f"layer{i}")))
                for i in range(1, 5)]
    info = getattr(model, "feature_info", None)
    if not isinstance(info, (list, tuple)) or not all(isinstance(f, dict) for f in info):
        raise UsageError(f"unsupported backbone {type(model).__module__}.{type(model).__name__}: it has no timm "
                         "feature_info listing its feature modules and strides (use a timm model or a "
                         "torchvision ResNet)")
    return list(info)


def feature_levels(model: nn.Module) -> list[dict]:
    """``[dict(module=..., reduction=s, num_chs=C)]`` for s = 4, 8, 16, 32, in that order.

    Raises:
        UsageError: the model has no feature at one of these strides (the message lists the ones it has).
    """
    info = _feature_info(model)
    by_stride = {int(f["reduction"]): dict(module=f["module"], reduction=int(f["reduction"]),
                                           num_chs=int(f["num_chs"])) for f in info}
    missing = [s for s in STRIDES if s not in by_stride]
    if missing:
        have = ", ".join(f"{f['module']} (stride {f['reduction']})" for f in info)
        raise UsageError(f"{type(model).__name__} has no feature level at stride {missing}: SparK needs strides "
                         f"4, 8, 16 and 32; its feature_info lists {have}")
    return [by_stride[s] for s in STRIDES]
