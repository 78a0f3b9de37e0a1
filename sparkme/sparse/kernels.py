"""Gather-GEMM kernels of the true-sparse backends (``torch``, and ``minkowski`` for grouped convs and pooling).

Every function works on ``(N, C)`` feature rows and a neighbour table ``(N_out, K)`` whose entry ``N_in`` (one past
the last row) means "missing" (a masked or out-of-image site). The autograd functions keep only the input rows for
backward, rebuilding the gathered columns there instead of storing them (they are ~K times the input).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from sparkme.sparse.conv import Algorithm, ConvSpec


class _GatherGemmConv(torch.autograd.Function):
    """k x k conv as gather (im2col on visible rows) + one GEMM, saving only the input rows for backward: the
    ``(N_out, K*C_in)`` columns are rebuilt in backward instead of being kept alive (they are ~K times the input).

    For a stride-1 (same sites) conv the input gradient is again a gather + GEMM with the kernel mirrored and
    transposed; only strided convs need a scatter-add.
    """

    @staticmethod
    def forward(ctx, features, table, weight, same_sites: bool):
        ctx.same_sites = same_sites
        ctx.save_for_backward(features, table, weight)
        return _gather_rows(features, table) @ _weight_rows(weight).t()

    @staticmethod
    def backward(ctx, grad_out):
        saved_features, table, saved_weight = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        # Under autocast the forward GEMM ran in bf16/fp16 and grad_out has that dtype, while backward runs outside
        # autocast: compute in grad_out's dtype, return each gradient in its input's dtype (as autograd requires).
        features, weight = saved_features.to(grad_out.dtype), saved_weight.to(grad_out.dtype)
        c_out, c_in, *kernel = weight.shape
        spatial = tuple(range(2, weight.dim()))
        grad_features = grad_weight = None
        if ctx.needs_input_grad[2]:
            # (C_out, K*C_in) -> (C_out, C_in, k, k), contiguous here: AccumulateGrad would otherwise copy it
            grad_weight = (grad_out.t() @ _gather_rows(features, table)).view(c_out, *kernel, c_in)
            grad_weight = grad_weight.permute(0, weight.dim() - 1, *range(1, weight.dim() - 1))
            grad_weight = grad_weight.contiguous().to(saved_weight.dtype)
        if ctx.needs_input_grad[0]:
            if ctx.same_sites:
                mirrored = weight.flip(spatial).transpose(0, 1)  # (C_in, C_out, k, k)
                grad_features = _gather_rows(grad_out, table) @ _gemm_weight(mirrored)
            else:
                grad_columns = (grad_out @ _weight_rows(weight)).reshape(-1, c_in)
                padded = features.new_zeros(features.shape[0] + 1, c_in)
                grad_features = padded.index_add_(0, table.reshape(-1), grad_columns)[:-1]
            grad_features = grad_features.to(saved_features.dtype)
        return grad_features, None, grad_weight, None


def _with_missing_row(features: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
    """``(N, C)`` -> ``(N + 1, C)``: row ``N`` is what a neighbour table's "missing" entry reads."""
    return torch.cat([features, features.new_full((1, features.shape[1]), fill)])


