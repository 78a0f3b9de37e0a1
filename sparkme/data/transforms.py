"""SparK's pretraining augmentation: random-resized crop, horizontal flip, ImageNet normalisation."""

from __future__ import annotations

import torch
from torchvision.transforms import v2

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def pretrain_transform(image_size: int, scale: tuple[float, float] = (0.67, 1.0)) -> v2.Compose:
    """PIL RGB image -> ``(3, image_size, image_size)`` float tensor, normalised with ImageNet mean/std."""
    return v2.Compose([
        v2.PILToTensor(),
        v2.RandomResizedCrop(image_size, scale=tuple(scale), interpolation=v2.InterpolationMode.BICUBIC,
                             antialias=True),
        v2.RandomHorizontalFlip(),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


def denormalize(images: torch.Tensor) -> torch.Tensor:
    """Normalised ``(B, 3, H, W)`` -> pixel values in [0, 1]."""
    mean = images.new_tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = images.new_tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (images * std + mean).clamp(0, 1)
