"""``format=smp``: the encoder of a segmentation_models_pytorch model built on a timm encoder,
``smp.Unet(encoder_name="tu-<name>")`` (any sparkme model: ConvNeXt, RegNet, EfficientNet, ResNet, ...), loaded with
``model.encoder.load_state_dict(torch.load(path), strict=True)``.

smp's ``tu-`` encoder holds timm's ``features_only`` network as ``model``; that network renames the children of a
top-level ``Sequential`` (``stem.0`` -> ``stem_0``, a ConvNeXt's ``stages.1`` -> ``stages_1``) and has no head.
The keys are found on the features network itself (timm builds it, smp is not needed to export), which must take
every tensor: a strict load. smp's default ``encoder_depth=5`` keeps every stage. ResNets may also use smp's own
ResNet encoders (``encoder_name="resnet50"``), which take ``format=torchvision`` as it is.
"""

from __future__ import annotations

import timm
import torch

from sparkme.export_formats.base import ExportFormat

SMP_ENCODER_PREFIX = "model."


def features_key(key: str, features_keys: set[str]) -> str | None:
    """The features network's name for a dense model key, None for a key it does not hold (the head)."""
    flattened = key.replace(".", "_", 1)
    return next((k for k in (key, flattened) if k in features_keys), None)


def smp_state(state: dict[str, torch.Tensor], model_name: str) -> dict[str, torch.Tensor]:
    """Dense timm state dict of ``model_name`` -> the state dict of smp's ``tu-<model_name>`` encoder, checked by a
    strict load into timm's ``features_only`` network."""
    features = timm.create_model(model_name, features_only=True, pretrained=False)
    names = set(features.state_dict())
    out = {}
    for key, value in state.items():
        new = features_key(key, names)
        if new is not None:
            out[new] = value
    features.load_state_dict(out, strict=True)
    return {SMP_ENCODER_PREFIX + k: v for k, v in out.items()}


def make(model, model_name: str, image_size: int) -> dict[str, torch.Tensor]:
    """The encoder's state dict for smp from a pretrained ``SparK``."""
    return smp_state(model.encoder.to_dense().state_dict(), model_name)


FORMAT = ExportFormat("smp", make)
