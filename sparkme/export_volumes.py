"""Exports of pretrained 3D encoders for the segmentation frameworks that train on them.

``format=nnunet`` (``resenc_*``): an nnU-Net v2 checkpoint, ``{"network_weights": state dict}``, of the whole
``ResidualEncoderUNet`` that nnU-Net's residual-encoder plans build with the same encoder (features, strides, blocks,
``n_conv_per_stage_decoder`` 1 per stage). nnU-Net's ``load_pretrained_weights`` (behind ``nnUNetv2_train ...
-pretrained_weights FILE``) requires every key of its network except the segmentation heads: the encoder's keys
(``encoder.*``, and ``decoder.encoder.*``, the same tensors) carry the pretrained weights; the nnU-Net decoder's own
stages, transposed convolutions and heads (``decoder.stages.*``, ``decoder.transpconvs.*``, ``decoder.seg_layers.*``)
are new, freshly initialised with a fixed seed: SparK's light decoder is a different network and is not carried.

``format=monai`` (``monai_*``): for ``monai_resnet*`` the encoder's state dict without the classifier (``fc``), which
loads ``strict=True`` into ``monai.networks.nets.resnet<depth>(spatial_dims=3, n_input_channels=C,
feed_forward=False)`` (pretraining used ``conv1_t_stride=2``; pass it too to keep the same feature strides: the
weights are the same); for ``monai_segresnet`` the whole ``SegResNet`` (its decoder untouched by pretraining).
"""

from __future__ import annotations

import torch
from torch import nn

from sparkme.errors import UsageError
from sparkme.export_formats.base import ExportFormat
from sparkme.models.volumes import VOLUME_MODELS, create_volume_backbone, resenc_unet, volume_model

VOLUME_FORMATS = ("nnunet", "monai")
DECODER_SEED = 0  # the nnU-Net decoder's fresh weights: the same file for the same encoder


def default_volume_formats(model_name: str) -> list[str]:
    """What a run of ``model_name`` exports when ``data.export_formats`` is null: the format of its framework."""
    return ["monai"] if volume_model(model_name).library == "monai" else ["nnunet"]


def export_formats_of(cfg) -> list[str]:
    """The formats a pretraining run writes at its end: ``export_formats`` for images; for volumes
    ``data.export_formats``, where null means the model's framework (``default_volume_formats``)."""
    if cfg.data.get("spatial_dims") != 3:
        return list(cfg.export_formats)
    return list(cfg.data.get("export_formats") or default_volume_formats(cfg.model.model_name))


def _input_channels(dense: nn.Module) -> int:
    first_conv = next(m for m in dense.modules() if isinstance(m, nn.Conv3d))
    return int(first_conv.in_channels)


def nnunet_checkpoint(dense: nn.Module, model_name: str) -> dict:
    """``{"network_weights": ...}`` of the nnU-Net ``ResidualEncoderUNet`` holding ``dense`` (a ``ResidualEncoder``)
    as its encoder; the encoder load is strict."""
    if volume_model(model_name).resenc is None:
        raise UsageError(f"format=nnunet is nnU-Net's residual-encoder network (resenc_* models); use format=monai "
                         f"for {model_name!r}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(DECODER_SEED)
        network = resenc_unet(model_name, in_chans=_input_channels(dense), num_classes=2)
    network.encoder.load_state_dict(dense.state_dict(), strict=True)
    return {"network_weights": network.state_dict(), "trainer_name": "sparkme SparK pretraining",
            "init_args": {"architecture": model_name}}


def monai_state(dense: nn.Module, model_name: str) -> dict[str, torch.Tensor]:
    """The MONAI network's state dict, checked by a strict load into MONAI's own model: a ResNet without ``fc``;
    another MONAI network (SegResNet) whole, into a fresh one of the same configuration."""
    entry = volume_model(model_name)
    if entry.library != "monai":
        raise UsageError(f"format=monai is for MONAI's networks (monai_* models); use format=nnunet for "
                         f"{model_name!r}")
    depth = entry.monai_depth
    if depth is None:
        state = dense.state_dict()
        with torch.device("meta"):
            create_volume_backbone(model_name, _input_channels(dense)).load_state_dict(state, strict=True,
                                                                                       assign=True)
        return state
    from monai.networks import nets

    state = {k: v for k, v in dense.state_dict().items() if not k.startswith("fc.")}
    with torch.device("meta"):
        target = getattr(nets, f"resnet{depth}")(spatial_dims=3, n_input_channels=_input_channels(dense),
                                                 feed_forward=False)
    target.load_state_dict(state, strict=True, assign=True)
    return state


def export_volume_state(encoder, model_name: str, fmt: str) -> dict:
    """The export of a 3D ``encoder`` (a ``SparseEncoder``) in ``fmt`` (``nnunet`` or ``monai``).

    Raises:
        UsageError: an unknown format, or one the backbone cannot take.
    """
    if fmt not in VOLUME_FORMATS:
        raise UsageError(f"format={fmt!r} is a 2D format; 3D models export as {' or '.join(VOLUME_FORMATS)}")
    dense = encoder.to_dense()
    return nnunet_checkpoint(dense, model_name) if fmt == "nnunet" else monai_state(dense, model_name)


def _check_family(fmt: str, wanted: str):
    """The ``sparkme-export`` check of ``fmt``: refuse, before the model is rebuilt, a backbone of another framework
    (``wanted``: ``resenc`` or ``monai``)."""
    names = [n for n, entry in VOLUME_MODELS.items()
             if (entry.resenc is not None if wanted == "resenc" else entry.library == "monai")]

    def check(model_name: str) -> None:
        if model_name not in names:
            raise UsageError(f"format={fmt} takes {', '.join(names)}, not {model_name!r}")
    return check


NNUNET_FORMAT = ExportFormat("nnunet", lambda model, name, _: export_volume_state(model.encoder, name, "nnunet"),
                             _check_family("nnunet", "resenc"))
MONAI_FORMAT = ExportFormat("monai", lambda model, name, _: export_volume_state(model.encoder, name, "monai"),
                            _check_family("monai", "monai"))
