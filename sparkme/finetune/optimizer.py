"""The fine-tuning optimizer: timm's factory with SparK's parameter groups and SparK's optimizer settings.

SparK (``downstream_imagenet/util.py``) builds ``Lamb(max_grad_norm=1e7, always_adapt=True,
bias_correction=False)`` for ResNets and timm's ``AdamW`` for ConvNeXt, both with timm's default betas / eps, and
clips no gradient (``clip=-1``). A ``max_grad_norm`` of 1e7 only exists because timm 0.5.4's LAMB could not turn
its global-norm clipping off; today's timm takes ``None`` for that, which is the same update.
"""

from __future__ import annotations

from functools import partial
from types import MappingProxyType

import torch
from timm.optim import create_optimizer_v2
from torch import nn

from sparkme.errors import UsageError
from sparkme.finetune.layer_decay import param_groups
from sparkme.finetune.recipes import FinetuneRecipe

# Per-optimizer arguments beyond betas / eps, as SparK sets them.
_EXTRA_ARGS = MappingProxyType({
    "lamb": MappingProxyType({"bias_correction": False, "always_adapt": True, "max_grad_norm": None}),
    "adamw": MappingProxyType({}),
})


def optimizer_settings(recipe: FinetuneRecipe) -> dict:
    """The optimizer's keyword arguments besides lr and weight decay: betas, eps and SparK's per-optimizer ones."""
    if recipe.optimizer not in _EXTRA_ARGS:
        raise UsageError(f"unknown fine-tuning optimizer {recipe.optimizer!r}; choose lamb or adamw")
    return {"betas": recipe.betas, "eps": recipe.eps, **_EXTRA_ARGS[recipe.optimizer]}


def build_optimizer(model: nn.Module, model_name: str, recipe: FinetuneRecipe, lr: float) -> torch.optim.Optimizer:
    """The optimizer of a fine-tune at peak lr ``lr``, each group starting at ``lr * group["lr_scale"]``.

    Raises:
        UsageError: an optimizer other than ``lamb`` or ``adamw``.
    """
    group_fn = partial(param_groups, model_name=model_name, weight_decay=recipe.weight_decay,
                       layer_decay=recipe.layer_decay)
    optimizer = create_optimizer_v2(model, opt=recipe.optimizer, lr=lr, weight_decay=recipe.weight_decay,
                                    param_group_fn=group_fn, **optimizer_settings(recipe))
    for group in optimizer.param_groups:
        group["lr"] = lr * group["lr_scale"]
    return optimizer
