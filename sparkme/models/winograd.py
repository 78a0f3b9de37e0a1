"""Winograd convolution F(m x m, 3 x 3) for the dense half on CPU: the same 3x3 'same' convolution as
``F.conv2d(x, w, padding=1)`` with (m + 2)^2 / (9 m^2) of its multiplications (F(4x4): 1/4, F(2x2): 4/9).

oneDNN runs PyTorch's CPU convolutions with direct kernels only; at the decoder's widths (96-768 channels) the
direct kernels are already near the core's peak, so fewer multiplications is the one way left to make the dense
half faster in float32. The algorithm (Lavin & Gray, "Fast Algorithms for Convolutional Neural Networks", 2016):

    Y = A^T [ (G g G^T) (.) (B^T d B) ] A          per m x m output tile, d its (m+2) x (m+2) input window

The elementwise product summed over input channels is ``(m+2)^2`` independent GEMMs ``(tiles x C) @ (C x K)``
(``torch.bmm``). The transforms of the inputs and outputs are short sums of strided views of channels-last
tensors (coefficients 0, +-1, +-2, ...), written as explicit autograd Functions so that their backward passes are the
transposed sums, accumulated in place, instead of autograd's one zero-filled copy per strided view.

Rounding differs from the direct convolution (F(4x4) ~1e-5 of the output's scale in float32, F(2x2) ~3e-6; in
float64 both agree to ~1e-13): the same function, other float arithmetic, as cuDNN's Winograd kernels on GPUs.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F


@dataclasses.dataclass(frozen=True)
class WinogradTile:
    """The transforms of F(m x m, 3 x 3): ``input_t`` B^T (a x a), ``filter_t`` G (a x 3), ``output_t`` A^T (m x a),
    with a = m + 2 the input window."""

    m: int
    input_t: tuple[tuple[float, ...], ...]
    filter_t: tuple[tuple[float, ...], ...]
    output_t: tuple[tuple[float, ...], ...]

    @property
    def window(self) -> int:
        return self.m + 2


# Interpolation points 0, 1, -1, infinity.
F2X2_3X3 = WinogradTile(
    m=2,
    input_t=((1, 0, -1, 0), (0, 1, 1, 0), (0, -1, 1, 0), (0, 1, 0, -1)),
    filter_t=((1, 0, 0), (0.5, 0.5, 0.5), (0.5, -0.5, 0.5), (0, 0, 1)),
    output_t=((1, 1, 1, 0), (0, 1, -1, -1)),
)
# Interpolation points 0, 1, -1, 2, -2, infinity.
F4X4_3X3 = WinogradTile(
    m=4,
    input_t=((4, 0, -5, 0, 1, 0), (0, -4, -4, 1, 1, 0), (0, 4, -4, -1, 1, 0), (0, -2, -1, 2, 1, 0),
             (0, 2, -1, -2, 1, 0), (0, 4, 0, -5, 0, 1)),
    filter_t=((1 / 4, 0, 0), (-1 / 6, -1 / 6, -1 / 6), (-1 / 6, 1 / 6, -1 / 6), (1 / 24, 1 / 12, 1 / 6),
              (1 / 24, -1 / 12, 1 / 6), (0, 0, 1)),
    output_t=((1, 1, 1, 1, 1, 0), (0, 1, -1, 2, -2, 0), (0, 1, 1, 4, 4, 0), (0, 1, -1, 8, -8, 1)),
)
TILES = {"f2x2": F2X2_3X3, "f4x4": F4X4_3X3}


def winograd_conv3x3(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                     tile: WinogradTile = F4X4_3X3) -> torch.Tensor:
    """``F.conv2d(x, weight, bias, padding=1)`` by Winograd F(m x m, 3 x 3).

    Args:
        x: ``(B, C, H, W)``; read channels-last (a channels-last ``x`` is not copied before the padding).
        weight: ``(K, C, 3, 3)``.
        bias: ``(K,)`` or None.
        tile: F(2x2, 3x3) or F(4x4, 3x3).

    Returns:
        ``(B, K, H, W)`` in channels-last memory format.
    """
    batch, channels, height, width = x.shape
    out_channels = weight.shape[0]
    m, a = tile.m, tile.window
    tiles_h, tiles_w = -(-height // m), -(-width // m)
    # Zero padding: 1 on top/left as the convolution's, enough at the bottom/right for whole tiles.
    padded = F.pad(x.permute(0, 2, 3, 1), (0, 0, 1, tiles_w * m + 1 - width, 1, tiles_h * m + 1 - height))
    inputs = _InputTransform.apply(padded, tile)  # (a, a, B, th, tw, C)
    filters = _filter_transform(weight, tile)  # (a*a, C, K)
    products = torch.bmm(inputs.view(a * a, -1, channels), filters)  # (a*a, B*th*tw, K)
    y = _OutputTransform.apply(products.view(a, a, batch, tiles_h, tiles_w, out_channels), tile)
    y = y.view(batch, tiles_h * m, tiles_w * m, out_channels)
    if tiles_h * m != height or tiles_w * m != width:
        y = y[:, :height, :width].contiguous()
    if bias is not None:
        y = y + bias
    return y.permute(0, 3, 1, 2)


def _filter_transform(weight: torch.Tensor, tile: WinogradTile) -> torch.Tensor:
    """``(K, C, 3, 3)`` -> ``(a*a, C, K)``: G g G^T of every filter, as one small GEMM (autograd's own backward)."""
    out_channels, channels = weight.shape[:2]
    g = torch.tensor(tile.filter_t, dtype=weight.dtype, device=weight.device)
    flat = weight.permute(2, 3, 1, 0).reshape(9, channels * out_channels)
    return (torch.kron(g, g) @ flat).view(tile.window**2, channels, out_channels)


def _combine(out: torch.Tensor, terms: list[tuple[float, torch.Tensor]]) -> torch.Tensor:
    """``out = sum(c * t)`` over the nonzero coefficients, without temporaries."""
    (c0, t0), rest = terms[0], terms[1:]
    if c0 == 1:
        out.copy_(t0)
    else:
        torch.mul(t0, c0, out=out)
    for c, t in rest:
        out.add_(t, alpha=c)
    return out


def _nonzero(row: tuple[float, ...]) -> list[tuple[int, float]]:
    return [(k, c) for k, c in enumerate(row) if c != 0]


def _strided(x: torch.Tensor, dim: int, start: int, count: int, step: int) -> torch.Tensor:
    """``count`` slices of ``x`` along ``dim`` from ``start`` every ``step`` (a view)."""
    return x.narrow(dim, start, step * (count - 1) + 1)[(slice(None),) * dim + (slice(None, None, step),)]


class _InputTransform(torch.autograd.Function):
    """``(B, Hp, Wp, C)`` padded input -> ``(a, a, B, th, tw, C)``: B^T d B of every tile window (stride m)."""

    @staticmethod
    def forward(ctx, padded: torch.Tensor, tile: WinogradTile) -> torch.Tensor:
        m, a = tile.m, tile.window
        batch, height, width, channels = padded.shape
        tiles_h, tiles_w = (height - 2) // m, (width - 2) // m
        ctx.tile, ctx.shape = tile, padded.shape
        rows = padded.new_empty(a, batch, tiles_h, width, channels)
        for i, row in enumerate(tile.input_t):  # along H
            _combine(rows[i], [(c, _strided(padded, 1, k, tiles_h, m)) for k, c in _nonzero(row)])
        out = padded.new_empty(a, a, batch, tiles_h, tiles_w, channels)
        for j, row in enumerate(tile.input_t):  # along W
            _combine(out[:, j], [(c, _strided(rows, 3, k, tiles_w, m)) for k, c in _nonzero(row)])
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        tile, (batch, height, width, channels) = ctx.tile, ctx.shape
        m, a = tile.m, tile.window
        tiles_h, tiles_w = grad.shape[3], grad.shape[4]
        grad_rows = grad.new_zeros(a, batch, tiles_h, width, channels)
        for j, row in enumerate(tile.input_t):
            for k, c in _nonzero(row):
                _strided(grad_rows, 3, k, tiles_w, m).add_(grad[:, j], alpha=c)
        grad_padded = grad.new_zeros(batch, height, width, channels)
        for i, row in enumerate(tile.input_t):
            for k, c in _nonzero(row):
                _strided(grad_padded, 1, k, tiles_h, m).add_(grad_rows[i], alpha=c)
        return grad_padded, None


class _OutputTransform(torch.autograd.Function):
    """``(a, a, B, th, tw, K)`` -> ``(B, th, m, tw, m, K)``: A^T M A of every tile, i.e. the output's m x m tiles."""

    @staticmethod
    def forward(ctx, products: torch.Tensor, tile: WinogradTile) -> torch.Tensor:
        m = tile.m
        _, a, batch, tiles_h, tiles_w, channels = products.shape
        ctx.tile = tile
        rows = products.new_empty(m, a, batch, tiles_h, tiles_w, channels)
        for u, row in enumerate(tile.output_t):  # along H
            _combine(rows[u], [(c, products[i]) for i, c in _nonzero(row)])
        out = products.new_empty(batch, tiles_h, m, tiles_w, m, channels)
        for u in range(m):
            for v, row in enumerate(tile.output_t):  # along W
                _combine(out[:, :, u, :, v], [(c, rows[u, j]) for j, c in _nonzero(row)])
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        tile = ctx.tile
        m, a = tile.m, tile.window
        batch, tiles_h, _, tiles_w, _, channels = grad.shape
        grad_rows = grad.new_zeros(m, a, batch, tiles_h, tiles_w, channels)
        for u in range(m):
            for v, row in enumerate(tile.output_t):
                for j, c in _nonzero(row):
                    grad_rows[u, j].add_(grad[:, :, u, :, v], alpha=c)
        grad_products = grad.new_zeros(a, a, batch, tiles_h, tiles_w, channels)
        for u, row in enumerate(tile.output_t):
            for i, c in _nonzero(row):
                grad_products[i].add_(grad_rows[u], alpha=c)
        return grad_products, None


CONV_ALGORITHMS = ("auto", "direct", "f2x2", "f4x4")


class Conv3x3(torch.nn.Conv2d):
    """``nn.Conv2d(in, out, 3, padding=1)`` of the dense half that may run by Winograd (same parameters, same
    state_dict keys, same function).

    Attributes:
        algorithm: ``auto`` (Winograd where it measured faster on CPU, see ``winograd_tile``), ``direct``
            (``F.conv2d``), ``f2x2`` or ``f4x4`` (forced, float CPU tensors only).
    """

    def __init__(self, in_channels: int, out_channels: int, bias: bool = True):
        super().__init__(in_channels, out_channels, 3, padding=1, bias=bias)
        self.algorithm = "auto"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tile = winograd_tile(self.algorithm, x, self.in_channels, self.out_channels)
        if tile is None:
            return super().forward(x)
        return winograd_conv3x3(x, self.weight, self.bias, tile)


def winograd_tile(algorithm: str, x: torch.Tensor, in_channels: int, out_channels: int) -> WinogradTile | None:
    """The Winograd tile to run a 3x3 conv of ``x`` with, or None for the direct convolution.

    ``auto`` follows the per-layer measurements of the paper decoder's and densify's shapes on a 1-thread AVX-512
    CPU (forward + backward, batch 8, ``docs/bench/levers.md``): F(4x4) pays from 384 -> 192 channels on maps of 28
    and more (1.3-1.6x), F(2x2) from 768 -> 384 on smaller maps (1.1-1.2x); on narrower layers the transforms' memory
    traffic costs more than the saved multiplications. CUDA (cuDNN picks its own Winograd kernels), autocast and
    non-float inputs run directly.
    """
    if algorithm not in CONV_ALGORITHMS:
        raise ValueError(f"conv algorithm must be one of {', '.join(CONV_ALGORITHMS)}, got {algorithm!r}")
    if (algorithm == "direct" or x.device.type != "cpu" or x.dtype not in (torch.float32, torch.float64)
            or torch.is_autocast_enabled("cpu")):
        return None
    if algorithm != "auto":
        return TILES[algorithm]
    size = min(x.shape[-2:])
    if in_channels >= 384 and out_channels >= 192 and size >= 28:
        return F4X4_3X3
    if in_channels >= 768 and out_channels >= 384:
        return F2X2_3X3
    return None
