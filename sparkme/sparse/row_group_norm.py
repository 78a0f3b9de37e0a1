"""Group (and instance) norm of visible rows in any order, keeping only the input rows for backward.

Rows grouped by sample run torch's own ``group_norm`` per sample (``ops.group_norm``). MinkowskiEngine keeps its rows
in hash order, so there the statistics are per-sample sums through each row's sample index. Written with autograd's
elementary ops that formula keeps four ``(N, C)`` tensors for backward (the centred rows, their square, the
normalised rows, ...): at the full-resolution stages of a 3-D encoder, most of the activation memory. This function
keeps the input rows and two ``(B, G)`` statistics, and recomputes the normalised rows in backward.

Per sample ``b`` and group ``g`` over the sample's ``n`` visible values ``S``: ``x̂ = (x - mean_S) * rstd``, ``y = x̂ * w
+ β``; backward ``dx = rstd * (dx̂ - mean_S(dx̂) - x̂ * mean_S(dx̂ * x̂))`` with ``dx̂ = dy * w``.
"""

from __future__ import annotations

import torch


def _group_sums(values: torch.Tensor, samples: torch.Tensor, batch_size: int, groups: int) -> torch.Tensor:
    """``(N, C)`` rows -> ``(B, G)`` sums over each sample's rows and each group's channels."""
    per_channel = values.new_zeros(batch_size, values.shape[1]).index_add_(0, samples, values)
    return per_channel.view(batch_size, groups, -1).sum(dim=-1)


def _per_row(stats: torch.Tensor, samples: torch.Tensor, channels: int) -> torch.Tensor:
    """``(B, G)`` -> ``(N, C)``: each row's sample's value of each channel's group."""
    return stats.repeat_interleave(channels // stats.shape[1], dim=1)[samples]


class _RowGroupNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, features, samples, counts, groups: int, weight, bias, eps: float):
        batch_size, channels = counts.shape[0], features.shape[1]
        values = (counts.to(features.dtype) * (channels // groups))[:, None]  # (B, 1): values per group
        mean = _group_sums(features, samples, batch_size, groups) / values
        centred = features - _per_row(mean, samples, channels)
        variance = _group_sums(centred * centred, samples, batch_size, groups) / values
        rstd = torch.rsqrt(variance + eps)
        out = centred.mul_(_per_row(rstd, samples, channels))
        ctx.groups = groups
        ctx.save_for_backward(features, samples, values, mean, rstd, weight)
        if weight is not None:
            out = out * weight
        return out if bias is None else out + bias

    @staticmethod
    def backward(ctx, grad_out):
        features, samples, values, mean, rstd, weight = ctx.saved_tensors
        batch_size, channels, groups = values.shape[0], features.shape[1], ctx.groups
        row_rstd = _per_row(rstd, samples, channels)
        normalised = (features - _per_row(mean, samples, channels)) * row_rstd
        grad_features = grad_weight = grad_bias = None
        if ctx.needs_input_grad[4]:
            grad_weight = (grad_out * normalised).sum(dim=0)
        if ctx.needs_input_grad[5]:
            grad_bias = grad_out.sum(dim=0)
        if ctx.needs_input_grad[0]:
            grad_normalised = grad_out if weight is None else grad_out * weight
            mean_grad = _group_sums(grad_normalised, samples, batch_size, groups) / values
            mean_projection = _group_sums(grad_normalised * normalised, samples, batch_size, groups) / values
            grad_features = row_rstd * (grad_normalised - _per_row(mean_grad, samples, channels)
                                        - normalised * _per_row(mean_projection, samples, channels))
        return grad_features, None, None, None, grad_weight, grad_bias, None


def row_group_norm(features: torch.Tensor, samples: torch.Tensor, counts: torch.Tensor, groups: int,
                   weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float) -> torch.Tensor:
    """Group norm of visible rows with per-sample statistics.

    Args:
        features: ``(N, C)`` visible rows, in any order.
        samples: ``(N,)`` long, each row's sample.
        counts: ``(B,)`` visible rows of each sample.
        groups: channel groups (``C`` for an instance norm).
        weight, bias: ``(C,)`` affine, or None.
        eps: added to the biased variance.

    Returns:
        ``(N, C)``.
    """
    return _RowGroupNorm.apply(features.contiguous(), samples, counts, groups, weight, bias, eps)
