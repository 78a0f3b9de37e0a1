"""Key layouts of the official SparK checkpoints (keyu-tian/SparK) and their mapping onto sparkme's modules.

SparK publishes two kinds of files:

- **encoder only** — ResNets in timm's key layout (``resnet50_1kpretrained_timm_style.pth``: ``conv1.weight``,
  ``layer1.0.bn1.running_mean``, ...; the same names as sparkme's encoder), ConvNeXt in the facebookresearch layout
  (``convnextS_1kpretrained_official_style.pth``: ``downsample_layers.i.j.*``, ``stages.i.j.dwconv/norm/pwconv1/
  pwconv2/gamma``), which this module renames to timm's ConvNeXt (``stem.*``, ``stages.i.downsample.*``,
  ``stages.i.blocks.j.conv_dw/norm/mlp.fc1/mlp.fc2/gamma``);
- **the whole SparK module** (``res50_withdecoder_1kpretrained_spark_style.pth``, ``cnxS224_withdecoder_...``):
  ``sparse_encoder.sp_cnn.<encoder key>``, ``densify_norms.i.*``, ``densify_projs.i.*``, ``mask_tokens.i``
  ``(1, C, 1, 1)``, ``dense_decoder.dec.i.up_sample/conv.*``, ``dense_decoder.proj.*``, three unused buffers
  (``imn_m``, ``imn_s``, ``norm_black``), optionally a ``config`` dict, usually wrapped as ``{'module': ...,
  'epoch': ..., 'optimizer': ..., 'args': ...}``.

Index ``i`` of densify / mask token / decoder block counts from the stride-32 map up in both projects, so only
names change. Every function here is pure: it renames keys (and reshapes mask tokens) and never touches a model.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import torch

from sparkme.errors import UsageError
from sparkme.models.families import head_prefixes

SPARK_ENCODER_PREFIX = "sparse_encoder.sp_cnn."
# Registered by SparK's module but "deprecated and never used" (its own comment): nothing to load them into.
SPARK_UNUSED_BUFFERS = ("imn_m", "imn_s", "norm_black")
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)

# (timm name, facebookresearch name) prefixes; {s} stage, {b} block, {l} position in a Sequential. The stem comes
# first so that the official ``downsample_layers.0`` is never read as a stage-0 down-sampling layer.
CONVNEXT_RENAMES = (
    ("stem.{l}.", "downsample_layers.0.{l}."),
    ("stages.{s}.downsample.{l}.", "downsample_layers.{s}.{l}."),
    ("stages.{s}.blocks.{b}.conv_dw.", "stages.{s}.{b}.dwconv."),
    ("stages.{s}.blocks.{b}.norm.", "stages.{s}.{b}.norm."),
    ("stages.{s}.blocks.{b}.mlp.fc1.", "stages.{s}.{b}.pwconv1."),
    ("stages.{s}.blocks.{b}.mlp.fc2.", "stages.{s}.{b}.pwconv2."),
    ("stages.{s}.blocks.{b}.gamma", "stages.{s}.{b}.gamma"),
)
# The classifier of a full facebookresearch / timm model: not part of a pretrained encoder (timm's: the family table).
CONVNEXT_HEAD = {"official": ("norm.", "head."), "timm": head_prefixes("convnext")}
RESNET_HEAD = head_prefixes("resnet")

# (sparkme name, SparK name) prefixes of the parts around the encoder; {i} counts from the stride-32 map.
SPARK_MODULE_RENAMES = (
    ("densify.{i}.norm.", "densify_norms.{i}."),
    ("densify.{i}.proj.", "densify_projs.{i}."),
    ("densify.{i}.mask_token", "mask_tokens.{i}"),
    ("decoder.blocks.{i}.up.", "dense_decoder.dec.{i}.up_sample."),
    ("decoder.blocks.{i}.conv.", "dense_decoder.dec.{i}.conv."),
    ("decoder.proj.", "dense_decoder.proj."),
)


def _pattern(template: str) -> re.Pattern:
    return re.compile("^" + re.sub(r"\\\{(\w)\\\}", r"(?P<\1>\\d+)", re.escape(template)))


def rename(key: str, table: Iterable[tuple[str, str]], to_second: bool = True) -> str | None:
    """Rename ``key`` by the first rule of ``table`` whose source template is a prefix of it (``to_second``:
    from the first column to the second); None when no rule applies."""
    for first, second in table:
        source, target = (first, second) if to_second else (second, first)
        match = _pattern(source).match(key)
        if match:
            return target.format(**match.groupdict()) + key[match.end():]
    return None


def backbone_family(keys: Iterable[str]) -> str | None:
    """``"convnext"`` (timm ConvNeXt keys), ``"resnet"`` (timm / torchvision ResNet keys) or None, from the keys
    of a dense backbone or sparkme encoder state dict: the two families SparK releases weights for."""
    keys = list(keys)
    if any(re.match(r"stages\.\d+\.blocks\.\d+\.conv_dw\.", k) for k in keys):
        return "convnext"
    if "conv1.weight" in keys and any(k.startswith("layer4.") for k in keys):
        return "resnet"
    return None


def is_convnext_v2(state: dict[str, torch.Tensor]) -> bool:
    """ConvNeXt V2 carries GRN parameters; SparK's layouts describe V1 only."""
    return any(".grn." in k for k in state)


