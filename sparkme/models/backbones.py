"""Dense backbones by name, with their family's pretraining drop path (``sparkme.models.families``).

Any timm ConvNet converts when its operations are in ``sparkme.convert``'s op table (refused at conversion
otherwise); ``families.TESTED_MODELS`` lists the families proven exact on every backend. ResNets come from timm by
default (they carry DropPath, and their state-dict keys are torchvision's, so an export loads into
``torchvision.models.resnet50()`` too); ``source="torchvision"`` builds torchvision's own ResNets.
"""

from __future__ import annotations

import timm
import torchvision
from torch import nn

from sparkme.errors import UsageError
from sparkme.models import families
from sparkme.models.families import SUPPORTED_PREFIXES, TESTED_MODELS

__all__ = ["SUPPORTED_PREFIXES", "TESTED_MODELS", "TORCHVISION_RESNETS", "check_model_name", "create_backbone"]

TORCHVISION_RESNETS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "wide_resnet50_2",
                       "wide_resnet101_2")


def check_model_name(name: str) -> str:
    """``name`` when it is a timm model of a supported family; else a UsageError naming the families."""
    families.family_of(name)
    if not timm.is_model(name):
        raise UsageError(f"unknown model {name!r}: timm has no such model; tested families: "
                         + ", ".join(f"{family} ({model})" for family, model in TESTED_MODELS.items()))
    return name


def create_backbone(name: str, source: str = "timm", drop_path_rate: float | None = None) -> nn.Module:
    """A randomly initialised dense backbone (nothing is downloaded).

    Args:
        name: a timm model, e.g. ``resnet50``, ``convnext_tiny``, ``efficientnet_b0`` (see ``TESTED_MODELS``).
        source: ``timm`` or ``torchvision`` (ResNets only).
        drop_path_rate: None means the model's pretraining default (``families.DROP_PATH``; 0 when it has none).
    """
    families.family_of(name)  # an unsupported name fails here, naming the families
    rate = families.drop_path_rate(name, drop_path_rate)
    if source == "torchvision":
        if name not in TORCHVISION_RESNETS:
            raise ValueError(f"torchvision source supports {', '.join(TORCHVISION_RESNETS)}, got {name!r}")
        if rate:
            raise ValueError("torchvision ResNets have no drop path: use source=timm or drop_path_rate=0")
        return getattr(torchvision.models, name)()
    if source != "timm":
        raise ValueError(f"unknown model source {source!r}; choose timm or torchvision")
    check_model_name(name)
    # Some families (DenseNet) take no drop_path_rate argument at all: pass it only when stochastic depth is on.
    return timm.create_model(name, pretrained=False, **({"drop_path_rate": rate} if rate else {}))
