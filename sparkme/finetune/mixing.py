"""Mixup / CutMix and the fine-tuning losses, as SparK's ``downstream_imagenet/util.py`` and ``mixup.py`` set them.

SparK's ``BatchMixup`` is timm's batch-mode ``Mixup`` with two changes: an odd batch (the partial last batch of an
epoch, or an odd batch size) gets sample 0 prepended (images and labels), so the batch grows by one instead of failing
timm's even-batch assertion; and its CutMix box is the one of the timm release SparK vendored: ``cut // 2`` on both
sides of the centre, where timm 1.0 takes ``(cut + 1) // 2`` after it (1 px more on an odd cut). Mixing is off when
the recipe's mixup alpha is 0 (then the labels are still smoothed). The loss follows the optimizer in SparK: binary
cross-entropy (smoothing 0, the mixup already smoothed the targets) with LAMB, soft-target cross-entropy with AdamW.
"""

from __future__ import annotations

import numpy as np
import torch
from timm.data import Mixup
from timm.loss import BinaryCrossEntropy, SoftTargetCrossEntropy
from torch import nn

from sparkme.errors import UsageError
from sparkme.finetune.recipes import FinetuneRecipe


def spark_cutmix_box(image_shape: tuple[int, ...], lam: float) -> tuple[tuple[int, int, int, int], float]:
    """SparK's CutMix box for ``lam`` on images of shape ``(..., H, W)``: a cut of ``int(H sqrt(1 - lam))`` by
    ``int(W sqrt(1 - lam))`` around a uniform centre ``(cy, cx)`` (drawn in that order from NumPy's global RNG, as
    timm draws them), spanning ``[c - cut // 2, c + cut // 2)`` clipped to the image; the returned lambda is
    corrected to the clipped area (``correct_lam``).

    Returns:
        ``((top, bottom, left, right), lam)``.
    """
    height, width = image_shape[-2:]
    ratio = np.sqrt(1 - lam)
    cut_h, cut_w = int(height * ratio), int(width * ratio)
    cy, cx = np.random.randint(0, height), np.random.randint(0, width)
    top, bottom = np.clip(cy - cut_h // 2, 0, height), np.clip(cy + cut_h // 2, 0, height)
    left, right = np.clip(cx - cut_w // 2, 0, width), np.clip(cx + cut_w // 2, 0, width)
    return (int(top), int(bottom), int(left), int(right)), 1.0 - (bottom - top) * (right - left) / (height * width)


class SparkMixup(Mixup):
    """timm's ``Mixup`` (batch mode, no ``cutmix_minmax``) with SparK's CutMix box (``spark_cutmix_box``)."""

    def _mix_batch(self, x: torch.Tensor) -> float:
        lam, use_cutmix = self._params_per_batch()
        if lam == 1.0:
            return 1.0
        if use_cutmix:
            (top, bottom, left, right), lam = spark_cutmix_box(x.shape, lam)
            x[:, :, top:bottom, left:right] = x.flip(0)[:, :, top:bottom, left:right]
        else:
            x_flipped = x.flip(0).mul_(1.0 - lam)
            x.mul_(lam).add_(x_flipped)
        return lam


class BatchMixer:
    """``SparkMixup`` with SparK's odd-batch rule.

    ``mixer(images, labels) -> (mixed images, soft targets (B', C), labels (B',))``, where ``B' = B + 1`` for an odd
    ``B`` (sample 0 is duplicated at the front) and ``B`` otherwise. The returned labels are the (extended) hard
    labels, for a training accuracy as SparK counts it (a prediction is right if it is either mixed label:
    ``pred == labels`` or ``pred == labels.flip(0)``). The images are mixed in place when ``B`` is even.
    """

    def __init__(self, mixup: SparkMixup):
        self.mixup = mixup

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if images.shape[0] % 2 == 1:
            images, labels = torch.cat((images[:1], images)), torch.cat((labels[:1], labels))
        images, targets = self.mixup(images, labels)
        return images, targets, labels


def build_mixup(recipe: FinetuneRecipe, num_classes: int) -> BatchMixer:
    """Mixup alpha per recipe, CutMix alpha ``recipe.cutmix``, probability 1, switch ``recipe.mix_switch_prob``,
    label smoothing ``recipe.label_smoothing``, one lambda per batch."""
    mixup = SparkMixup(mixup_alpha=recipe.mixup, cutmix_alpha=recipe.cutmix, cutmix_minmax=None, prob=1.0,
                  switch_prob=recipe.mix_switch_prob, mode="batch", correct_lam=True,
                  label_smoothing=recipe.label_smoothing, num_classes=num_classes)
    # SparK: `mixup_fn.mixup_enabled = args.mixup > 0.0`, CutMix included.
    mixup.mixup_enabled = recipe.mixup > 0.0
    return BatchMixer(mixup)


def build_loss(recipe: FinetuneRecipe) -> nn.Module:
    """The training loss on the mixer's soft targets.

    Raises:
        UsageError: a loss other than ``bce`` or ``soft_ce``.
    """
    if recipe.loss == "bce":
        # timm's default smoothing is 0.1: SparK sets 0, the targets arrive smoothed.
        return BinaryCrossEntropy(smoothing=0.0, target_threshold=None)
    if recipe.loss == "soft_ce":
        return SoftTargetCrossEntropy()
    raise UsageError(f"unknown fine-tuning loss {recipe.loss!r}; choose bce or soft_ce")


def build_eval_loss() -> nn.Module:
    """The validation loss on hard labels: plain cross-entropy (SparK reports accuracy only)."""
    return nn.CrossEntropyLoss()
