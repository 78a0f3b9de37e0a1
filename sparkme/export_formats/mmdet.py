"""``format=mmdet``: the ConvNeXt file that SparK's ``downstream_mmdet`` (and ConvNeXt's MMSegmentation code) loads
with ``model.pretrained=PATH``: the official facebookresearch layout (``downsample_layers.*``, ``stages.i.j.*``,
as ``format=spark`` writes for ConvNeXt) under ``"state_dict"``, the first entry their
``mmcv_custom.load_checkpoint`` looks for.

The backbone definition adds four output norms (``norm0`` .. ``norm3``): a channels-first LayerNorm (eps 1e-6) on
the output of stage i, the map it returns at stride ``4 * 2**i``. SparK's pretraining has a LayerNorm at that very
place: its densify norm of the level fed by stage i (channels-first, eps 1e-6, over the same channels), applied
to the stage's output before the mask token fills the hidden sites. When the source holds those norms (a sparkme
pretraining checkpoint, a SparK ``*_withdecoder_*spark_style`` file), ``norm{i}`` takes them; from an encoder-only
file they stay at the detector's initialisation (weight 1, bias 0), as with SparK's own released files.
"""

from __future__ import annotations

import torch
from torch import nn

from sparkme.errors import UsageError
from sparkme.export_formats.base import ExportFormat
from sparkme.models.families import find_family
from sparkme.models.spark_layouts import convnext_timm_to_official

WRAPPER_KEY = "state_dict"
# SparK's ConvNeXt LayerNorms (densify and the detection backbone's output norms alike) use this eps.
CONVNEXT_LN_EPS = 1e-6


def check_convnext(model_name: str) -> None:
    """Refuse a backbone other than ConvNeXt V1, the one SparK's MMDetection backbone defines.

    Raises:
        UsageError: naming the model and what to use instead.
    """
    family = find_family(model_name)
    if family is None or family.spark_layout != "convnext":
        raise UsageError(f"format=mmdet writes SparK's MMDetection ConvNeXt backbone (convnext_*), not "
                         f"{model_name!r}; for ResNets use format=detectron2, for any model format=timm")


def mmdet_checkpoint(state: dict[str, torch.Tensor],
                     output_norms: dict[str, torch.Tensor] | None = None) -> dict[str, dict[str, torch.Tensor]]:
    """A timm ConvNeXt encoder state dict (and optionally ``norm{i}.weight/bias`` tensors) ->
    ``{"state_dict": <official ConvNeXt keys, no head, then the output norms>}``."""
    return {WRAPPER_KEY: {**convnext_timm_to_official(state), **(output_norms or {})}}


def densify_norms_pretrained(model) -> bool:
    """Whether the model's densify norms hold pretrained values: always after a strict load of a pretraining
    checkpoint; after ``load_weights`` (``model.weights_report``) when none of them was kept at initialisation."""
    report = getattr(model, "weights_report", None)
    return report is None or not any(".norm." in key and key.startswith("densify.") for key in report.kept)


def output_norms_from_densify(model) -> dict[str, torch.Tensor]:
    """``norm{i}.weight`` / ``norm{i}.bias`` ``(C_i,)`` of the detection backbone from the densify norm of stage i.

    ``model.densify`` runs deepest first (index 0 takes stage 3's stride-32 map, as SparK's ``densify_norms``), so
    stage i's norm is ``densify[len - 1 - i]``; the stage's module name and channel count are checked against the
    encoder's feature levels.
    """
    levels = model.encoder.feature_info  # stage 0 (stride 4) first
    norms = {}
    for i, level in enumerate(levels):
        norm = model.densify[len(levels) - 1 - i].norm
        if not (isinstance(norm, nn.LayerNorm) and norm.eps == CONVNEXT_LN_EPS
                and norm.normalized_shape == (level["num_chs"],) and level["module"] == f"stages.{i}"):
            raise ValueError(f"densify norm of stage {i} is {norm!r}, not the LayerNorm({level['num_chs']}, "
                             f"eps={CONVNEXT_LN_EPS}) on {level['module']!r} that norm{i} needs")
        norms[f"norm{i}.weight"] = norm.weight.detach().clone()
        norms[f"norm{i}.bias"] = norm.bias.detach().clone()
    return norms


def make(model, model_name: str, image_size: int) -> dict:
    """The file's contents from a pretrained ``SparK``: its dense encoder, and ``norm0`` .. ``norm3`` from its
    densify norms when they are pretrained."""
    check_convnext(model_name)
    state = model.encoder.to_dense().state_dict()
    if densify_norms_pretrained(model):
        return mmdet_checkpoint(state, output_norms_from_densify(model))
    print("format=mmdet: the source holds the encoder only (no densify norms): the backbone's norm0-norm3 stay "
          "at their initialisation")
    return mmdet_checkpoint(state)


FORMAT = ExportFormat("mmdet", make, check=check_convnext)
