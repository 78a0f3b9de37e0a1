"""SparK's per-iteration fine-tuning lr: linear warm-up from 0.005 x peak, then cosine down to 0.001 x peak.

This is ``lr_wd_annealing`` of SparK's ``downstream_imagenet/lr_decay.py``, called before every step with
``cur_it = it + epoch * iters_per_epoch``, ``wp_it = warmup_epochs * iters_per_epoch`` and
``max_it = epochs * iters_per_epoch``. The cosine reaches its floor at the *last* iteration (``max_it - 1``), which
is why timm's cosine scheduler (floor one step later) is not used. Weight decay stays constant (SparK rewrites the
same value every step).
"""

from __future__ import annotations

import math

import torch

from sparkme.finetune.recipes import FinetuneRecipe


def spark_lr(it: int, peak_lr: float, warmup_iters: float, total_iters: int) -> float:
    """The lr at iteration ``it`` (0-based) before layer decay. Past the last iteration it stays at the floor."""
    warmup_iters = round(warmup_iters)
    if it < warmup_iters:
        return 0.005 * peak_lr + 0.995 * peak_lr * it / warmup_iters
    # SparK divides by zero when the warm-up leaves a single iteration; that iteration is the peak here.
    ratio = min(1.0, (it - warmup_iters) / max(1, total_iters - 1 - warmup_iters))
    return 0.001 * peak_lr + 0.999 * peak_lr * (0.5 + 0.5 * math.cos(math.pi * ratio))


class FinetuneSchedule:
    """Sets every group's lr to ``spark_lr(it) * group["lr_scale"]``; stateless in ``it``, so a resume is exact."""

    def __init__(self, optimizer: torch.optim.Optimizer, peak_lr: float, warmup_iters: float, total_iters: int):
        self.optimizer = optimizer
        self.peak_lr = peak_lr
        self.warmup_iters = warmup_iters
        self.total_iters = total_iters

    @classmethod
    def for_recipe(cls, optimizer: torch.optim.Optimizer, recipe: FinetuneRecipe, iters_per_epoch: int,
                   global_batch: int) -> FinetuneSchedule:
        """SparK's call: peak ``recipe.peak_lr(global_batch)``, warm-up ``warmup_epochs * iters_per_epoch``,
        ``epochs * iters_per_epoch`` iterations in all."""
        return cls(optimizer, recipe.peak_lr(global_batch), recipe.warmup_epochs * iters_per_epoch,
                   recipe.epochs * iters_per_epoch)

    def step(self, it: int) -> float:
        """Set the lr for iteration ``it`` (call before ``optimizer.step()``); returns the unscaled lr."""
        lr = spark_lr(it, self.peak_lr, self.warmup_iters, self.total_iters)
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        return lr
