"""The dense model a fine-tune trains: the backbone with a classifier for the user's classes.

It is the ordinary timm (or torchvision) model, so what a fine-tune saves loads with ``strict=True`` into
``timm.create_model(name, num_classes=C)`` (and, for ResNets, ``torchvision.models.<name>(num_classes=C)``: timm's
ResNet keys are torchvision's).
"""

from __future__ import annotations

import timm
import torchvision
from torch import nn

from sparkme.errors import UsageError
from sparkme.models.backbones import TORCHVISION_RESNETS, check_model_name


def create_classifier(name: str, num_classes: int, drop_path_rate: float = 0.0, source: str = "timm") -> nn.Module:
    """A randomly initialised classifier ``(B, 3, H, W) -> (B, num_classes)`` logits (nothing is downloaded).

    Raises:
        UsageError: a model or source sparkme does not support.
    """
    if source == "torchvision":
        if name not in TORCHVISION_RESNETS:
            raise UsageError(f"source=torchvision supports {', '.join(TORCHVISION_RESNETS)}, got {name!r}; use "
                             "source=timm")
        if drop_path_rate:
            raise UsageError("torchvision ResNets have no drop path: use source=timm or recipe.drop_path=0")
        return getattr(torchvision.models, name)(num_classes=num_classes)
    if source != "timm":
        raise UsageError(f"unknown model source {source!r}; choose timm or torchvision")
    check_model_name(name)
    # Some families (DenseNet) take no drop_path_rate argument at all: pass it only when stochastic depth is on.
    return timm.create_model(name, pretrained=False, num_classes=num_classes,
                             **({"drop_path_rate": drop_path_rate} if drop_path_rate else {}))
