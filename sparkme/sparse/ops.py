"""Pointwise operations on sparse maps: shared by every backend because they only touch ``map.features``
(channels last). Each takes the dense module whose parameters it uses, so the sparse encoder keeps the dense
model's own modules and state-dict keys."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from sparkme.sparse.base import SparseMap
from sparkme.sparse.row_group_norm import row_group_norm

# Modules f with f(0) = 0: a masked-dense map stays zero at its masked sites through them (no re-masking).
ZERO_PRESERVING = (nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.LeakyReLU, nn.Hardswish, nn.Dropout, nn.Identity)


def pointwise(x: SparseMap, fn: Callable[[torch.Tensor], torch.Tensor]) -> SparseMap:
    """Apply a per-site function of the channels (Linear, activation, dropout, layer scale)."""
    return x.map_features(fn, keeps_zeros=isinstance(fn, ZERO_PRESERVING))


def batch_norm(x: SparseMap, bn: nn.modules.batchnorm._BatchNorm) -> SparseMap:
    """BatchNorm with statistics over the visible sites only (SparK's sparse BN). ``bn`` is the dense
    ``BatchNorm2d`` (or ``SyncBatchNorm``): the ``(N, C)`` visible rows are fed to it as ``(N, C, 1, 1)``
    (``(N, C, 1, 1, 1)`` for a ``BatchNorm3d``, whose input check wants five dims)."""
    rows = x.visible_rows(x.unmasked_features)
    if isinstance(bn, nn.BatchNorm3d):
        return x.from_visible_rows(bn(rows[:, :, None, None, None])[:, :, 0, 0, 0])
    out = bn(rows[:, :, None, None])[:, :, 0, 0]
    return x.from_visible_rows(out)


def group_norm(x: SparseMap, groups: int, weight: torch.Tensor | None, bias: torch.Tensor | None,
               eps: float) -> SparseMap:
    """Per sample and per channel group, statistics over that sample's **visible** sites only (nnssl's
    ``SparseInstanceNorm3d`` for ``groups == C``; ``GroupNorm`` otherwise): ``(x - mean) / sqrt(var + eps)`` with
    the biased variance, then the per-channel affine.

    A map whose rows are grouped by sample (``sample_row_ranges``) runs torch's own ``group_norm`` on each sample's
    rows; other true-sparse maps (MinkowskiEngine's rows are in hash order) run ``row_group_norm`` through each
    row's sample. Both keep only the input rows and two numbers per sample and group for backward. The masked
    oracle runs the formula below with autograd's elementary ops (sums of its zeroed dense grid), which keeps four
    ``(N, C)`` tensors.
    """
    ranges = x.sample_row_ranges()
    # (torch's group_norm refuses a group of one value, where the formula gives the bias: a one-site sample)
    if ranges is not None and min(end - start for start, end in ranges) * (x.num_channels // groups) > 1:
        rows = x.features
        parts = [F.group_norm(rows[start:end].t()[None], groups, weight, bias, eps)[0].t() for start, end in ranges]
        return x.with_features(torch.cat(parts) if len(parts) > 1 else parts[0].contiguous())
    samples = x.row_samples()
    if samples is not None:
        return x.with_features(row_group_norm(x.features, samples, x.per_sample_count(), groups, weight, bias, eps))
    features = x.features  # zero at masked sites
    channels = features.shape[-1]
    per_group = channels // groups
    counts = (x.per_sample_count().to(features.dtype) * per_group)[:, None]  # (B, 1): values per group

    def group_mean(per_channel_sums: torch.Tensor) -> torch.Tensor:  # (B, C) sums -> (B, C) group means
        sums = per_channel_sums.view(-1, groups, per_group).sum(dim=-1)
        return (sums / counts).repeat_interleave(per_group, dim=1)

    mean = group_mean(x.per_sample_sum(features))
    centred = features - x.per_sample_broadcast(mean)
    variance = group_mean(x.per_sample_sum(x.zero_masked(centred * centred)))
    out = centred * x.per_sample_broadcast(torch.rsqrt(variance + eps))
    if weight is not None:
        out = out * weight
    if bias is not None:
        out = out + bias
    return x.with_features(out)


def instance_norm(x: SparseMap, norm: nn.modules.instancenorm._InstanceNorm) -> SparseMap:
    """``InstanceNorm2d/3d`` over each sample's visible sites (one group per channel)."""
    return group_norm(x, x.num_channels, norm.weight, norm.bias, norm.eps)


def prelu(x: SparseMap, module: nn.PReLU) -> SparseMap:
    """PReLU with its per-channel (or single) slope applied along the channels-last rows (``F.prelu`` would read
    dim 1, which is not the channels of a ``(B, H, W, C)`` map); ``prelu(0) = 0`` keeps masked zeros."""
    return x.map_features(lambda f: torch.where(f >= 0, f, f * module.weight), keeps_zeros=True)


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
