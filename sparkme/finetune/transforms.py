"""Fine-tuning image transforms, as SparK's ``downstream_imagenet/data.py`` builds them.

Train: timm's ImageNet train transform (random resized crop, flip, AutoAugment ``v0``, which turns timm's colour
jitter off, random erasing 0.25 per pixel, one box), bicubic, ImageNet mean / std; below 384 px the AutoAugment op
is replaced by torchvision's ``TrivialAugmentWide`` (bicubic). Eval below 384 px: resize the short side to
``floor(size / 0.95)`` then centre crop (timm ``crop_pct=0.95``); at 384 px and above: resize to size x size, no
crop.
"""

from __future__ import annotations

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, create_transform
from timm.data.auto_augment import AutoAugment
from timm.data.transforms_factory import transforms_imagenet_eval
from torchvision import transforms

# SparK's switch between its two regimes (``img_size < 384``).
LARGE_IMAGE_SIZE = 384
EVAL_CROP_PCT = 0.95


def train_transform(image_size: int) -> transforms.Compose:
    """PIL image -> normalised ``(3, image_size, image_size)`` tensor, augmented."""
    transform = create_transform(
        input_size=image_size, is_training=True, auto_augment="v0", interpolation="bicubic", re_prob=0.25,
        re_mode="pixel", re_count=1, mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD)
    if image_size < LARGE_IMAGE_SIZE:
        ops = transform.transforms
        index = next(i for i, op in enumerate(ops) if isinstance(op, (AutoAugment, transforms.AutoAugment)))
        ops[index] = transforms.TrivialAugmentWide(interpolation=transforms.InterpolationMode.BICUBIC)
    return transform


def eval_transform(image_size: int) -> transforms.Compose:
    """PIL image -> normalised ``(3, image_size, image_size)`` tensor, deterministic."""
    if image_size < LARGE_IMAGE_SIZE:
        return transforms_imagenet_eval(img_size=image_size, crop_pct=EVAL_CROP_PCT, interpolation="bicubic",
                                        mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD)
    return transforms.Compose([
        transforms.Resize((image_size, image_size), interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.ToTensor(),
        transforms.Normalize(mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD),
    ])
