"""Fine-tuning presets per model: SparK's own table, and the recipes sparkme chose for the other families.

SparK's table is ``downstream_imagenet/arg.py`` ``HP_DEFAULT_VALUES`` (batch, epochs, warm-up epochs, optimizer,
base lr, layer decay, weight decay, mixup alpha, repeated augmentation, drop path, EMA) plus what
``downstream_imagenet/util.py`` hard-codes for every model (CutMix alpha 1.0, switch probability 0.5, label
smoothing 0.1 inside the mixup, BCE loss exactly when the optimizer is LAMB). This module is the one home of these
facts; everything else in ``sparkme.finetune`` reads them from a ``FinetuneRecipe``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from types import MappingProxyType

from sparkme.errors import UsageError

# The families sparkme pretrains (``sparkme.models.backbones.SUPPORTED_PREFIXES``), grouped by recipe below.
_RESNET_PREFIXES = ("resnet", "wide_resnet", "resnext", "seresnext", "ecaresnet")
_BN_CONVNET_PREFIXES = ("regnet", "efficientnet_", "mobilenetv3_", "densenet", "cspresnet")
_CONVNEXT_PREFIXES = ("convnext_", "convnextv2_")


@dataclass(frozen=True)
class FinetuneRecipe:
    """The hyper-parameters of one fine-tune (SparK's names in brackets).

    Attributes:
        global_batch: images per optimizer step over all processes [bs].
        epochs: training epochs [ep].
        warmup_epochs: epochs of linear lr warm-up [wp_ep].
        optimizer: ``"lamb"`` or ``"adamw"`` [opt; SparK's ``adam`` is AdamW].
        base_lr: lr per 256 images; the peak lr is ``base_lr * global_batch / 256`` [base_lr].
        layer_decay: layer-wise lr decay factor, in (0, 1) to be active [lr_scale].
        weight_decay: constant weight decay of the decayed parameters [wd].
        mixup: mixup alpha; 0 turns mixing (mixup and CutMix) off, labels are still smoothed [mixup].
        repeated_aug: times each image is repeated per epoch (``timm`` ``RepeatAugSampler``); 1 means none
            [rep_aug, where SparK writes 0 for none].
        drop_path: stochastic depth rate of the fine-tuned model [drop_path].
        loss: ``"bce"`` (timm ``BinaryCrossEntropy``) or ``"soft_ce"`` (timm ``SoftTargetCrossEntropy``).
        betas, eps: the optimizer's moments and epsilon (SparK leaves timm's defaults: LAMB 1e-6, AdamW 1e-8).
        ema_decay: decay of the weight EMA evaluated beside the model [ema].
        cutmix: CutMix alpha (SparK: 1.0 for every model).
        mix_switch_prob: probability of CutMix instead of mixup for a batch (SparK: 0.5).
        label_smoothing: smoothing applied to the mixed targets (SparK: 0.1).
        image_size: training and evaluation resolution [img_size].
        origin: ``"spark"`` for SparK's own presets, ``"sparkme"`` for the recipes chosen here.
    """

    global_batch: int
    epochs: int
    warmup_epochs: int
    optimizer: str
    base_lr: float
    layer_decay: float
    weight_decay: float
    mixup: float
    repeated_aug: int
    drop_path: float
    loss: str
    betas: tuple[float, float]
    eps: float
    ema_decay: float = 0.9999
    cutmix: float = 1.0
    mix_switch_prob: float = 0.5
    label_smoothing: float = 0.1
    image_size: int = 224
    origin: str = "spark"

    def peak_lr(self, global_batch: int | None = None) -> float:
        """SparK's linear scaling rule: ``base_lr * global_batch / 256`` (the recipe's batch unless given)."""
        return self.base_lr * (self.global_batch if global_batch is None else global_batch) / 256


def _lamb(batch, epochs, warmup, base_lr, layer_decay, wd, mixup, drop_path, **more) -> FinetuneRecipe:
    """SparK's ResNet recipe shape: LAMB (timm default betas, eps 1e-6) with binary cross-entropy."""
    return FinetuneRecipe(batch, epochs, warmup, "lamb", base_lr, layer_decay, wd, mixup, 1, drop_path,
                          loss="bce", betas=(0.9, 0.999), eps=1e-6, **more)


def _adamw(batch, epochs, warmup, base_lr, layer_decay, wd, mixup, rep_aug, drop_path, **more) -> FinetuneRecipe:
    """SparK's ConvNeXt recipe shape: AdamW (torch defaults betas, eps 1e-8) with soft-target cross-entropy."""
    return FinetuneRecipe(batch, epochs, warmup, "adamw", base_lr, layer_decay, wd, mixup, rep_aug, drop_path,
                          loss="soft_ce", betas=(0.9, 0.999), eps=1e-8, **more)


