"""The dense model a fine-tune trains: the backbone with a classifier for the user's classes.

It is the ordinary timm (or torchvision) model, so what a fine-tune saves loads with ``strict=True`` into
``timm.create_model(name, num_classes=C)`` (and, for ResNets, ``torchvision.models.<name>(num_classes=C)``: timm's
ResNet keys are torchvision's).
"""

from __future__ import annotations

import timm
import torch
import torchvision
from torch import nn

from sparkme.models.backbones import create_backbone


def create_classifier(name: str, num_classes: int, drop_path_rate: float = 0.0, source: str = "timm") -> nn.Module:
    """A randomly initialised classifier ``(B, 3, H, W) -> (B, num_classes)`` logits (nothing is downloaded).

    Raises:
        UsageError / ValueError: a model or source sparkme does not support (``create_backbone``'s checks, run on
            the ``meta`` device: no memory, no time).
    """
    with torch.device("meta"):
        create_backbone(name, source, drop_path_rate=0.0)
    if source == "torchvision":
        return getattr(torchvision.models, name)(num_classes=num_classes)
    # Some families (DenseNet) take no drop_path_rate argument at all: pass it only when stochastic depth is on.
    return timm.create_model(name, pretrained=False, num_classes=num_classes,
                             **({"drop_path_rate": drop_path_rate} if drop_path_rate else {}))