def _gather_rows(features: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """``(N_in, C)`` rows through a ``(N_out, K)`` table (``N_in`` = zeros) -> ``(N_out, K*C)`` columns."""
    padded = _with_missing_row(features)
    return padded[table].reshape(table.shape[0], -1)


def _gemm_weight(weight: torch.Tensor) -> torch.Tensor:
    """Dense ``(C_out, C_in, k, k)`` (or ``k, k, k``) -> ``(K*C_in, C_out)`` matching ``_gather_rows``' tap-major
    columns."""
    c_out = weight.shape[0]
    return weight.permute(*range(2, weight.dim()), 1, 0).reshape(-1, c_out)


def _weight_rows(weight: torch.Tensor) -> torch.Tensor:
    """Dense ``(C_out, C_in, k, k)`` (or ``k, k, k``) -> ``(C_out, K*C_in)``, the transpose of ``_gemm_weight``: the
    copy moves ``(C_in, K)`` blocks within each output channel's row (cache-friendly, unlike a whole transpose), and
    the GEMMs read it transposed for free."""
    c_out = weight.shape[0]
    return weight.permute(0, *range(2, weight.dim()), 1).reshape(c_out, -1)


def gather_conv(features: torch.Tensor, neighbours: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                spec: ConvSpec) -> torch.Tensor:
    """Sparse k x k convolution through a neighbour table, by the spec's gather algorithm: one gather and one GEMM
    (``GATHER_GEMM``), a gathered depthwise product, or a batched GEMM per group.

    Args:
        features: ``(N_in, C_in)`` input rows.
        neighbours: ``(N_out, K)`` rows read by each output tap; ``N_in`` means "missing" (reads zeros).
        weight: dense ``(C_out, C_in/groups, k, k)`` with ``K = k*k`` taps ordered ``ky*k + kx`` (volumes:
            ``(C_out, C_in/groups, k, k, k)``, ``K = k**3`` taps ordered ``(kz*k + ky)*k + kx``).
        bias: ``(C_out,)`` or None.
        spec: the conv's ``ConvSpec`` (a ``GATHER_*`` algorithm).

    Returns:
        ``(N_out, C_out)``.
    """
    if spec.algorithm is Algorithm.GATHER_GEMM:
        out = _GatherGemmConv.apply(features.contiguous(), neighbours, weight, spec.same_sites)
    elif spec.algorithm is Algorithm.GATHER_DEPTHWISE:
        # Strided depthwise (stride-1 ones run on a scratch grid: sparse/grid_depthwise.py).
        tap_weight = weight.reshape(weight.shape[0], -1).t().contiguous()  # (K, C)
        out = torch.einsum("nkc,kc->nc", _with_missing_row(features)[neighbours], tap_weight)
    elif spec.algorithm is Algorithm.GATHER_GROUPED:
        out = _grouped_gather_conv(features, neighbours, weight, spec.groups)
    else:
        raise ValueError(f"gather_conv cannot run a {spec.algorithm.value} conv")
    return out if bias is None else out + bias


def _grouped_gather_conv(features: torch.Tensor, neighbours: torch.Tensor, weight: torch.Tensor,
                         groups: int) -> torch.Tensor:
    """Grouped conv (ResNeXt, RegNet) as one batched GEMM over the groups: ``(G, N_out, K*C_in/G)`` columns times
    ``(G, K*C_in/G, C_out/G)`` weights. Plain autograd: grouped layers are narrow, so their columns are small."""
    c_out, c_in_per_group = weight.shape[:2]
    n_out, taps = neighbours.shape
    columns = _with_missing_row(features)[neighbours]  # (N_out, K, C_in)
    columns = columns.reshape(n_out, taps, groups, c_in_per_group).permute(2, 0, 1, 3)
    columns = columns.reshape(groups, n_out, taps * c_in_per_group)
    grouped = weight.reshape(groups, c_out // groups, c_in_per_group, taps).permute(0, 3, 2, 1)
    out = torch.bmm(columns, grouped.reshape(groups, taps * c_in_per_group, c_out // groups))
    return out.permute(1, 0, 2).reshape(n_out, c_out)


def gather_max_pool(features: torch.Tensor, neighbours: torch.Tensor) -> torch.Tensor:
    """Max over the visible neighbours: ``(N_in, C)`` and ``(N_out, K)`` -> ``(N_out, C)``."""
    padded = _with_missing_row(features, float("-inf"))
    return padded[neighbours].amax(dim=1)


def gather_avg_pool(features: torch.Tensor, neighbours: torch.Tensor) -> torch.Tensor:
    """Mean over the *visible* neighbours: ``(N_in, C)`` and ``(N_out, K)`` -> ``(N_out, C)``. Every output site
    has at least one visible neighbour (its own patch is visible), so the count is never 0."""
    total = _with_missing_row(features)[neighbours].sum(dim=1)
    count = (neighbours < features.shape[0]).sum(dim=1, keepdim=True).clamp(min=1)
    return total / count.to(features.dtype)


def linear_conv1x1(features: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                   groups: int) -> torch.Tensor:
    """A 1x1 stride-1 conv on channels-last features ``(..., C_in)`` is one GEMM (one per group), identical for
    every true-sparse backend. ``weight``: ``(C_out, C_in/groups, 1, 1)`` (or ``1, 1, 1``); ``bias``: ``(C_out,)``
    or None."""
    if groups == 1:
        return F.linear(features, weight.flatten(1), bias)
    c_out = weight.shape[0]
    grouped = features.reshape(*features.shape[:-1], groups, features.shape[-1] // groups)
    out = torch.einsum("...gi,goi->...go", grouped, weight.reshape(groups, c_out // groups, -1))
    out = out.reshape(*features.shape[:-1], c_out)
    return out if bias is None else out + bias
