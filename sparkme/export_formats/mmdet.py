"""``format=mmdet``: the ConvNeXt file that SparK's ``downstream_mmdet`` (and ConvNeXt's MMSegmentation code) loads
with ``model.pretrained=PATH``: the official facebookresearch layout (``downsample_layers.*``, ``stages.i.j.*``,
as ``format=spark`` writes for ConvNeXt) under ``"state_dict"``, the first entry their
``mmcv_custom.load_checkpoint`` looks for.

The backbone definition adds four output norms (``norm0`` .. ``norm3``, one per returned stage) that no
ImageNet-pretrained ConvNeXt has: they are new layers of the detector, left at their initialisation (weight 1,
bias 0) by the non-strict load, exactly as with the official ConvNeXt checkpoints.
"""

from __future__ import annotations

import torch

from sparkme.errors import UsageError
from sparkme.export_formats.base import ExportFormat
from sparkme.models.families import find_family
from sparkme.models.spark_layouts import convnext_timm_to_official

WRAPPER_KEY = "state_dict"


def check_convnext(model_name: str) -> None:
    """Refuse a backbone other than ConvNeXt V1, the one SparK's MMDetection backbone defines.

    Raises:
        UsageError: naming the model and what to use instead.
    """
    family = find_family(model_name)
    if family is None or family.spark_layout != "convnext":
        raise UsageError(f"format=mmdet writes SparK's MMDetection ConvNeXt backbone (convnext_*), not "
                         f"{model_name!r}; for ResNets use format=detectron2, for any model format=timm")


def mmdet_checkpoint(state: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """A timm ConvNeXt encoder state dict -> ``{"state_dict": <official ConvNeXt keys, no head>}``."""
    return {WRAPPER_KEY: convnext_timm_to_official(state)}


def make(model, model_name: str, image_size: int) -> dict:
    """The file's contents from a pretrained ``SparK`` (its dense encoder)."""
    check_convnext(model_name)
    return mmdet_checkpoint(model.encoder.to_dense().state_dict())


FORMAT = ExportFormat("mmdet", make, check=check_convnext)
