"""SparK: sparse masked modeling with hierarchical decoding for ConvNets (Tian et al., ICLR 2023).

``loss = model(images)`` samples a patch mask, encodes the visible patches sparsely, densifies each of the 4
feature scales (normalise the visible features, fill masked sites with a learned mask token, project), decodes
with a light UNet and returns the per-patch-normalised pixel MSE averaged over the **masked** patches.
"""

from __future__ import annotations

import torch
from torch import nn

from sparkme.masking import PATCH_SIZE, check_image_size, check_mask_ratio, random_mask
from sparkme.models.backbones import create_backbone
from sparkme.models.decoder import LightDecoder
from sparkme.models.encoder import SparseEncoder
from sparkme.models.weights import WeightsReport, load_weights
from sparkme.sparse import ops
from sparkme.sparse.base import SparseMap

NORM_PIX_EPS = 1e-6


class Densify(nn.Module):
    """One scale: normalise visible features (BN or LN), fill masked sites with a mask token, project.

    ``forward(sparse map with C_enc channels)`` -> ``(B, C_dec, h, w)`` dense.
    """

    def __init__(self, enc_channels: int, dec_channels: int, norm: str, kernel_size: int):
        super().__init__()
        if norm not in ("bn", "ln"):
            raise ValueError(f"densify norm must be 'bn' or 'ln', got {norm!r}")
        self.norm = nn.BatchNorm2d(enc_channels) if norm == "bn" else nn.LayerNorm(enc_channels, eps=1e-6)
        self.mask_token = nn.Parameter(torch.zeros(enc_channels))
        nn.init.trunc_normal_(self.mask_token, std=0.02, a=-0.02, b=0.02)
        if kernel_size == 1 and enc_channels == dec_channels:
            self.proj = nn.Identity()
        else:
            self.proj = nn.Conv2d(enc_channels, dec_channels, kernel_size, padding=kernel_size // 2, bias=True)

    def forward(self, x: SparseMap, memory_format: torch.memory_format = torch.contiguous_format) -> torch.Tensor:
        # _BatchNorm: SyncBatchNorm too (trainer.sync_bn converts the densify norms along with the encoder's)
        batch_norm = isinstance(self.norm, nn.modules.batchnorm._BatchNorm)
        x = ops.batch_norm(x, self.norm) if batch_norm else ops.layer_norm(x, self.norm)
        return self.proj(x.to_dense(fill=self.mask_token).contiguous(memory_format=memory_format))


DENSE_LAYOUTS = ("auto", "channels_last", "contiguous")


def dense_memory_format(layout: str, device: torch.device) -> torch.memory_format:
    """Memory format of the dense half (densify projections, decoder). ``auto``: channels-last on CPU, where
    oneDNN's NHWC convolutions run the decoder step ~1.2x faster (sparkme-bench), and on CUDA under autocast, where
    tensor-core kernels are NHWC; contiguous for float32 CUDA (not measured here). Values are equal either way."""
    if layout not in DENSE_LAYOUTS:
        raise ValueError(f"dense layout must be one of {', '.join(DENSE_LAYOUTS)}, got {layout!r}")
    if layout == "auto":
        fast = device.type == "cpu" or torch.is_autocast_enabled(device.type)
        layout = "channels_last" if fast else "contiguous"
    return torch.channels_last if layout == "channels_last" else torch.contiguous_format


def patchify(images: torch.Tensor, patch_size: int = PATCH_SIZE) -> torch.Tensor:
    """``(B, C, H, W)`` -> ``(B, L, p*p*C)`` with L = (H/p)(W/p) patches in row-major order."""
    b, c, height, width = images.shape
    h, w = height // patch_size, width // patch_size
    x = images.reshape(b, c, h, patch_size, w, patch_size)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(b, h * w, patch_size * patch_size * c)


def unpatchify(patches: torch.Tensor, h: int, w: int, patch_size: int = PATCH_SIZE) -> torch.Tensor:
    """Inverse of ``patchify``: ``(B, L, p*p*C)`` -> ``(B, C, h*p, w*p)``."""
    b = patches.shape[0]
    x = patches.reshape(b, h, w, patch_size, patch_size, -1).permute(0, 5, 1, 3, 2, 4)
    return x.reshape(b, -1, h * patch_size, w * patch_size)


def spark_loss(images: torch.Tensor, reconstruction: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-patch normalised pixel MSE over masked patches.

    Args:
        images: ``(B, 3, H, W)`` input (already mean/std normalised).
        reconstruction: ``(B, 3, H, W)`` decoder output.
        mask: ``(B, h, w)`` bool, True = visible; the loss averages over the False (masked) patches.
    """
    target = patchify(images)
    mean = target.mean(dim=-1, keepdim=True)
    var = target.var(dim=-1, keepdim=True)
    target = (target - mean) / (var + NORM_PIX_EPS).sqrt()
    per_patch = (patchify(reconstruction) - target).pow(2).mean(dim=-1)  # (B, L)
    hidden = (~mask).flatten(1).to(per_patch.dtype)
    return (per_patch * hidden).sum() / hidden.sum().clamp_min(1.0)


class SparK(nn.Module):
    """Sparse encoder + densify + light decoder + masked-patch loss.

    Args:
        encoder: a ``SparseEncoder`` (any backend).
        decoder: a ``LightDecoder`` whose first 4 widths receive the stride 32, 16, 8, 4 maps.
        mask_ratio: fraction of patches hidden when ``forward`` samples the mask.

    Attributes:
        dense_layout: memory format of the dense half, one of ``DENSE_LAYOUTS`` (see ``dense_memory_format``).
        dense_autocast: None (default: the caller's precision) or a dtype, e.g. ``torch.bfloat16``, to run densify
            and the decoder alone under autocast (opt-in: it changes the maths; the sparse encoder stays exact).
    """

    def __init__(self, encoder: SparseEncoder, decoder: LightDecoder, mask_ratio: float = 0.6):
        super().__init__()
        self.encoder = encoder
        self.decoder = decoder
        self.mask_ratio = check_mask_ratio(mask_ratio)
        enc_widths = [info["num_chs"] for info in reversed(encoder.feature_info)]  # stride 32 first
        self.densify = nn.ModuleList(
            Densify(c_enc, c_dec, encoder.densify_norm, kernel_size=1 if i == 0 else 3)
            for i, (c_enc, c_dec) in enumerate(zip(enc_widths, decoder.widths))
        )
        self.dense_layout = "auto"
        self.dense_autocast: torch.dtype | None = None

    def sample_mask(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """``(B, H/32, W/32)`` bool, True = visible, with ``round(h*w*(1-mask_ratio))`` visible per image."""
        h, w = check_image_size(images.shape[2], images.shape[3])
        return random_mask(images.shape[0], h, w, self.mask_ratio, generator=generator, device=images.device)

    def reconstruct_normalised(self, images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Decoder output ``(B, 3, H, W)`` in per-patch-normalised units."""
        features = self.encoder.forward_sparse(images, mask)  # strides 4, 8, 16, 32
        layout = dense_memory_format(self.dense_layout, images.device)
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
        return spark_loss(images, self.reconstruct_normalised(images, mask), mask)

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
        h, w = mask.shape[1:]
        target = patchify(images)
        mean, std = target.mean(-1, keepdim=True), (target.var(-1, keepdim=True) + NORM_PIX_EPS).sqrt()
        predicted = unpatchify(patchify(self.reconstruct_normalised(images, mask)) * std + mean, h, w)
        pixel_mask = mask.repeat_interleave(PATCH_SIZE, 1).repeat_interleave(PATCH_SIZE, 2)[:, None]
        return images, images * pixel_mask, torch.where(pixel_mask, images, predicted)


def build_spark(model_name: str, backend: str = "minkowski", source: str = "timm",
                drop_path_rate: float | None = None, decoder_width: int = 768, mask_ratio: float = 0.6) -> SparK:
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

    Example:
        >>> model = build_spark("resnet50", backend="torch")
        >>> loss = model(torch.rand(2, 3, 224, 224))   # scalar; loss.backward() trains encoder and decoder
    """
    encoder = SparseEncoder.from_dense(create_backbone(model_name, source, drop_path_rate), backend=backend)
    return SparK(encoder, LightDecoder(decoder_width), mask_ratio=mask_ratio)
