"""The one home of the facts about a backbone family: what sparkme supports, and SparK's pretraining recipe.

Everything that depends on the family reads this table: ``create_backbone`` / ``build_spark`` (drop path, supported
names), the configs (``conf/model/*.yaml`` leave ``drop_path_rate: null`` and ``conf/optim/*.yaml`` ``betas: null``
to mean "the family's"), the pretraining engine (``optimizer_overrides``), the benchmark (``PRETRAIN_RECIPE`` and
the betas), the encoder's densifying norm and the SparK checkpoint layouts (head prefixes).

Sources: SparK's ``pretrain/utils/arg_util.py`` (LAMB/AdamW betas ``(0.9, ada)`` with ``ada`` 0.95 for ResNet and
0.999 for ConvNeXt; densify norm ``bn`` / ``ln``; base lr 2e-4, weight decay 0.04, clip 5) and
``pretrain/models/__init__.py`` (drop path per model). Families SparK never trained take the values of the SparK
family they normalise like: BatchNorm ConvNets ResNet's, ConvNeXt V2 ConvNeXt's.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

from torch import nn

from sparkme.errors import UsageError
from sparkme.models import volumes

RESNET_BETAS = (0.9, 0.95)
CONVNEXT_BETAS = (0.9, 0.999)


@dataclass(frozen=True)
class Family:
    """One backbone family.

    Attributes:
        name: as in the coverage table (README), e.g. ``"ConvNeXt V2"``.
        prefixes: timm model names of the family start with one of these (empty: its names are another family's,
            e.g. ResNet-D's ``resnet50d``, whose facts are then that family's).
        tested_model: the model every backend is proven exact on (``tests/test_encoders.py``,
            ``tests/test_families.py``).
        betas: LAMB (and AdamW) betas of pretraining.
        densify_norm: SparK's densifying norm: ``"bn"`` (BatchNorm) or ``"ln"`` (LayerNorm, ConvNeXt).
        spark_layout: ``"resnet"`` / ``"convnext"``: SparK releases checkpoints in its layout for this family; None
            when it does not.
        head_prefixes: state-dict prefixes of the timm model's classifier head (and head norm), which a pretrained
            encoder does not carry; only needed where ``spark_layout`` is set.
    """

    name: str
    prefixes: tuple[str, ...]
    tested_model: str
    betas: tuple[float, float] = RESNET_BETAS
    densify_norm: str = "bn"
    spark_layout: str | None = None
    head_prefixes: tuple[str, ...] = ()


@dataclass(frozen=True)
class PretrainRecipe:
    """SparK's pretraining hyper-parameters shared by every family (``conf/optim``, ``conf/sched``,
    ``conf/trainer`` state the same numbers for the command line; ``tests/test_family_table.py`` checks that).

    Attributes:
        base_lr: lr per 256 images of the global batch.
        weight_decay: the weight decay at step 0 (cosine-ramped to ``weight_decay_end``).
        weight_decay_end: the weight decay at the last step.
        clip_grad: global gradient-norm clip.
    """

    base_lr: float = 2e-4
    weight_decay: float = 0.04
    weight_decay_end: float = 0.2
    clip_grad: float = 5.0


PRETRAIN_RECIPE = PretrainRecipe()

FAMILIES = (
    Family("ResNet", ("resnet", "wide_resnet"), "resnet50", spark_layout="resnet", head_prefixes=("fc.",)),
    Family("ResNet-D", (), "resnet50d"),
    Family("ResNeXt", ("resnext",), "resnext50_32x4d"),
    Family("SE-ResNeXt", ("seresnext",), "seresnext50_32x4d"),
    Family("ECA-ResNet", ("ecaresnet",), "ecaresnet50d"),
    Family("RegNetY", ("regnet",), "regnety_016"),
    Family("EfficientNet", ("efficientnet_",), "efficientnet_b0"),
    Family("MobileNetV3", ("mobilenetv3_",), "mobilenetv3_large_100"),
    Family("DenseNet", ("densenet",), "densenet121"),
    Family("CSPResNet", ("cspresnet",), "cspresnet50"),
    Family("ConvNeXt", ("convnext_",), "convnext_atto", CONVNEXT_BETAS, "ln", spark_layout="convnext",
           head_prefixes=("head.", "norm_pre.")),
    Family("ConvNeXt V2", ("convnextv2_",), "convnextv2_atto", CONVNEXT_BETAS, "ln"),
)

# Stochastic-depth rate of pretraining per model. SparK's own (pretrain/models/__init__.py): ResNet-50 ... -200,
# ConvNeXt-S/B/L. sparkme's for the other ConvNeXts continue SparK's progression by size (T .1, S .2, B .3, L .4).
# Any other model: 0.
DROP_PATH = MappingProxyType({
    "resnet50": 0.05, "resnet101": 0.08, "resnet152": 0.10, "resnet200": 0.15,
    "convnext_tiny": 0.1, "convnext_small": 0.2, "convnext_base": 0.3, "convnext_large": 0.4,
    "convnextv2_tiny": 0.1, "convnextv2_base": 0.3,
})

# The coverage table (README): family -> the model every backend is proven exact on.
TESTED_MODELS = MappingProxyType({family.name: family.tested_model for family in FAMILIES})
# Name prefixes of the families above (other timm ConvNets may convert, but are not offered untested).
SUPPORTED_PREFIXES = tuple(prefix for family in FAMILIES for prefix in family.prefixes)


def find_family(model_name: str) -> Family | None:
    """The family of a timm model name (the longest matching prefix wins), None for an unsupported name."""
    matches = [(len(p), f) for f in FAMILIES for p in f.prefixes if model_name.startswith(p)]
    return max(matches, key=lambda match: match[0])[1] if matches else None


def family_of(model_name: str) -> Family:
    """The family of ``model_name``.

    Raises:
        UsageError: the name is of no supported family (the message lists them).
    """
    family = find_family(model_name)
    if family is None:
        raise UsageError(f"unknown model {model_name!r}: sparkme supports ResNets and these families: "
                         + ", ".join(f"{f.name} (e.g. {f.tested_model})" for f in FAMILIES))
    return family


def drop_path_rate(model_name: str, rate: float | None = None) -> float:
    """``rate``, or when None the pretraining drop path of ``model_name`` (``DROP_PATH``; 0 for other models)."""
    return DROP_PATH.get(model_name, 0.0) if rate is None else float(rate)


def pretrain_betas(model_name: str, betas: tuple[float, float] | list[float] | None = None) -> tuple[float, float]:
    """``betas``, or when None the pretraining optimizer's betas of ``model_name``'s family (3-D encoders:
    ``volumes.PRETRAIN_BETAS``)."""
    if betas is not None:
        return float(betas[0]), float(betas[1])
    return volumes.PRETRAIN_BETAS if volumes.is_volume_model(model_name) else family_of(model_name).betas


def optimizer_overrides(model_name: str, optimizer_cfg: Mapping) -> dict:
    """Keyword arguments filling an optimizer config's family defaults: ``betas: null`` -> the family's betas.

    For ``hydra.utils.instantiate(optimizer_cfg, **optimizer_overrides(model_name, optimizer_cfg))``: empty when the
    config sets its own betas or has none (e.g. SGD), so a user's ``optim.optimizer.betas=[...]`` always wins.
    """
    if "betas" in optimizer_cfg and optimizer_cfg["betas"] is None:
        return {"betas": list(pretrain_betas(model_name))}
    return {}


def densify_norm_of(model: nn.Module) -> str:
    """SparK's densifying norm for a dense backbone: its family's (timm records the model name in
    ``pretrained_cfg``; torchvision's ResNets are named by their class); for a model of no family, LayerNorm
    when the model normalises with LayerNorm (as ConvNeXt does), else BatchNorm."""
    name = getattr(model, "pretrained_cfg", {}).get("architecture") or type(model).__name__.lower()
    family = find_family(name)
    if family is not None:
        return family.densify_norm
    return "ln" if any(isinstance(m, nn.LayerNorm) for m in model.modules()) else "bn"


def head_prefixes(layout: str | None) -> tuple[str, ...]:
    """The timm classifier-head prefixes of the family with SparK ``layout`` (``()`` for None or another)."""
    return next((f.head_prefixes for f in FAMILIES if layout is not None and f.spark_layout == layout), ())
