"""SparK's light UNet decoder: from the stride-32 map up to full resolution (images, or volumes with
``spatial_dims=3``: the same blocks with ``ConvTranspose3d`` / ``Conv3d`` / ``BatchNorm3d``)."""

from __future__ import annotations

import torch
from torch import nn

# The layers of each spatial dimension: (transposed conv, conv, batch norm).
LAYERS = {2: (nn.ConvTranspose2d, nn.Conv2d, nn.BatchNorm2d), 3: (nn.ConvTranspose3d, nn.Conv3d, nn.BatchNorm3d)}


class UpBlock(nn.Module):
    """x2 up-sampling (ConvTranspose 4x4 s2) then two 3x3 conv/BN with ReLU6 between: ``(B, C_in, h, w)`` ->
    ``(B, C_out, 2h, 2w)`` (every side doubled; 4x4x4 and 3x3x3 kernels for volumes)."""

    def __init__(self, in_channels: int, out_channels: int, spatial_dims: int = 2):
        super().__init__()
        transposed, conv, norm = LAYERS[spatial_dims]
        self.up = transposed(in_channels, in_channels, kernel_size=4, stride=2, padding=1, bias=True)
        self.conv = nn.Sequential(
            conv(in_channels, in_channels, 3, padding=1, bias=False), norm(in_channels), nn.ReLU6(),
            conv(in_channels, out_channels, 3, padding=1, bias=False), norm(out_channels),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(self.up(x))


class LightDecoder(nn.Module):
    """Widths ``width, width/2, ...`` over log2(patch) up-sampling blocks (5 for 32), then a 1x1 conv to the input's
    channels (3 for images; ``out_channels`` for volumes: CT 1, multi-sequence MRI more).

    ``forward(features)`` takes the densified maps from the smallest (stride 32) to the largest (stride 4), each
    with the width of the block it enters, and returns ``(B, out_channels, H, W)`` (``(B, out_channels, D, H, W)``).
    """

    def __init__(self, width: int = 768, num_blocks: int = 5, out_channels: int = 3, spatial_dims: int = 2):
        super().__init__()
        self.widths = [width // 2**i for i in range(num_blocks + 1)]
        if self.widths[-1] < 1:
            raise ValueError(f"decoder width {width} is too small for {num_blocks} halvings")
        self.blocks = nn.ModuleList(UpBlock(c_in, c_out, spatial_dims)
                                    for c_in, c_out in zip(self.widths[:-1], self.widths[1:]))
        self.proj = LAYERS[spatial_dims][1](self.widths[-1], out_channels, kernel_size=1)
        self.apply(_init_weights)

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        x = 0
        for i, block in enumerate(self.blocks):
            if i < len(features):
                x = x + features[i]
            x = block(x)
        return self.proj(x)


def _init_weights(module: nn.Module) -> None:
    """SparK's ``LightDecoder.initialize``: truncated normal (std 0.02, cut at +-2, i.e. in effect untruncated) for
    ``Conv2d`` (the 3x3 convs and the final 1x1 projection), kaiming fan-out for the ``ConvTranspose2d`` up-samplers
    only, zero biases, norms at weight 1 / bias 0 (the same rules for their 3-D kinds).

    The small projection matters: with kaiming fan-out it would start 40-50x larger and the loss at initialisation
    would be ~12 instead of SparK's ~1 (the prediction ~0 of a per-patch-normalised target).
    """
    if isinstance(module, (nn.Conv2d, nn.Conv3d, nn.Linear)):
        nn.init.trunc_normal_(module.weight, std=0.02)
    elif isinstance(module, (nn.ConvTranspose2d, nn.ConvTranspose3d)):
        nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
    elif isinstance(module, (nn.BatchNorm2d, nn.BatchNorm3d, nn.LayerNorm)):
        nn.init.ones_(module.weight)
    else:
        return
    if module.bias is not None:
        nn.init.zeros_(module.bias)
