"""MAE's linear probe (``main_linprobe.py``) on cached features: ``BatchNorm1d(D, affine=False, eps=1e-6)`` then a
``Linear`` initialised truncated-normal (std 0.01, bias 0), trained with LARS (timm's ``Lars``, momentum 0.9, trust
coefficient 0.001, adapting the weight matrix only, as MAE's LARS skips 1-D tensors), no weight decay, lr = blr x
batch / 256 warmed up linearly per iteration for ``warmup_epochs`` then cosine to 0.

The features are extracted once (centre crop), so MAE's random-resized-crop and flip are not applied: the probe
reads the same frozen features the kNN does.

LARS scales each step of the weight to ``lr x trust_coefficient x |w| / |g|``, so over a run the weight can grow by
about ``epochs x N x blr x trust_coefficient / 256`` of its norm: 45 on ImageNet (N = 1.28 M), 0.05 on 1,400 images,
where the probe barely leaves its initialisation. Hence the rule of ``optimizer="auto"`` (the default): LARS when
that bound reaches 1 (the weight can move by its own norm; 28,445 training images or more at the default settings),
else SGD (the same head, schedule and lr rule, momentum 0.9), which trains small sets properly.

The batch is ``min(batch_size, N)``: a set smaller than the batch trains on full batches of N, with the lr scaled to
that batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from timm.layers import trunc_normal_
from timm.optim import Lars
from torch import nn

from sparkme.evaluation.knn import topk_accuracy

OPTIMIZERS = ("auto", "lars", "sgd")


@dataclass(frozen=True)
class LinearProbeSettings:
    """MAE's linear-probe hyper-parameters (``batch_size`` is MAE's 16,384 scaled down to what small sets hold)."""

    epochs: int = 90
    warmup_epochs: int = 10
    blr: float = 0.1
    batch_size: int = 256
    momentum: float = 0.9
    optimizer: str = "auto"  # auto (choose_optimizer) | lars (MAE) | sgd
    trust_coefficient: float = 0.001  # MAE's LARS


def lars_reach(settings: LinearProbeSettings, train_images: int) -> float:
    """The most LARS can move the weight over the run, in units of its norm: ``epochs x N x blr x trust / 256``
    (every step moves it by at most ``lr x trust`` of its norm, with ``lr = blr x batch / 256`` and ``N / batch``
    steps per epoch)."""
    return settings.epochs * train_images * settings.blr * settings.trust_coefficient / 256


def choose_optimizer(settings: LinearProbeSettings, train_images: int) -> str:
    """``settings.optimizer``, or for ``"auto"``: ``"lars"`` (MAE's) when ``lars_reach`` is at least 1, else
    ``"sgd"``."""
    if settings.optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {settings.optimizer!r}")
    if settings.optimizer != "auto":
        return settings.optimizer
    return "lars" if lars_reach(settings, train_images) >= 1.0 else "sgd"


def probe_head(dim: int, num_classes: int) -> nn.Sequential:
    """``(B, dim)`` features -> ``(B, num_classes)`` logits: parameter-free BatchNorm, then MAE's initialised Linear."""
    linear = nn.Linear(dim, num_classes)
    trunc_normal_(linear.weight, std=0.01)
    nn.init.zeros_(linear.bias)
    return nn.Sequential(nn.BatchNorm1d(dim, affine=False, eps=1e-6), linear)


def lr_at(iteration: float, peak: float, warmup: float, total: float) -> float:
    """MAE's ``adjust_learning_rate``: linear from 0 over ``warmup`` iterations, then half a cosine to 0."""
    if iteration < warmup:
        return peak * iteration / warmup
    return peak * 0.5 * (1.0 + math.cos(math.pi * (iteration - warmup) / max(total - warmup, 1)))


def linear_probe(train_features: torch.Tensor, train_labels: torch.Tensor, val_features: torch.Tensor,
                 val_labels: torch.Tensor, num_classes: int, settings: LinearProbeSettings = LinearProbeSettings(),
                 seed: int = 0) -> dict[str, float | str]:
    """Train the probe on ``(N, D)`` features with ``(N,)`` labels; top-1 / top-5 (%) of the last epoch on val, and
    the optimizer that trained it (``choose_optimizer``) under ``"optimizer"``.

    The shuffling and the initialisation follow ``seed``: the same inputs give the same figures.
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        head = probe_head(train_features.shape[1], num_classes).to(train_features.device)
    weights = [p for p in head.parameters() if p.ndim > 1]
    biases = [p for p in head.parameters() if p.ndim <= 1]
    batch = min(settings.batch_size, train_features.shape[0])
    peak = settings.blr * batch / 256
    chosen = choose_optimizer(settings, train_features.shape[0])
    if chosen == "lars":
        optimizer = Lars([{"params": weights, "always_adapt": True}, {"params": biases, "always_adapt": False}],
                         lr=peak, momentum=settings.momentum, weight_decay=0.0,
                         trust_coeff=settings.trust_coefficient)
    else:
        optimizer = torch.optim.SGD(head.parameters(), lr=peak, momentum=settings.momentum, weight_decay=0.0)
    steps_per_epoch = max(train_features.shape[0] // batch, 1)  # MAE's loader drops the last partial batch
    total = settings.epochs * steps_per_epoch
    criterion = nn.CrossEntropyLoss()
    iteration = 0
    for _ in range(settings.epochs):
        head.train()
        order = torch.randperm(train_features.shape[0], generator=generator).to(train_features.device)
        for step in range(steps_per_epoch):
            index = order[step * batch:(step + 1) * batch]
            for group in optimizer.param_groups:
                group["lr"] = lr_at(iteration, peak, settings.warmup_epochs * steps_per_epoch, total)
            loss = criterion(head(train_features[index].float()), train_labels[index])  # float16 banks too
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            iteration += 1
    head.eval()
    with torch.no_grad():
        return {**topk_accuracy(head(val_features.float()), val_labels), "optimizer": chosen}
