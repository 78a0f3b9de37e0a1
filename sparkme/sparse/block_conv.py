"""Sparse convolution of volumes patch by patch: each visible patch, with a halo read from its visible neighbours,
is one dense block, and one dense ``conv3d`` (oneDNN) runs on the stack of blocks.

Why: a 3x3x3 gather-GEMM copies every input row 27 times (the ``(N, 27*C)`` columns), once in forward and twice in
backward. At the full-resolution stages of a volume encoder (patch side 32 or 16 voxels, 32-64 channels) those copies
cost more than the GEMM itself. SparK's visible set is a union of whole patches, so at stride ``s`` it is a set of
cubes of side ``p = patch_size / s``: a block of side ``p + 2 * padding`` around each one holds every input the
convolution reads there (masked and out-of-volume sites read as zeros, exactly as the submanifold conv's missing
neighbours), and a dense conv with no padding over it gives that patch's outputs. The input is copied about
``((p + 2 * padding) / p) ** 3`` times (1.2x at p = 32, 1.4x at p = 16) instead of 27 times, and the arithmetic is
that of the visible blocks with their halos.

The result equals the gather-GEMM's: the same products, summed in another order. Only the input rows are kept for
backward; the blocks are rebuilt there, as the gather-GEMM rebuilds its columns.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from sparkme.sparse.context import MaskContext
from sparkme.sparse.conv import ConvSpec

# Smallest patch side (sites of the input map) that runs as blocks. The halo grows a block to ((p + 2) / p)^3 of its
# patch (2x at p = 8, 3.4x at 4, 8x at 2) while the deeper stages' channels make the gathered GEMM efficient; one
# conv's forward + backward against the gather-GEMM, ResEnc-L at 96^3: 0.43x the time at p = 8, 0.95x at 4, 1.3x at
# 2 (docs/volumes-engine.md, "Why patch blocks").
MIN_BLOCK_SIDE = 4


def uses_blocks(context: MaskContext, in_stride: int, spec: ConvSpec) -> bool:
    """Whether a conv of ``spec`` on the stride-``in_stride`` map runs as patch blocks: volumes only (2-D keeps its
    gather-GEMM unchanged), ungrouped convs, patches of at least ``MIN_BLOCK_SIDE`` sites that the conv's stride
    divides."""
    side = context.patch_size // in_stride
    return (context.spatial_dims == 3 and spec.groups == 1 and side >= MIN_BLOCK_SIDE
            and side % spec.stride == 0)


def block_table(context: MaskContext, in_stride: int, spec: ConvSpec) -> torch.Tensor:
    """``(P, b**3)`` long: for each visible patch (row-major ``(batch, z, y, x)`` order), the input row read at each
    site of its block of side ``b = p + 2 * padding``, or ``N_in`` (one past the last row) where that site is masked
    or outside the volume."""

    def make():
        side, halo = context.patch_size // in_stride, spec.padding
        block = side + 2 * halo
        rows = context.row_index(in_stride)  # (B, D, H, W), -1 where masked
        n_in = int((rows >= 0).sum())
        padded = F.pad(rows, (halo, halo) * 3, value=-1)
        windows = padded.unfold(1, block, side).unfold(2, block, side).unfold(3, block, side)  # (B, gz, gy, gx, b^3)
        table = windows[context.mask].reshape(-1, block ** 3)
        return torch.where(table < 0, torch.full_like(table, n_in), table)

    return context.cached(("block_table", in_stride, spec.kernel, spec.stride, spec.padding), make)


def block_order(context: MaskContext, out_stride: int) -> torch.Tensor:
    """``(N_out,)`` long: for each output row (row-major ``(batch, z, y, x)``), its position in the flattened
    ``(P, q, q, q)`` block outputs, ``q = patch_size / out_stride``."""

    def make():
        side = context.patch_size // out_stride
        coords = context.coords(out_stride)
        patch = context.row_index(context.patch_size)[
            coords[:, 0], coords[:, 1] // side, coords[:, 2] // side, coords[:, 3] // side]
        within = ((coords[:, 1] % side) * side + coords[:, 2] % side) * side + coords[:, 3] % side
        return patch * side ** 3 + within

    return context.cached(("block_order", out_stride), make)


def _blocks(features: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """``(N, C)`` rows -> ``(P, C, b, b, b)`` blocks in channels-last memory (a view of ``(P, b, b, b, C)``)."""
    padded = torch.cat([features, features.new_zeros(1, features.shape[1])])
    side = round(table.shape[1] ** (1 / 3))
    return padded.index_select(0, table.view(-1)).view(table.shape[0], side, side, side, -1).permute(0, 4, 1, 2, 3)


def _compute_dtype(features: torch.Tensor) -> torch.dtype:
    """The dtype autocast would give a conv here (bf16/fp16 inside autocast; else the rows' own)."""
    device = features.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else features.dtype


class _BlockConv(torch.autograd.Function):
    @staticmethod
    def forward(ctx, features, table, order, weight, stride: int):
        dtype = _compute_dtype(features)
        ctx.stride, ctx.dtype = stride, dtype
        ctx.save_for_backward(features, table, order, weight)
        with torch.autocast(features.device.type, enabled=False):
            out = F.conv3d(_blocks(features.to(dtype), table), weight.to(dtype), stride=stride)
        rows = out.permute(0, 2, 3, 4, 1).reshape(-1, out.shape[1])  # (P*q^3, C_out), block order
        return rows.index_select(0, order)

    @staticmethod
    def backward(ctx, grad_out):
        features, table, order, weight = ctx.saved_tensors
        n_blocks, c_out = table.shape[0], weight.shape[0]
        side = round((order.numel() // n_blocks) ** (1 / 3))
        grad_rows = grad_out.to(ctx.dtype).new_empty(n_blocks * side ** 3, c_out)
        grad_rows.index_copy_(0, order, grad_out.to(ctx.dtype))  # every block site is an output row: a permutation
        grad_blocks = grad_rows.view(n_blocks, side, side, side, c_out).permute(0, 4, 1, 2, 3)
        blocks = _blocks(features.to(ctx.dtype), table)
        grad_in, grad_weight, _ = torch.ops.aten.convolution_backward(
            grad_blocks, blocks, weight.to(ctx.dtype), None, [ctx.stride] * 3, [0] * 3, [1] * 3, False, [0] * 3, 1,
            [ctx.needs_input_grad[0], ctx.needs_input_grad[3], False],
        )
        grad_features = None
        if grad_in is not None:
            # Halos overlap the neighbouring blocks: sum every block site's gradient into the row it read.
            columns = grad_in.permute(0, 2, 3, 4, 1).reshape(-1, features.shape[1])
            padded = columns.new_zeros(features.shape[0] + 1, features.shape[1])
            grad_features = padded.index_add_(0, table.view(-1), columns)[:-1].to(features.dtype)
        grad_weight = None if grad_weight is None else grad_weight.to(weight.dtype)
        return grad_features, None, None, grad_weight, None


def block_conv(features: torch.Tensor, context: MaskContext, in_stride: int, weight: torch.Tensor,
               spec: ConvSpec) -> torch.Tensor:
    """Submanifold or strided conv of a volume's visible rows, patch block by patch block.

    Args:
        features: ``(N_in, C_in)`` rows of the stride-``in_stride`` map, row-major ``(batch, z, y, x)``.
        context: the forward pass's ``MaskContext`` (``uses_blocks`` true for this conv).
        weight: ``(C_out, C_in, k, k, k)``.
        spec: the conv's ``ConvSpec`` (ungrouped).

    Returns:
        ``(N_out, C_out)`` rows of the stride-``in_stride * spec.stride`` map, without bias.
    """
    table = block_table(context, in_stride, spec)
    order = block_order(context, in_stride * spec.stride)
    return _BlockConv.apply(features.contiguous(), table, order, weight, spec.stride)
