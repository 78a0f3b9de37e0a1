"""Start-up checks of a fine-tuning config: every user error is found here, before a model is built or data read.

Each check raises ``UsageError`` naming the setting, the bad value and what is accepted; ``sparkme-finetune`` prints
it as one line and exits with status 2. The model is built on the ``meta`` device (no memory, no time) to check the
``init=`` and ``resume=`` files against it.
"""

from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from sparkme.data.labelled import check_labelled_root
from sparkme.engine.config_checks import check_logger, check_resume, check_trainer
from sparkme.errors import UsageError
from sparkme.finetune.recipes import FinetuneRecipe, recipe_for
from sparkme.finetune.sync_bn import use_sync_bn


def resolve_recipe(cfg: DictConfig) -> FinetuneRecipe:
    """The model's preset (``recipe_for``) with every non-null ``recipe.<field>`` of the config put over it."""
    preset = recipe_for(str(cfg.model), int(cfg.image_size))
    overrides = {k: v for k, v in OmegaConf.to_container(cfg.recipe, resolve=True).items() if v is not None}
    fields = {f.name for f in dataclasses.fields(FinetuneRecipe)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise UsageError(f"unknown recipe setting(s) {', '.join(unknown)}; the recipe has {', '.join(sorted(fields))}")
    if isinstance(overrides.get("betas"), list):
        overrides["betas"] = tuple(overrides["betas"])
    return dataclasses.replace(preset, **overrides)


def check_recipe(recipe: FinetuneRecipe) -> None:
    if recipe.optimizer not in ("lamb", "adamw"):
        raise UsageError(f"recipe.optimizer must be lamb or adamw, got {recipe.optimizer!r}")
    if recipe.loss not in ("bce", "soft_ce"):
        raise UsageError(f"recipe.loss must be bce or soft_ce, got {recipe.loss!r}")
    if not 0 < recipe.layer_decay <= 1:
        raise UsageError(f"recipe.layer_decay must be in (0, 1] (1: no decay), got {recipe.layer_decay!r}")
    if recipe.epochs < 1 or recipe.warmup_epochs < 0 or recipe.repeated_aug < 1:
        raise UsageError(f"recipe.epochs must be >= 1, warmup_epochs >= 0 and repeated_aug >= 1, got "
                         f"{recipe.epochs}, {recipe.warmup_epochs}, {recipe.repeated_aug}")


def check_image_size(size) -> None:
    if isinstance(size, bool) or not isinstance(size, int) or size < 32:
        raise UsageError(f"image_size must be an integer >= 32, got {size!r}")


def _meta_classifier(cfg: DictConfig, num_classes: int, recipe: FinetuneRecipe) -> torch.nn.Module:
    from sparkme.finetune.classifier import create_classifier

    try:
        with torch.device("meta"):
            return create_classifier(str(cfg.model), num_classes, recipe.drop_path, str(cfg.source))
    except UsageError:
        raise
    except (ValueError, TypeError, RuntimeError) as error:
        raise UsageError(f"model={cfg.model}: {str(error).splitlines()[0]}") from error


def check_init(cfg: DictConfig, model: torch.nn.Module) -> None:
    """``init=PATH`` is readable and fits the classifier (only the head may be missing): the real loader runs on
    the ``meta`` model, where copying is a no-op."""
    if not cfg.get("init"):
        return
    from sparkme.models.dense_weights import load_pretrained_dense

    path = Path(str(cfg.init)).expanduser()
    if not path.is_file():
        raise UsageError(f"init={cfg.init!r} is not a file: give a pretrained file (sparkme checkpoint or export, "
                         "SparK's released weights, timm / torchvision state dict)")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # copying into meta parameters does nothing: intended
        load_pretrained_dense(model, str(cfg.model), path)


def check_finetune_config(cfg: DictConfig) -> None:
    """Raise ``UsageError`` naming the first bad value of a fine-tuning ``cfg`` and what is accepted."""
    if OmegaConf.is_missing(cfg.data, "root"):
        raise UsageError("data.root is required: a folder with train/<class>/... and val/<class>/..., or one "
                         "folder of <class>/... with data.val_fraction=0.1")
    # the fine-tune's epochs are the recipe's (checked below)
    check_trainer(cfg, ("batch_size", "accum_steps", "eval_every", "eval_batch_size"), epochs_required=False)
    check_logger(cfg)
    use_sync_bn(cfg.trainer.sync_bn, 1, torch.nn.Identity())  # the setting's type; the decision needs the model
    check_image_size(cfg.image_size)
    recipe = resolve_recipe(cfg)
    check_recipe(recipe)
    layout = check_labelled_root(cfg.data.root, cfg.data.val_fraction)
    model = _meta_classifier(cfg, len(layout.classes), recipe)
    check_init(cfg, model)
    check_resume(cfg, model, str(cfg.model), "finetune")
