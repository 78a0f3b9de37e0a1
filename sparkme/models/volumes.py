"""3-D encoders by name: nnU-Net's residual encoder (dynamic-network-architectures, as nnssl configures ResEnc-L)
and MONAI's 3-D ResNets, with the feature levels SparK's decoder reads and the norm its densify step uses.

Each entry names the dense module the sparse encoder is converted from and exported back to:

- ``resenc_*``: ``ResidualEncoderUNet(...).encoder`` (a ``ResidualEncoder``); an nnU-Net network holds its keys
  under ``encoder.`` (see ``resenc_unet``).
- ``monai_resnet*``: ``monai.networks.nets.ResNet`` with a stride-2 7x7x7 stem (MONAI's default stem has stride 1,
  which would leave the deepest stage at stride 16 of a 32-voxel patch grid).
- ``monai_segresnet``: ``monai.networks.nets.SegResNet`` (GroupNorm(8), pre-activation blocks, init_filters 16,
  blocks 1, 2, 2, 4: total stride 8); the encoder is its ``convInit`` and ``down_layers``, the decoder is exported
  untouched.

The heavy libraries are imported when a model is built: ``pip install sparkme[volumes]``.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from torch import nn

from sparkme.errors import UsageError


@dataclass(frozen=True)
class ResEncConfig:
    """A ``ResidualEncoderUNet`` configuration (kernel 3 everywhere, ``BasicBlockD``, conv bias on,
    ``InstanceNorm3d(eps=1e-5, affine=True)``, ``LeakyReLU(inplace=True)``), as nnssl builds ResEnc-L."""

    features: tuple[int, ...]
    strides: tuple[int, ...]
    blocks: tuple[int, ...]
    decoder_convs: tuple[int, ...] = field(default=())

    @property
    def stage_strides(self) -> list[int]:
        """Total stride after each stage."""
        totals, total = [], 1
        for stride in self.strides:
            total *= stride
            totals.append(total)
        return totals


@dataclass(frozen=True)
class VolumeModel:
    """One registered 3-D encoder.

    Attributes:
        library: ``dynamic_network_architectures`` or ``monai`` (the import a missing extra is reported by).
        densify_norm: the norm SparK's densify step applies to this encoder's features: ``in`` (sparse instance
            norm, the encoder's own kind, as nnssl) or ``bn`` (sparse BatchNorm, SparK's for BN ResNets).
        resenc: the ResEnc configuration, or None for MONAI's ResNets.
        monai_depth: 10, 18 or 50 for ``monai.networks.nets.resnet<depth>``.
        segresnet_blocks: the ``blocks_down`` of a MONAI ``SegResNet``, or None.
    """

    library: str
    densify_norm: str
    resenc: ResEncConfig | None = None
    monai_depth: int | None = None
    segresnet_blocks: tuple[int, ...] | None = None


RESENC_L = ResEncConfig(features=(32, 64, 128, 256, 320, 320), strides=(1, 2, 2, 2, 2, 2), blocks=(1, 3, 4, 6, 6, 6),
                        decoder_convs=(1, 1, 1, 1, 1))
# Small enough for tests on 32^3 volumes: total stride 16, one block per stage.
RESENC_TINY = ResEncConfig(features=(8, 16, 32, 64, 64), strides=(1, 2, 2, 2, 2), blocks=(1, 1, 1, 1, 1),
                           decoder_convs=(1, 1, 1, 1))

VOLUME_MODELS: Mapping[str, VolumeModel] = MappingProxyType({
    "resenc_l": VolumeModel("dynamic_network_architectures", "in", resenc=RESENC_L),
    "resenc_tiny": VolumeModel("dynamic_network_architectures", "in", resenc=RESENC_TINY),
    "monai_resnet10": VolumeModel("monai", "bn", monai_depth=10),
    "monai_resnet18": VolumeModel("monai", "bn", monai_depth=18),
    "monai_resnet50": VolumeModel("monai", "bn", monai_depth=50),
    "monai_segresnet": VolumeModel("monai", "in", segresnet_blocks=(1, 2, 2, 4)),
})
SEGRESNET_WIDTH = 16  # SegResNet's init_filters: stage i has 16 * 2**i channels

# LAMB/AdamW betas of 3-D pretraining: SparK's for its BN ResNets (beta2 0.95); ResEnc and MONAI's ResNets are the
# same kind of plain conv net.
PRETRAIN_BETAS = (0.9, 0.95)

NUM_LEVELS = 4  # SparK's decoder reads the deepest four stages, as in 2-D (strides 4..32 of a 32 patch)


def is_volume_model(name: str) -> bool:
    return name in VOLUME_MODELS


def volume_model(name: str) -> VolumeModel:
    """The table entry of ``name``; a UsageError listing the names otherwise."""
    if name not in VOLUME_MODELS:
        raise UsageError(f"unknown 3-D model {name!r}; choose one of {', '.join(VOLUME_MODELS)}")
    entry = VOLUME_MODELS[name]
    try:
        importlib.import_module(entry.library)
    except ImportError as error:
        raise UsageError(f"3-D model {name!r} needs {entry.library}: pip install 'sparkme[volumes]' ({error})") \
            from error
    return entry


def volume_patch_size(name: str) -> int:
    """The mask-cell side of model ``name``: its total stride (32 for ResEnc-L and the MONAI ResNets)."""
    entry = volume_model(name)
    if entry.segresnet_blocks is not None:
        return 2 ** (len(entry.segresnet_blocks) - 1)
    return entry.resenc.stage_strides[-1] if entry.resenc is not None else 32


def _resenc_unet_kwargs(config: ResEncConfig, in_chans: int) -> dict:
    from torch.nn import InstanceNorm3d, LeakyReLU
    return dict(input_channels=in_chans, n_stages=len(config.features), features_per_stage=list(config.features),
                conv_op=nn.Conv3d, kernel_sizes=3, strides=list(config.strides),
                n_blocks_per_stage=list(config.blocks), conv_bias=True, norm_op=InstanceNorm3d,
                norm_op_kwargs={"eps": 1e-5, "affine": True}, nonlin=LeakyReLU, nonlin_kwargs={"inplace": True})


def resenc_unet(name: str, in_chans: int = 1, num_classes: int = 2) -> nn.Module:
    """The whole nnU-Net ``ResidualEncoderUNet`` whose ``.encoder`` is ``create_volume_backbone(name)``'s class and
    keys (for exporting to nnU-Net and checking that the keys load)."""
    config = volume_model(name).resenc
    if config is None:
        raise UsageError(f"{name!r} is not a residual-encoder model")
    from dynamic_network_architectures.architectures.unet import ResidualEncoderUNet
    return ResidualEncoderUNet(**_resenc_unet_kwargs(config, in_chans), num_classes=num_classes,
                               n_conv_per_stage_decoder=list(config.decoder_convs))


def create_volume_backbone(name: str, in_chans: int = 1) -> nn.Module:
    """A randomly initialised dense 3-D encoder (nothing is downloaded)."""
    entry = volume_model(name)
    if in_chans < 1:
        raise UsageError(f"in_chans must be >= 1 (input channels of the volumes), got {in_chans}")
    if entry.resenc is not None:
        from dynamic_network_architectures.building_blocks.residual_encoders import ResidualEncoder
        kwargs = _resenc_unet_kwargs(entry.resenc, in_chans)
        return ResidualEncoder(**kwargs, return_skips=True, disable_default_stem=False)
    from monai.networks import nets
    if entry.segresnet_blocks is not None:
        return nets.SegResNet(spatial_dims=3, init_filters=SEGRESNET_WIDTH, in_channels=in_chans, out_channels=2,
                              blocks_down=entry.segresnet_blocks)
    return getattr(nets, f"resnet{entry.monai_depth}")(spatial_dims=3, n_input_channels=in_chans, conv1_t_stride=2)


def volume_feature_levels(name: str, model: nn.Module) -> list[dict]:
    """``[dict(module=..., reduction=s, num_chs=C)]`` of the deepest ``NUM_LEVELS`` stages, shallowest first."""
    entry = volume_model(name)
    if entry.resenc is not None:
        config = entry.resenc
        levels = [dict(module=f"stages.{i}", reduction=stride, num_chs=width)
                  for i, (stride, width) in enumerate(zip(config.stage_strides, config.features))]
    elif entry.segresnet_blocks is not None:
        levels = [dict(module=f"down_layers.{i}", reduction=2**i, num_chs=SEGRESNET_WIDTH * 2**i)
                  for i in range(len(entry.segresnet_blocks))]
    else:
        levels = []
        for i, stride in enumerate((4, 8, 16, 32), start=1):
            layer = getattr(model, f"layer{i}")
            width = [m for m in layer.modules() if isinstance(m, nn.Conv3d)][-1].out_channels
            levels.append(dict(module=f"layer{i}", reduction=stride, num_chs=width))
    return levels[-NUM_LEVELS:]
