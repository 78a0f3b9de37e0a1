"""Whether a fine-tune synchronises BatchNorm across processes: SparK's ``downstream_imagenet`` does by default
(``arg.py``: ``sbn = True``; ``util.py`` converts the model after making its EMA), so ``trainer.sync_bn: null``
means on for a model with BatchNorm trained by several processes; ``false`` is the opt-out."""

from __future__ import annotations

from torch import nn

from sparkme.errors import UsageError


def has_batchnorm(model: nn.Module) -> bool:
    """Whether any module of ``model`` is a BatchNorm (timm's ``BatchNormAct2d`` included)."""
    return any(isinstance(module, nn.modules.batchnorm._BatchNorm) for module in model.modules())


def use_sync_bn(setting: bool | None, world_size: int, model: nn.Module) -> bool:
    """``trainer.sync_bn`` decided: null is SparK's default (on with several processes when ``model`` has
    BatchNorm), true / false as given; one process never converts (there are no other statistics to share).

    Raises:
        UsageError: a setting other than null, true or false.
    """
    if setting is not None and not isinstance(setting, bool):
        raise UsageError(f"trainer.sync_bn must be null (SparK's: on for BatchNorm models with several processes), "
                         f"true or false, got {setting!r}")
    if world_size < 2:
        return False
    return has_batchnorm(model) if setting is None else setting
