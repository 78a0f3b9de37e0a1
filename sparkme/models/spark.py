"""SparK: sparse masked modeling with hierarchical decoding for ConvNets (Tian et al., ICLR 2023).

``loss = model(images)`` samples a patch mask, encodes the visible patches sparsely, densifies each of the 4
feature scales (normalise the visible features, fill masked sites with a learned mask token, project), decodes
with a light UNet and returns the per-patch-normalised pixel MSE averaged over the **masked** patches.

Volumes run the same model with ``spatial_dims=3``: ``(B, C, D, H, W)`` inputs, cubic patches of the encoder's total
stride (so every stage sees a mask grid no finer than its own map: no stage runs dense), the input masked before the
first convolution (the encoder reads visible voxels only), 3-D densify and decoder.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from sparkme.masking import PATCH_SIZE, check_grid_size, check_mask_ratio, random_grid_mask, upsample_mask
from sparkme.models.backbones import create_backbone
from sparkme.models.decoder import LightDecoder
from sparkme.models.encoder import SparseEncoder
from sparkme.models.volumes import create_volume_backbone, is_volume_model, volume_feature_levels, volume_model
from sparkme.models.weights import WeightsReport, load_weights
from sparkme.sparse import ops
from sparkme.sparse.base import SparseMap

NORM_PIX_EPS = 1e-6
LOSSES = ("norm_pix", "mse")  # SparK's per-patch normalised MSE; plain MSE (nnssl's), both over masked patches
DENSIFY_NORMS = ("bn", "ln", "in")


class Densify(nn.Module):
    """One scale: normalise visible features (BN, LN, or a sparse per-sample instance norm), fill masked sites with
    a mask token, project.

    ``forward(sparse map with C_enc channels)`` -> ``(B, C_dec, h, w)`` (``(B, C_dec, d, h, w)``) dense.
    """

    def __init__(self, enc_channels: int, dec_channels: int, norm: str, kernel_size: int, spatial_dims: int = 2):
        super().__init__()
        if norm not in DENSIFY_NORMS:
            raise ValueError(f"densify norm must be one of {', '.join(DENSIFY_NORMS)}, got {norm!r}")
        if norm == "bn":
            self.norm = nn.BatchNorm3d(enc_channels) if spatial_dims == 3 else nn.BatchNorm2d(enc_channels)
        elif norm == "in":
            self.norm = nn.InstanceNorm3d(enc_channels, affine=True)  # per sample, over its visible sites
        else:
            self.norm = nn.LayerNorm(enc_channels, eps=1e-6)
        self.mask_token = nn.Parameter(torch.zeros(enc_channels))
        nn.init.trunc_normal_(self.mask_token, std=0.02, a=-0.02, b=0.02)
        if kernel_size == 1 and enc_channels == dec_channels:
            self.proj = nn.Identity()
        else:
            conv = nn.Conv3d if spatial_dims == 3 else nn.Conv2d
            self.proj = conv(enc_channels, dec_channels, kernel_size, padding=kernel_size // 2, bias=True)

    def forward(self, x: SparseMap, memory_format: torch.memory_format = torch.contiguous_format) -> torch.Tensor:
        # _BatchNorm: SyncBatchNorm too (trainer.sync_bn converts the densify norms along with the encoder's)
        if isinstance(self.norm, nn.modules.batchnorm._BatchNorm):
            x = ops.batch_norm(x, self.norm)
        elif isinstance(self.norm, nn.modules.instancenorm._InstanceNorm):
            x = ops.instance_norm(x, self.norm)
        else:
            x = ops.layer_norm(x, self.norm)
        return self.proj(x.to_dense(fill=self.mask_token).contiguous(memory_format=memory_format))


DENSE_LAYOUTS = ("auto", "channels_last", "contiguous")


def dense_memory_format(layout: str, device: torch.device, spatial_dims: int = 2) -> torch.memory_format:
    """Memory format of the dense half (densify projections, decoder). ``auto``: channels-last on CPU, where
    oneDNN's NHWC convolutions run the decoder step ~1.2x faster (sparkme-bench), and on CUDA under autocast, where
    tensor-core kernels are NHWC; contiguous for float32 CUDA (not measured here). Values are equal either way.
    Volumes use the 3-D channels-last format (NDHWC)."""
    if layout not in DENSE_LAYOUTS:
        raise ValueError(f"dense layout must be one of {', '.join(DENSE_LAYOUTS)}, got {layout!r}")
    if layout == "auto":
        fast = device.type == "cpu" or torch.is_autocast_enabled(device.type)
        layout = "channels_last" if fast else "contiguous"
    if layout != "channels_last":
        return torch.contiguous_format
    return torch.channels_last_3d if spatial_dims == 3 else torch.channels_last


def patchify(images: torch.Tensor, patch_size: int = PATCH_SIZE) -> torch.Tensor:
    """``(B, C, H, W)`` -> ``(B, L, p*p*C)`` with L = (H/p)(W/p) patches in row-major order (volumes:
    ``(B, C, D, H, W)`` -> ``(B, L, p*p*p*C)``)."""
    b, c, *sides = images.shape
    grid = [side // patch_size for side in sides]
    dims = len(sides)
    x = images.reshape(b, c, *[n for g in grid for n in (g, patch_size)])
    order = [0, *range(2, 2 + 2 * dims, 2), *range(3, 3 + 2 * dims, 2), 1]  # (B, grid..., patch..., C)
    return x.permute(*order).reshape(b, math.prod(grid), patch_size ** dims * c)


def unpatchify(patches: torch.Tensor, h: int, w: int, patch_size: int = PATCH_SIZE) -> torch.Tensor:
    """Inverse of ``patchify``: ``(B, L, p*p*C)`` -> ``(B, C, h*p, w*p)``."""
    return unpatchify_grid(patches, (h, w), patch_size)


def unpatchify_grid(patches: torch.Tensor, grid: tuple[int, ...], patch_size: int = PATCH_SIZE) -> torch.Tensor:
    """Inverse of ``patchify`` for a patch grid of any dimension: ``(B, L, p**D * C)`` -> ``(B, C, *grid * p)``."""
    b, dims = patches.shape[0], len(grid)
    x = patches.reshape(b, *grid, *[patch_size] * dims, -1)
    order = [0, 2 * dims + 1, *[axis for i in range(dims) for axis in (1 + i, 1 + dims + i)]]
    return x.permute(*order).reshape(b, -1, *[g * patch_size for g in grid])


def spark_loss(images: torch.Tensor, reconstruction: torch.Tensor, mask: torch.Tensor,
               patch_size: int = PATCH_SIZE, loss: str = "norm_pix") -> torch.Tensor:
    """Per-patch normalised pixel MSE over masked patches (``loss="mse"``: plain MSE over the masked patches'
    voxels, as nnssl).

    Args:
        images: ``(B, 3, H, W)`` input (already mean/std normalised); volumes ``(B, C, D, H, W)``.
        reconstruction: ``(B, 3, H, W)`` decoder output (the input's shape).
        mask: ``(B, h, w)`` (``(B, d, h, w)``) bool, True = visible; the loss averages over the False (masked)
            patches.
        patch_size: the side of one mask cell in pixels (voxels).
    """
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {', '.join(LOSSES)}, got {loss!r}")
    target = patchify(images, patch_size)
    if loss == "norm_pix":
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)
        target = (target - mean) / (var + NORM_PIX_EPS).sqrt()
    per_patch = (patchify(reconstruction, patch_size) - target).pow(2).mean(dim=-1)  # (B, L)
    hidden = (~mask).flatten(1).to(per_patch.dtype)
    return (per_patch * hidden).sum() / hidden.sum().clamp_min(1.0)


class SparK(nn.Module):
    """Sparse encoder + densify + light decoder + masked-patch loss.

    Args:
        encoder: a ``SparseEncoder`` (any backend).
        decoder: a ``LightDecoder`` whose first 4 widths receive the stride 32, 16, 8, 4 maps (the encoder's
            feature levels, deepest first: block i runs at stride ``patch_size / 2**i``).
        mask_ratio: fraction of patches hidden when ``forward`` samples the mask.
        loss: ``norm_pix`` (SparK's per-patch normalised MSE) or ``mse`` (plain MSE), both over masked patches.

    Attributes:
        dense_layout: memory format of the dense half, one of ``DENSE_LAYOUTS`` (see ``dense_memory_format``).
        dense_autocast: None (default: the caller's precision) or a dtype, e.g. ``torch.bfloat16``, to run densify
            and the decoder alone under autocast (opt-in: it changes the maths; the sparse encoder stays exact).
    """

    def __init__(self, encoder: SparseEncoder, decoder: LightDecoder, mask_ratio: float = 0.6,
                 loss: str = "norm_pix"):
        super().__init__()
        if loss not in LOSSES:
            raise ValueError(f"loss must be one of {', '.join(LOSSES)}, got {loss!r}")
        self.encoder = encoder
        self.decoder = decoder
        self.mask_ratio = check_mask_ratio(mask_ratio)
        self.loss = loss
        self.patch_size = encoder.patch_size
        self.spatial_dims = encoder.spatial_dims
        levels = list(reversed(encoder.feature_info))  # stride 32 first
        expected = [self.patch_size // 2**i for i in range(len(levels))]
        if [level["reduction"] for level in levels] != expected:
            raise ValueError(f"feature levels at strides {[level['reduction'] for level in levels]} do not match the "
                             f"decoder's {expected} (deepest first)")
        self.densify = nn.ModuleList(
            Densify(level["num_chs"], c_dec, encoder.densify_norm, kernel_size=1 if i == 0 else 3,
                    spatial_dims=self.spatial_dims)
            for i, (level, c_dec) in enumerate(zip(levels, decoder.widths))
        )
        self.dense_layout = "auto"
        self.dense_autocast: torch.dtype | None = None

    def sample_mask(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """``(B, H/32, W/32)`` bool, True = visible, with ``round(h*w*(1-mask_ratio))`` visible per image (volumes:
        ``(B, D/p, H/p, W/p)`` with p = ``patch_size``)."""
        grid = check_grid_size(tuple(images.shape[2:]), self.patch_size)
        return random_grid_mask(images.shape[0], grid, self.mask_ratio, generator=generator, device=images.device)

    def reconstruct_normalised(self, images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Decoder output ``(B, 3, H, W)`` (the input's shape) in per-patch-normalised units (input units for
        ``loss="mse"``)."""
        features = self.encoder.forward_sparse(images, mask)  # strides 4, 8, 16, 32
        layout = dense_memory_format(self.dense_layout, images.device, self.spatial_dims)
        if self.dense_autocast is None:
            return self.decoder([densify(f, layout) for densify, f in zip(self.densify, reversed(features))])
        with torch.autocast(images.device.type, dtype=self.dense_autocast):
            out = self.decoder([densify(f, layout) for densify, f in zip(self.densify, reversed(features))])
        return out.to(images.dtype)

    def forward(self, images: torch.Tensor, mask: torch.Tensor | None = None,
                generator: torch.Generator | None = None) -> torch.Tensor:
        """Scalar SparK loss; a random mask is sampled when ``mask`` is None."""
        if mask is None:
            mask = self.sample_mask(images, generator)
        return spark_loss(images, self.reconstruct_normalised(images, mask), mask, self.patch_size, self.loss)

    def load_weights(self, source: str | dict) -> WeightsReport:
        """Load weights only from a path or a loaded dict: a sparkme checkpoint, SparK's released files (with the
        decoder, or the encoder alone: ``*_timm_style``, ``*_official_style``) or a timm / torchvision backbone state
        dict. Returns what was loaded, kept and ignored; see ``sparkme.models.weights``."""
        return load_weights(self, source)

    @torch.no_grad()
    def reconstruct(self, images: torch.Tensor, mask: torch.Tensor | None = None,
                    generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Pictures in the input's units: (original, masked input, reconstruction with visible patches pasted).

        The per-patch normalisation is undone with each patch's own mean/std, as in SparK's visualisation.
        """
        if mask is None:
            mask = self.sample_mask(images, generator)
        output = self.reconstruct_normalised(images, mask)
        if self.loss == "norm_pix":
            target = patchify(images, self.patch_size)
            mean, std = target.mean(-1, keepdim=True), (target.var(-1, keepdim=True) + NORM_PIX_EPS).sqrt()
            output = unpatchify_grid(patchify(output, self.patch_size) * std + mean, mask.shape[1:], self.patch_size)
        pixel_mask = upsample_mask(mask, self.patch_size)[:, None]
        return images, images * pixel_mask, torch.where(pixel_mask, images, output)


def build_spark(model_name: str, backend: str = "minkowski", source: str = "timm",
                drop_path_rate: float | None = None, decoder_width: int = 768, mask_ratio: float = 0.6,
                in_chans: int | None = None, loss: str = "norm_pix") -> SparK:
    """SparK around a freshly initialised backbone ``model_name`` on sparse ``backend``: the main entry point.

    The backbone (timm, or torchvision for its ResNets) is converted into a ``SparseEncoder`` that convolves only
    the visible patches; SparK's densify layers (per-scale norm, mask token, projection) and ``LightDecoder`` (a
    light UNet) are added on top. Calling the model on ``(B, 3, H, W)`` images (H, W multiples of 32) samples a
    mask at ``mask_ratio`` and returns SparK's loss; ``model(images, mask)`` takes a ``(B, H/32, W/32)`` bool mask
    (True = visible); ``model.encoder.to_dense()`` gives the plain backbone back, strict-loadable.

    Args:
        model_name: a timm name of a supported family (``sparkme.models.families``), e.g. ``"resnet50"``,
            ``"convnext_small"``.
        backend: ``"minkowski"``, ``"torch"`` (fastest on a CPU, needs only torch) or ``"masked"`` (SparK's
            dense-times-mask formulation); all compute the same numbers.
        source: ``"timm"`` or ``"torchvision"`` (ResNets).
        drop_path_rate: stochastic depth; None takes SparK's pretraining rate for the model (0 for models SparK
            never trained).
        decoder_width: channels of the decoder's first block (SparK: 768), halved at every up-sampling.
        mask_ratio: fraction of 32x32 patches hidden when the model samples the mask (SparK: 0.6).
        in_chans: input channels of a 3-D model (default 1); 2-D models take 3.
        loss: ``"norm_pix"`` (SparK's per-patch normalised MSE) or ``"mse"``, both over masked patches.

    A 3-D model name (``sparkme.models.volumes.VOLUME_MODELS``: ``resenc_l``, ``resenc_tiny``, ``monai_resnet18``,
    ...) builds SparK for volumes ``(B, in_chans, D, H, W)`` (``in_chans`` default 1); 2-D models take 3 channels.

    Example:
        >>> model = build_spark("resnet50", backend="torch")
        >>> loss = model(torch.rand(2, 3, 224, 224))   # scalar; loss.backward() trains encoder and decoder
    """
    if is_volume_model(model_name):
        channels = 1 if in_chans is None else int(in_chans)
        dense = create_volume_backbone(model_name, in_chans=channels)
        config = volume_model(model_name)
        levels = volume_feature_levels(model_name, dense)
        patch = levels[-1]["reduction"]
        encoder = SparseEncoder(dense, backend=backend, levels=levels, densify_norm=config.densify_norm,
                                patch_size=patch, spatial_dims=3)
        decoder = LightDecoder(decoder_width, num_blocks=patch.bit_length() - 1, out_channels=channels, spatial_dims=3)
        return SparK(encoder, decoder, mask_ratio=mask_ratio, loss=loss)
    if in_chans not in (None, 3):
        raise ValueError(f"2-D models take 3-channel images, got in_chans={in_chans}")
    encoder = SparseEncoder.from_dense(create_backbone(model_name, source, drop_path_rate), backend=backend)
    return SparK(encoder, LightDecoder(decoder_width), mask_ratio=mask_ratio, loss=loss)
