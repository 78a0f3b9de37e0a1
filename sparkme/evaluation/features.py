"""Frozen features of a dense encoder: global average pool of its last stage, extracted once and cached.

The encoder is the dense model up to its last feature level (``sparkme.models.dense_weights.dense_encoder``, the
part SparK pretrains), in eval mode: a ResNet's ``layer4`` output, a ConvNeXt's last stage before its final norm
(which SparK never pretrains). Images go through the evaluation transform of MAE's probe (resize 256 -> centre crop
224 at 224 px, bicubic, ImageNet mean / std).

The cache file is keyed by the weights' digest, the model, the transform and the list of images (paths, sizes and
modification times): any change extracts again, nothing else does.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.data.transforms_factory import transforms_imagenet_eval
from torch import nn
from torch.utils.data import DataLoader, Dataset

from sparkme.files import read_torch_file, save_atomic
from sparkme.models.dense_weights import dense_encoder

PROBE_CROP_PCT = 224 / 256  # MAE's probe: resize 256, centre crop 224
BANK_DTYPES = {"float32": torch.float32, "float16": torch.float16}  # stored features (``knn.bank_dtype``)


def probe_transform(image_size: int):
    """PIL image -> ``(3, image_size, image_size)`` normalised tensor (resize ``image_size / 0.875``, centre crop)."""
    return transforms_imagenet_eval(img_size=image_size, crop_pct=PROBE_CROP_PCT, interpolation="bicubic",
                                    mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD)


class PooledEncoder(nn.Module):
    """``(B, 3, H, W)`` images -> ``(B, C)`` features: the mean over space of the encoder's stride-32 map."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.encoder = dense_encoder(model)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.encoder(images)[-1].mean(dim=(2, 3))


@torch.no_grad()
def extract_features(encoder: nn.Module, dataset: Dataset, batch_size: int = 128, num_workers: int = 0,
                     device: str | torch.device = "cpu",
                     dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """``(N, C)`` features (``dtype``: float16 halves an ImageNet-size bank) and ``(N,)`` int64 labels of an
    ``(image, label)`` dataset, in its order (a streamed one, e.g. ``sparkme.data.shards.LabelledShards``, in the
    order its loader hands them out).

    The features are written into one tensor as they come (no list of batches concatenated at the end: that would
    hold the bank twice)."""
    encoder = encoder.to(device).eval()
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    size = len(dataset)
    features, labels, filled = None, torch.empty(size, dtype=torch.long), 0
    for images, targets in loader:
        batch = encoder(images.to(device, non_blocking=True)).float().cpu()
        if features is None:
            features = torch.empty(size, batch.shape[1], dtype=dtype)
        features[filled:filled + len(batch)] = batch
        labels[filled:filled + len(batch)] = torch.as_tensor(targets, dtype=torch.long)
        filled += len(batch)
    if features is None:
        return torch.empty(0, 0, dtype=dtype), labels
    if filled == size:
        return features, labels
    return features[:filled].clone(), labels[:filled].clone()  # a stream skipped unreadable images: trim the storage


def file_digest(path: str | Path, block: int = 1 << 22) -> str:
    """SHA-256 of a file's bytes (hex)."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while chunk := file.read(block):
            digest.update(chunk)
    return digest.hexdigest()


def images_digest(files: list[Path]) -> str:
    """SHA-256 of the image list: every path with its size and modification time."""
    digest = hashlib.sha256()
    for path in files:
        stat = path.stat()
        digest.update(f"{path}|{stat.st_size}|{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def cache_key(weights: str, model: str, transform, train_files: list[Path], val_files: list[Path]) -> str:
    """The name of the features' cache file: a digest of everything they depend on."""
    text = json.dumps([weights, model, repr(transform), images_digest(train_files), images_digest(val_files)])
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def cached_features(path: Path, compute) -> dict[str, torch.Tensor]:
    """The features stored at ``path``, or ``compute()``'s, written there atomically first; and whether they came
    from the cache (``"cached"`` entry)."""
    if path.is_file():
        state = read_torch_file(path, "features cache")
        return {**state, "cached": True}
    state = compute()
    save_atomic(state, path)
    return {**state, "cached": False}
