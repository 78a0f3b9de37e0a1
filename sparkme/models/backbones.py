"""Dense backbones by name, with SparK's per-model drop-path defaults.

ResNets come from timm by default (they carry DropPath, and their state-dict keys are torchvision's, so an export
loads into ``torchvision.models.resnet50()`` too); ``source="torchvision"`` builds torchvision's own ResNets.
"""

from __future__ import annotations

import timm
import torchvision
from torch import nn

# SparK paper: stochastic-depth rate used during pretraining per backbone.
SPARK_DROP_PATH = {
    "resnet50": 0.05, "resnet101": 0.08, "resnet152": 0.10, "resnet200": 0.15,
    "convnext_small": 0.2, "convnext_base": 0.3, "convnext_large": 0.4,
}
SUPPORTED_PREFIXES = ("resnet", "wide_resnet", "convnext_", "convnextv2_")
TORCHVISION_RESNETS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "wide_resnet50_2",
                       "wide_resnet101_2")


def create_backbone(name: str, source: str = "timm", drop_path_rate: float | None = None) -> nn.Module:
    """A randomly initialised dense backbone (nothing is downloaded).

    Args:
        name: e.g. ``resnet50``, ``resnet200``, ``convnext_tiny``, ``convnextv2_atto``.
        source: ``timm`` or ``torchvision`` (ResNets only).
        drop_path_rate: None means SparK's default for this model (0 when it has none).
    """
    if not name.startswith(SUPPORTED_PREFIXES):
        raise ValueError(f"unknown model {name!r}: sparkme supports ResNets (resnet18 ... resnet200, wide_resnet50_2)"
                         " and ConvNeXt V1/V2 (convnext_atto ... convnext_large, convnextv2_*)")
    rate = SPARK_DROP_PATH.get(name, 0.0) if drop_path_rate is None else float(drop_path_rate)
    if source == "torchvision":
        if name not in TORCHVISION_RESNETS:
            raise ValueError(f"torchvision source supports {', '.join(TORCHVISION_RESNETS)}, got {name!r}")
        if rate:
            raise ValueError("torchvision ResNets have no drop path: use source=timm or drop_path_rate=0")
        return getattr(torchvision.models, name)()
    if source != "timm":
        raise ValueError(f"unknown model source {source!r}; choose timm or torchvision")
    if name not in timm.list_models():
        raise ValueError(f"unknown model {name!r}: timm has no such model (see timm.list_models('convnext*'))")
    return timm.create_model(name, pretrained=False, drop_path_rate=rate)
