"""Dense backbones by name, with SparK's per-model drop-path defaults, and the coverage table.

Any timm ConvNet converts when its operations are in ``sparkme.models.sparse_ops`` (refused at conversion
otherwise); ``TESTED_MODELS`` lists the families proven exact on every backend. ResNets come from timm by default
(they carry DropPath, and their state-dict keys are torchvision's, so an export loads into
``torchvision.models.resnet50()`` too); ``source="torchvision"`` builds torchvision's own ResNets.
"""

from __future__ import annotations

import timm
import torchvision
from torch import nn

from sparkme.errors import UsageError

# SparK paper: stochastic-depth rate used during pretraining per backbone.
SPARK_DROP_PATH = {
    "resnet50": 0.05, "resnet101": 0.08, "resnet152": 0.10, "resnet200": 0.15,
    "convnext_small": 0.2, "convnext_base": 0.3, "convnext_large": 0.4,
}
# The coverage table (README): family -> the model every backend is proven exact on, in tests/test_encoders.py
# (ResNet, ConvNeXt) and tests/test_families.py (the others).
TESTED_MODELS = {
    "ResNet": "resnet50", "ResNet-D": "resnet50d", "ResNeXt": "resnext50_32x4d", "SE-ResNeXt": "seresnext50_32x4d",
    "ECA-ResNet": "ecaresnet50d", "RegNetY": "regnety_016", "EfficientNet": "efficientnet_b0",
    "MobileNetV3": "mobilenetv3_large_100", "DenseNet": "densenet121", "CSPResNet": "cspresnet50",
    "ConvNeXt": "convnext_atto", "ConvNeXt V2": "convnextv2_atto",
}
# Name prefixes of the families above (other timm ConvNets may convert, but are not offered untested).
SUPPORTED_PREFIXES = ("resnet", "wide_resnet", "resnext", "seresnext", "ecaresnet", "regnet", "efficientnet_",
                      "mobilenetv3_", "densenet", "cspresnet", "convnext_", "convnextv2_")
TORCHVISION_RESNETS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "wide_resnet50_2",
                       "wide_resnet101_2")


def create_backbone(name: str, source: str = "timm", drop_path_rate: float | None = None) -> nn.Module:
    """A randomly initialised dense backbone (nothing is downloaded).

    Args:
        name: a timm model, e.g. ``resnet50``, ``convnext_tiny``, ``efficientnet_b0`` (see ``TESTED_MODELS``).
        source: ``timm`` or ``torchvision`` (ResNets only).
        drop_path_rate: None means SparK's default for this model (0 when it has none).
    """
    if not name.startswith(SUPPORTED_PREFIXES):
        raise UsageError(f"unknown model {name!r}: sparkme supports ResNets and these families: "
                         + ", ".join(f"{family} (e.g. {model})" for family, model in TESTED_MODELS.items()))
    rate = SPARK_DROP_PATH.get(name, 0.0) if drop_path_rate is None else float(drop_path_rate)
    if source == "torchvision":
        if name not in TORCHVISION_RESNETS:
            raise ValueError(f"torchvision source supports {', '.join(TORCHVISION_RESNETS)}, got {name!r}")
        if rate:
            raise ValueError("torchvision ResNets have no drop path: use source=timm or drop_path_rate=0")
        return getattr(torchvision.models, name)()
    if source != "timm":
        raise ValueError(f"unknown model source {source!r}; choose timm or torchvision")
    if not timm.is_model(name):
        raise UsageError(f"unknown model {name!r}: timm has no such model; tested families: "
                         + ", ".join(f"{family} ({model})" for family, model in TESTED_MODELS.items()))
    # Some families (DenseNet) take no drop_path_rate argument at all: pass it only when stochastic depth is on.
    return timm.create_model(name, pretrained=False, **({"drop_path_rate": rate} if rate else {}))
