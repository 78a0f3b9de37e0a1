"""Pointwise operations on sparse maps: shared by every backend because they only touch ``map.features``
(channels last). Each takes the dense module whose parameters it uses, so the sparse encoder keeps the dense
model's own modules and state-dict keys."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from sparkme.sparse.base import SparseMap

# Modules f with f(0) = 0: a masked-dense map stays zero at its masked sites through them (no re-masking).
ZERO_PRESERVING = (nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.LeakyReLU, nn.Hardswish, nn.Dropout, nn.Identity)


def pointwise(x: SparseMap, fn: Callable[[torch.Tensor], torch.Tensor]) -> SparseMap:
    """Apply a per-site function of the channels (Linear, activation, dropout, layer scale)."""
    return x.map_features(fn, keeps_zeros=isinstance(fn, ZERO_PRESERVING))


def batch_norm(x: SparseMap, bn: nn.modules.batchnorm._BatchNorm) -> SparseMap:
    """BatchNorm with statistics over the visible sites only (SparK's sparse BN). ``bn`` is the dense
    ``BatchNorm2d`` (or ``SyncBatchNorm``): the ``(N, C)`` visible rows are fed to it as ``(N, C, 1, 1)``."""
    rows = x.visible_rows(x.unmasked_features)
    out = bn(rows[:, :, None, None])[:, :, 0, 0]
    return x.from_visible_rows(out)


def layer_norm(x: SparseMap, ln: nn.LayerNorm) -> SparseMap:
    """LayerNorm over the channels of each site (timm's ``LayerNorm`` and ``LayerNorm2d`` alike)."""
    return x.map_features(lambda features: F.layer_norm(features, features.shape[-1:], ln.weight, ln.bias, ln.eps))


def global_response_norm(x: SparseMap, grn: nn.Module) -> SparseMap:
    """ConvNeXt-V2 GRN computed **per sample** over that sample's own visible sites.

    ``out = x + bias + weight * x * n`` with ``n = g / (mean_c g + eps)``, ``g[b, c] = ||x[b, :, c]||_2`` over
    the visible sites of image b (ConvNeXt-V2's Minkowski GRN pools over the whole batch instead).
    """
    features = x.features  # zero at masked sites, as the per-sample sum needs
    norms = x.per_sample_sum(features * features).sqrt()  # (B, C)
    scale = norms / (norms.mean(dim=-1, keepdim=True) + grn.eps)
    return x.with_features(features + torch.addcmul(grn.bias, grn.weight, features * x.per_sample_broadcast(scale)))


def drop_path(x: SparseMap, module: nn.Module) -> SparseMap:
    """Stochastic depth that keeps or drops all sites of one sample together (timm ``DropPath`` settings)."""
    probability = float(getattr(module, "drop_prob", 0.0))
    if not module.training or probability == 0.0:
        return x
    keep = 1.0 - probability
    per_sample = x.unmasked_features.new_empty(x.context.batch_size, 1).bernoulli_(keep)
    if getattr(module, "scale_by_keep", True):
        per_sample = per_sample / keep
    return x.map_features(lambda features: features * x.per_sample_broadcast(per_sample), keeps_zeros=True)