def convnext_timm_to_official(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """timm ConvNeXt (V1) encoder keys -> facebookresearch keys; the classifier head is left out, as in SparK's
    ``convnext*_1kpretrained_official_style.pth``.

    Raises:
        UsageError: a ConvNeXt V2 state dict, or a key no rule covers.
    """
    if is_convnext_v2(state):
        raise UsageError("SparK's ConvNeXt layout is ConvNeXt V1's; a ConvNeXt V2 model has GRN layers it cannot "
                         "hold: export convnextv2_* with format=timm")
    out = {}
    for key, value in state.items():
        if key.startswith(CONVNEXT_HEAD["timm"]):
            continue
        new = rename(key, CONVNEXT_RENAMES, to_second=True)
        if new is None:
            raise UsageError(f"timm ConvNeXt key {key!r} has no counterpart in the official ConvNeXt layout")
        # timm's smallest ConvNeXts (conv_mlp: atto ... nano) hold the MLP as 1x1 convs; the official one as Linear.
        out[new] = value.flatten(1) if new.endswith(("pwconv1.weight", "pwconv2.weight")) else value
    return out


def fit_pointwise_convs(state: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Linear weights ``(C_out, C_in)`` become ``(C_out, C_in, 1, 1)`` where the model holds a 1x1 conv instead
    (timm's ConvNeXt with ``conv_mlp``); every other tensor is returned as it is."""
    return {k: v.reshape(expected[k].shape) if k in expected and v.dim() == 2
            and tuple(expected[k].shape) == (*v.shape, 1, 1) else v for k, v in state.items()}


def convnext_official_to_timm(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """facebookresearch ConvNeXt keys -> timm encoder keys.

    Returns:
        ``(renamed, ignored)``: ``ignored`` maps each classifier key (``norm.*``, ``head.*``) to why it was left.

    Raises:
        UsageError: naming the keys no rule covers.
    """
    out, ignored, unknown = {}, {}, []
    for key, value in state.items():
        if key.startswith(CONVNEXT_HEAD["official"]):
            ignored[key] = "classifier head, not part of the pretrained encoder"
            continue
        new = rename(key, CONVNEXT_RENAMES, to_second=False)
        if new is None:
            unknown.append(key)
        else:
            out[new] = value
    if unknown:
        raise UsageError(f"{len(unknown)} key(s) of the official ConvNeXt layout are unknown: {unknown[:4]}; "
                         "expected downsample_layers.*, stages.i.j.{dwconv,norm,pwconv1,pwconv2,gamma}, norm.*, head.*")
    return out, ignored


def encoder_from_official(state: dict[str, torch.Tensor], family: str | None,
                          official: bool) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Encoder keys of a SparK encoder-only file -> sparkme encoder keys (without the ``encoder.`` prefix).

    Args:
        family: ``backbone_family`` of the model's encoder.
        official: the keys are in the facebookresearch ConvNeXt layout (else timm's, as sparkme's own).
    """
    if official:
        if family != "convnext":
            raise UsageError(f"the file is in the official ConvNeXt layout (downsample_layers.*) but the model is "
                             f"not a ConvNeXt ({family or 'unknown family'}): build a convnext_* model for it")
        return convnext_official_to_timm(state)
    head = head_prefixes(family)
    ignored = {k: "classifier head, not part of the pretrained encoder" for k in state if k.startswith(head)}
    return {k: v for k, v in state.items() if k not in ignored}, ignored


def encoder_to_official(state: dict[str, torch.Tensor], family: str | None) -> dict[str, torch.Tensor]:
    """Dense encoder state dict -> what SparK's downstream code loads: timm keys without ``fc.*`` for ResNets
    (``*_1kpretrained_timm_style.pth``), the facebookresearch layout without the head for ConvNeXt
    (``*_1kpretrained_official_style.pth``)."""
    if family == "convnext":
        return convnext_timm_to_official(state)
    return {k: v for k, v in state.items() if not k.startswith(RESNET_HEAD)}


def spark_to_sparkme(state: dict[str, torch.Tensor],
                     family: str | None) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """A whole SparK module's state dict -> sparkme ``SparK`` keys.

    Mask tokens ``(1, C, 1, 1)`` become ``(C,)``; SparK's unused buffers are reported in ``ignored``.

    Raises:
        UsageError: naming the keys that fit neither the encoder nor SparK's densify / decoder layout.
    """
    out, ignored, unknown = {}, {}, []
    encoder_state = {k[len(SPARK_ENCODER_PREFIX):]: v for k, v in state.items() if k.startswith(SPARK_ENCODER_PREFIX)}
    official = family == "convnext" and any(k.startswith("downsample_layers.") for k in encoder_state)
    encoder, encoder_ignored = encoder_from_official(encoder_state, family, official)
    out.update({f"encoder.{k}": v for k, v in encoder.items()})
    ignored.update({SPARK_ENCODER_PREFIX + k: why for k, why in encoder_ignored.items()})
    for key, value in state.items():
        if key.startswith(SPARK_ENCODER_PREFIX):
            continue
        if key in SPARK_UNUSED_BUFFERS:
            ignored[key] = "buffer SparK registers but never uses"
            continue
        new = rename(key, SPARK_MODULE_RENAMES, to_second=False)
        if new is None:
            unknown.append(key)
            continue
        out[new] = value.reshape(-1) if new.endswith(".mask_token") else value
    if unknown:
        raise UsageError(f"{len(unknown)} key(s) of the SparK checkpoint are unknown: {unknown[:4]}; expected "
                         "sparse_encoder.sp_cnn.*, densify_norms.*, densify_projs.*, mask_tokens.*, dense_decoder.*")
    return out, ignored


def sparkme_to_spark(state: dict[str, torch.Tensor], family: str | None,
                     input_size: int | None = None) -> dict[str, torch.Tensor]:
    """sparkme ``SparK`` state dict -> the key layout of SparK's whole module (``*_withdecoder_*_spark_style``).

    Args:
        input_size: when given, SparK's three unused buffers are added (ImageNet mean/std and a zero image of
            that size) so that SparK's own ``load_state_dict(strict=True)`` accepts the result.
    """
    encoder = {k[len("encoder."):]: v for k, v in state.items() if k.startswith("encoder.")}
    out = {SPARK_ENCODER_PREFIX + k: v for k, v in encoder_to_official(encoder, family).items()}
    for key, value in state.items():
        if key.startswith("encoder."):
            continue
        new = rename(key, SPARK_MODULE_RENAMES, to_second=True)
        if new is None:
            raise UsageError(f"sparkme key {key!r} has no counterpart in SparK's module")
        out[new] = value.reshape(1, -1, 1, 1) if key.endswith(".mask_token") else value
    if input_size is not None:
        out["imn_m"] = torch.tensor(IMAGENET_MEAN).reshape(1, 3, 1, 1)
        out["imn_s"] = torch.tensor(IMAGENET_STD).reshape(1, 3, 1, 1)
        out["norm_black"] = torch.zeros(1, 3, input_size, input_size)
    return out
