"""SparK's layer-wise lr decay: its own layer numbering, and the optimizer's parameter groups built from it.

SparK (``downstream_imagenet/models/__init__.py``, ``lr_decay.py``) numbers a backbone in few, coarse layers
0 .. N + 1 (stem 0, the last stage N, the classifier and anything after the backbone N + 1) and scales each
parameter's lr by ``layer_decay ** (N + 1 - layer_id)``; timm's own ``layer_decay`` makes one layer per block
instead (18 for ResNet-50, 38 for ConvNeXt-S, where SparK has N = 6 and 12), so it is not used here.

- ResNet (timm's ``ResNet`` class, i.e. also ResNet-D / ResNeXt / SE / ECA, and torchvision's ResNets; the keys
  are torchvision's): ``layer2`` and ``layer3`` blocks are grouped ``g2`` and ``g3`` at a time (SparK's table
  ``_SPARK_RESNET_GROUPS``; other depths: ``layer2`` in two groups, ``layer3`` by threes),
  N = 2 + ceil(L2 / g2) + ceil(L3 / g3). Stem 0, ``layer1`` 1, ``layer2`` block b 2 + b // g2, ``layer3`` block b
  2 + ceil(L2 / g2) + b // g3, ``layer4`` N, ``fc`` N + 1.
- ConvNeXt / ConvNeXt V2 (timm's ``ConvNeXt``; official names accepted too): N = 12 if stage 2 has more than 9
  blocks else 6. Stem 0, stage 0 1, stage 1 and its down-sampler 2, stage 2's down-sampler 3, stage 2 block j
  3 + j // 3, stage 3 and its down-sampler N, the rest (final norm, head) N + 1.
- Other timm families (RegNet, EfficientNet, MobileNetV3, DenseNet, CSPResNet): sparkme's choice, SparK's
  granularity taken from timm's coarse ``group_matcher``: stem 0, one layer per stage 1 .. N, the head N + 1
  (whatever timm leaves out of the stem and stages: classifier, a MobileNetV3's ``conv_head``, a DenseNet's
  ``norm5``; an EfficientNet's ``conv_head`` / ``bn2`` timm counts with the last stage).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

import timm.models.convnext
import timm.models.resnet
import torch
import torchvision.models.resnet
from timm.models import group_parameters
from torch import nn

from sparkme.errors import UsageError

# SparK's `resnets_get_layer_id_and_scale_exp`: (blocks in layer2, layer3) -> (blocks per layer in layer2, layer3).
_SPARK_RESNET_GROUPS = MappingProxyType({(4, 6): (2, 3), (4, 23): (2, 3), (8, 36): (4, 4), (24, 36): (4, 4),
                                         (30, 48): (5, 6)})
# SparK's `nowd_keys` (util.py): substrings of parameter names never weight-decayed, besides 1-D tensors and biases.
NO_WEIGHT_DECAY_KEYS = ("cls_token", "pos_embed", "mask_token", "gamma")


@dataclass(frozen=True)
class ResNetLayers:
    """A ResNet's block counts in ``layer2`` / ``layer3`` and how many blocks make one of SparK's layers there."""

    layer2_blocks: int
    layer3_blocks: int
    group2: int
    group3: int

    @property
    def num_layers(self) -> int:
        return 2 + math.ceil(self.layer2_blocks / self.group2) + math.ceil(self.layer3_blocks / self.group3)

    def layer_id(self, name: str) -> int:
        head = name.split(".")[0]
        if head.startswith("layer") and head[5:].isdigit():
            stage, block = int(head[5:]), int(name.split(".")[1])
            if stage == 1:
                return 1
            if stage == 2:
                return 2 + block // self.group2
            if stage == 3:
                return 2 + math.ceil(self.layer2_blocks / self.group2) + block // self.group3
            return self.num_layers
        return self.num_layers + 1 if name.startswith("fc.") else 0


@dataclass(frozen=True)
class ConvNeXtLayers:
    """A ConvNeXt's depth of stage 2, which sets N (12 beyond 9 blocks, else 6)."""

    stage2_blocks: int

    @property
    def num_layers(self) -> int:
        return 12 if self.stage2_blocks > 9 else 6

    def layer_id(self, name: str) -> int:
        parts = _official_convnext_name(name).split(".")
        n = self.num_layers
        if parts[0] == "downsample_layers":
            stage = int(parts[1])
            return {0: 0, 1: 2, 2: 3}.get(stage, n)
        if parts[0] == "stages":
            stage, block = int(parts[1]), int(parts[2])
            return {0: 1, 1: 2, 2: 3 + block // 3}.get(stage, n)
        return n + 1


@dataclass(frozen=True)
class StageLayers:
    """Any other timm model: layer ids per parameter name from timm's coarse ``group_matcher``."""

    ids: Mapping[str, int]
    num_layers: int

    def layer_id(self, name: str) -> int:
        return self.ids[name]


LayerStructure = ResNetLayers | ConvNeXtLayers | StageLayers


def _official_convnext_name(name: str) -> str:
    """timm ConvNeXt names -> the official (facebookresearch) names SparK's rule is written in."""
    parts = name.split(".")
    if parts[0] == "stem":
        return ".".join(["downsample_layers", "0", *parts[1:]])
    if parts[0] == "stages" and len(parts) > 2 and parts[2] == "downsample":
        return ".".join(["downsample_layers", parts[1], *parts[3:]])
    if parts[0] == "stages" and len(parts) > 2 and parts[2] == "blocks":
        return ".".join(["stages", parts[1], *parts[3:]])
    return name


def layer_structure(model: nn.Module, model_name: str = "") -> LayerStructure:
    """How SparK (or, for families it has no rule for, sparkme) numbers ``model``'s layers.

    Raises:
        UsageError: a model with neither SparK's rule nor a timm ``group_matcher``.
    """
    if isinstance(model, (timm.models.resnet.ResNet, torchvision.models.resnet.ResNet)):
        blocks = (len(model.layer2), len(model.layer3))
        groups = _SPARK_RESNET_GROUPS.get(blocks, (math.ceil(blocks[0] / 2), 3))
        return ResNetLayers(*blocks, *groups)
    if isinstance(model, timm.models.convnext.ConvNeXt):
        return ConvNeXtLayers(len(model.stages[2].blocks))
    if not hasattr(model, "group_matcher"):
        raise UsageError(f"no layer numbering for model {model_name or type(model).__name__!r}: it is neither a "
                         "ResNet nor a ConvNeXt and has no timm group_matcher")
    ids = group_parameters(model, model.group_matcher(coarse=True), reverse=True)
    head = max(ids.values())
    classifier = {id(p) for p in model.get_classifier().parameters()}
    if any(ids[name] != head for name, p in model.named_parameters() if id(p) in classifier):
        raise UsageError(f"no layer numbering for model {model_name or type(model).__name__!r}: timm's "
                         "group_matcher does not put the classifier in the last group")
    return StageLayers(MappingProxyType(dict(ids)), head - 1)


def spark_layer_id(param_name: str, structure: LayerStructure) -> int:
    """The layer (0 .. N + 1) of a parameter, by SparK's rule for ``structure``."""
    return structure.layer_id(param_name)


def num_layers(structure: LayerStructure) -> int:
    """N: the last backbone layer's id (the classifier is N + 1)."""
    return structure.num_layers


def lr_scale(layer_id: int, n: int, layer_decay: float) -> float:
    """``layer_decay ** (N + 1 - layer_id)``; 1 when ``layer_decay`` is not in (0, 1), where SparK turns it off."""
    return layer_decay ** (n + 1 - layer_id) if 0.0 < layer_decay < 1.0 else 1.0


def decays(name: str, param: torch.Tensor) -> bool:
    """Whether SparK weight-decays a parameter: not 1-D tensors, biases, nor names with a no-decay key."""
    return not (param.ndim == 1 or name.endswith(".bias") or any(key in name for key in NO_WEIGHT_DECAY_KEYS))


def param_groups(model: nn.Module, model_name: str, weight_decay: float, layer_decay: float) -> list[dict]:
    """The optimizer's parameter groups, one per (layer, decayed or not), in order of first appearance as SparK's
    ``get_param_groups``; frozen parameters (``requires_grad=False``) are left out.

    Each group is ``{"params", "weight_decay", "lr_scale"}``: ``weight_decay`` is ``weight_decay`` or 0, and the
    lr of the group is meant to be ``lr * lr_scale`` (``FinetuneSchedule`` and timm's schedulers both apply it).
    Use with ``timm.optim.create_optimizer_v2(model, ..., param_group_fn=functools.partial(param_groups, ...))``.
    """
    structure = layer_structure(model, model_name)
    n = num_layers(structure)
    groups: dict[tuple[int, bool], dict] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        layer, decayed = spark_layer_id(name, structure), decays(name, param)
        group = groups.setdefault((layer, decayed), {"params": [], "weight_decay": weight_decay if decayed else 0.0,
                                                     "lr_scale": lr_scale(layer, n, layer_decay)})
        group["params"].append(param)
    return list(groups.values())