# SparK downstream_imagenet/arg.py HP_DEFAULT_VALUES, value for value (rep_aug 0 -> 1).
SPARK_RECIPES = MappingProxyType({
    "resnet50": _lamb(2048, 300, 5, 2e-3, 0.7, 0.02, 0.1, 0.05),
    "resnet101": _lamb(2048, 300, 5, 1e-3, 0.8, 0.02, 0.1, 0.2),
    "resnet152": _lamb(2048, 300, 5, 1e-3, 0.8, 0.02, 0.1, 0.2),
    "resnet200": _lamb(2048, 300, 5, 1e-3, 0.8, 0.02, 0.1, 0.2),
    "convnext_small": _adamw(4096, 400, 20, 2e-4, 0.7, 0.01, 0.8, 3, 0.3),
    "convnext_base": _adamw(4096, 400, 20, 1e-4, 0.7, 0.01, 0.8, 3, 0.4),
    "convnext_large": _adamw(4096, 200, 10, 1e-4, 0.7, 0.02, 0.8, 3, 0.5),
})
# SparK switches to this row for convnext_large at img_size 384 (arg.py get_args); its EMA decay is 0.99995.
SPARK_CONVNEXT_LARGE_384 = _adamw(1024, 200, 20, 6e-5, 0.7, 0.01, 0.8, 3, 0.5, ema_decay=0.99995, image_size=384)

# ConvNeXt sizes SparK has no row for, mapped to the SparK row whose recipe they take and the drop path they use.
# Smaller models take ConvNeXt-S's recipe with less stochastic depth (ConvNeXt's own fine-tunes: tiny 0.1-0.2,
# atto-nano about 0.1); larger ones take ConvNeXt-L's. ConvNeXt V2 (GRN, no layer scale) follows its V1 size.
_CONVNEXT_SIZES = MappingProxyType({
    "zepto": ("convnext_small", 0.1), "atto": ("convnext_small", 0.1), "femto": ("convnext_small", 0.1),
    "pico": ("convnext_small", 0.1), "nano": ("convnext_small", 0.1), "tiny": ("convnext_small", 0.2),
    "small": ("convnext_small", 0.3), "base": ("convnext_base", 0.4), "large": ("convnext_large", 0.5),
    "xlarge": ("convnext_large", 0.5), "xxlarge": ("convnext_large", 0.5), "huge": ("convnext_large", 0.5),
})
# Drop path for the BatchNorm families that take the ResNet-50 recipe (see recipe_for). DenseNet has no stochastic
# depth in timm; MobileNetV3 is small enough to need none; EfficientNet's own training uses 0.2, halved here as
# the encoder arrives pretrained.
_BN_CONVNET_DROP_PATH = MappingProxyType({
    "regnet": 0.05, "efficientnet_": 0.1, "mobilenetv3_": 0.0, "densenet": 0.0, "cspresnet": 0.05,
})


def _resnet_depth(model_name: str) -> int | None:
    """The depth in a ResNet-class name: its largest number (``resnext101_32x8d`` 101, ``resnetv2_50`` 50)."""
    numbers = [int(n) for n in re.findall(r"\d+", model_name)]
    return max(numbers) if numbers else None


def recipe_for(model_name: str, image_size: int = 224) -> FinetuneRecipe:
    """The fine-tuning preset of ``model_name`` at ``image_size``.

    SparK's own rows (``SPARK_RECIPES``) for resnet50/101/152/200 and convnext_small/base/large (and its 384 px row
    for convnext_large at 384). The other families sparkme pretrains take the SparK row nearest to them
    (``origin="sparkme"``):

    - ResNet-class timm models (ResNet-D, ResNeXt, SE-ResNeXt, ECA-ResNet, Wide ResNet): depth <= 50 take
      ResNet-50's row (resnet18/26/34 without drop path: too shallow to need stochastic depth), deeper ones take
      ResNet-101's. They are the same timm ``ResNet`` class SparK's recipe was tuned on.
    - Other ConvNeXt / ConvNeXt V2 sizes: see ``_CONVNEXT_SIZES``.
    - RegNet, EfficientNet, MobileNetV3, DenseNet, CSPResNet: BatchNorm ConvNets like ResNet, so ResNet-50's row
      (LAMB + BCE is the "ResNet strikes back" procedure timm trains these families with), with their own drop path.

    Raises:
        UsageError: a model outside the families sparkme supports.
    """
    if model_name == "convnext_large" and image_size == 384:
        return SPARK_CONVNEXT_LARGE_384
    if model_name in SPARK_RECIPES:
        return replace(SPARK_RECIPES[model_name], image_size=image_size)
    if model_name.startswith(_CONVNEXT_PREFIXES):
        size = model_name.split("_")[1]
        if size in _CONVNEXT_SIZES:
            row, drop_path = _CONVNEXT_SIZES[size]
            return replace(SPARK_RECIPES[row], drop_path=drop_path, image_size=image_size, origin="sparkme")
    elif model_name.startswith(_RESNET_PREFIXES):
        depth = _resnet_depth(model_name)
        if depth is not None:
            row = "resnet50" if depth <= 50 else "resnet101"
            drop_path = 0.0 if depth < 50 else SPARK_RECIPES[row].drop_path
            return replace(SPARK_RECIPES[row], drop_path=drop_path, image_size=image_size, origin="sparkme")
    elif model_name.startswith(_BN_CONVNET_PREFIXES):
        prefix = next(p for p in _BN_CONVNET_PREFIXES if model_name.startswith(p))
        return replace(SPARK_RECIPES["resnet50"], drop_path=_BN_CONVNET_DROP_PATH[prefix], image_size=image_size,
                       origin="sparkme")
    raise UsageError(f"no fine-tuning recipe for model {model_name!r}: sparkme fine-tunes ResNets "
                     f"({', '.join(_RESNET_PREFIXES)}), ConvNeXt ({', '.join(_CONVNEXT_PREFIXES)}, sizes "
                     f"{', '.join(_CONVNEXT_SIZES)}) and {', '.join(p.rstrip('_') for p in _BN_CONVNET_PREFIXES)}")
