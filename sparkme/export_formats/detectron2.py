"""``format=detectron2``: the ``.pkl`` that SparK's ``downstream_d2/convert-timm-to-d2.py`` writes from a ResNet's
``*_1kpretrained_timm_style.pth``, for detectron2's ``MODEL.WEIGHTS`` (SparK's config
``coco_R_50_FPN_CONV_1x_moco_adam.yaml`` runs on it unchanged).

The file is a pickle of ``{"model": {d2 key: numpy array}, "__author__": ..., "matching_heuristics": True}``:
the arrays keep the tensors' dtypes (float32 weights, int64 BatchNorm counters), as SparK's converter leaves them.
detectron2 names a ResNet's parts after the stage it starts (``res2`` .. ``res5`` for timm's ``layer1`` ..
``layer4``), puts the first conv under ``stem.`` and a conv's BatchNorm under ``<conv>.norm``; with
``matching_heuristics`` its checkpointer matches these names to the model's ``backbone.bottom_up.*`` by suffix.
"""

from __future__ import annotations

import pickle
import re
from pathlib import Path

import numpy as np
import torch

from sparkme.errors import UsageError
from sparkme.export_formats.base import ExportFormat
from sparkme.files import write_atomic
from sparkme.models.spark_layouts import encoder_to_official

# The depths detectron2's ``build_resnet_backbone`` builds (``MODEL.RESNETS.DEPTH``) from a ResNet of timm's /
# torchvision's key layout; ResNet-200, ResNet-D's deep stem and the other families have no d2 counterpart.
DETECTRON2_RESNETS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")
# Written as SparK's converter writes it, so that the bytes are the same: detectron2 only logs it as the origin.
AUTHOR = "https://github.com/keyu-tian/SparK"
# Protocol 4: what SparK's converter writes with Python 3.8 to 3.13's default, and what detectron2's loader reads.
PICKLE_PROTOCOL = 4

# (pattern, replacement), applied in order to a timm / torchvision ResNet key that is not in the stem.
BLOCK_RENAMES = (
    (re.compile(r"^layer(\d)\."), lambda m: f"res{int(m.group(1)) + 1}."),
    (re.compile(r"\.bn(\d)\."), lambda m: f".conv{m.group(1)}.norm."),
    (re.compile(r"\.downsample\.0\."), lambda m: ".shortcut."),
    (re.compile(r"\.downsample\.1\."), lambda m: ".shortcut.norm."),
)


def check_resnet(model_name: str) -> None:
    """Refuse a backbone detectron2's ResNet does not build.

    Raises:
        UsageError: naming the model and the ResNets accepted.
    """
    if model_name not in DETECTRON2_RESNETS:
        raise UsageError(f"format=detectron2 writes detectron2's ResNet ({', '.join(DETECTRON2_RESNETS)}), not "
                         f"{model_name!r}; for ConvNeXt use format=mmdet, for any model format=timm")


def detectron2_key(key: str) -> str:
    """timm / torchvision ResNet key -> detectron2's: ``conv1.weight`` -> ``stem.conv1.weight``, ``bn1.bias`` ->
    ``stem.conv1.norm.bias``, ``layer1.0.bn2.weight`` -> ``res2.0.conv2.norm.weight``,
    ``layer3.0.downsample.1.running_var`` -> ``res4.0.shortcut.norm.running_var``."""
    if not key.startswith("layer"):
        return "stem." + re.sub(r"^bn(\d)\.", r"conv\1.norm.", key)
    for pattern, replacement in BLOCK_RENAMES:
        key = pattern.sub(replacement, key)
    return key


def detectron2_checkpoint(state: dict[str, torch.Tensor]) -> dict:
    """A ResNet encoder state dict without ``fc`` (SparK's ``*_timm_style`` layout) -> detectron2's weights file
    contents, keys in the order of ``state``."""
    return {"model": {detectron2_key(k): v.detach().cpu().numpy() for k, v in state.items()},
            "__author__": AUTHOR, "matching_heuristics": True}


def make(model, model_name: str, image_size: int) -> dict:
    """The file's contents from a pretrained ``SparK`` (the dense encoder, classifier left out)."""
    check_resnet(model_name)
    return detectron2_checkpoint(encoder_to_official(model.encoder.to_dense().state_dict(), "resnet"))


def save_pickle(contents: dict, path: str | Path) -> Path:
    """detectron2 reads ``.pkl`` weights with ``pickle`` (numpy arrays), not ``torch.load``."""
    if not all(isinstance(v, np.ndarray) for v in contents["model"].values()):
        raise TypeError("a detectron2 weights file holds numpy arrays only")
    return write_atomic(path, lambda file: pickle.dump(contents, file, protocol=PICKLE_PROTOCOL))


FORMAT = ExportFormat("detectron2", make, check=check_resnet, save=save_pickle)
