"""What one benchmark run measures, checked once when built: a typo fails in a second, before any model is built."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

import torch

from sparkme.engine.config_checks import usable_backend
from sparkme.engine.distributed import resolve_device
from sparkme.errors import UsageError
from sparkme.masking import check_grid_size, check_image_size, check_mask_ratio
from sparkme.models.backbones import check_model_name
from sparkme.models.spark import DENSE_LAYOUTS
from sparkme.models.volumes import is_volume_model, volume_model, volume_patch_size
from sparkme.sparse.registry import BACKEND_NAMES


def _checked_model(name: str) -> str:
    """``name`` when it is a 3-D encoder whose library is installed or a timm model of a supported family."""
    if is_volume_model(name):
        volume_model(name)
        return name
    return check_model_name(name)


REFERENCE = "masked"  # the backend every ratio is taken against
DEFAULT_MODELS = ("resnet50", "convnext_small")
DEFAULT_RATIOS = (0.6, 0.75)


@dataclasses.dataclass(frozen=True)
class BenchSettings:
    """The settings of one ``run_benchmark``; built only valid (``__post_init__`` raises ``UsageError`` naming the
    first bad value) and normalised: lists deduplicated in their order, ``masked`` appended to the backends (it is
    the reference), the device resolved.

    Attributes:
        models: timm backbones of a supported family, or 3-D encoders (``volumes.VOLUME_MODELS``: then
            ``image_size`` is the side of a cubic crop of one channel).
        backends: sparse backends to time.
        ratios: mask ratios in [0, 1).
        batch_sizes: images per step.
        image_size: square side, a multiple of 32.
        repeats: timed runs per variant (median reported); ``repeats=1, warmup=0`` is for smoke tests.
        warmup: untimed runs per variant first.
        device: ``auto`` / None (cuda when available), ``cpu``, ``cuda`` or ``cuda:N``.
        include_train_step: also time the whole SparK training step and the reference step.
        out_dir: folder for ``results.csv`` / ``results.json`` / ``speedup.png``; None writes nothing.
        dense_layout: ``SparK.dense_layout`` of the backends' steps (the reference step is always contiguous).
        bf16: run the backends' dense half under bf16 autocast (opt-in: changes the maths; not the reference).
        decoder_width: the decoder's first width (None: the paper's 768 for images, 256 for volumes; smaller only
            for smoke tests).
    """

    models: Sequence[str] = DEFAULT_MODELS
    backends: Sequence[str] = BACKEND_NAMES
    ratios: Sequence[float] = DEFAULT_RATIOS
    batch_sizes: Sequence[int] = (8,)
    image_size: int = 224
    repeats: int = 3
    warmup: int = 1
    device: str | torch.device | None = None
    include_train_step: bool = True
    out_dir: str | Path | None = "bench_results"
    dense_layout: str = "auto"
    bf16: bool = False
    decoder_width: int | None = None

    def __post_init__(self) -> None:
        if not self.models:
            raise UsageError("no model given; pass at least one, e.g. resnet50")
        if not self.ratios:
            raise UsageError("no mask ratio given; pass at least one in [0, 1), e.g. 0.6")
        if not self.batch_sizes:
            raise UsageError("no batch size given; pass at least one integer >= 1")
        models = tuple(_checked_model(m) for m in dict.fromkeys(self.models))
        backends = tuple(usable_backend(b) for b in dict.fromkeys([*self.backends, REFERENCE]))
        try:
            ratios = tuple(check_mask_ratio(r) for r in dict.fromkeys(self.ratios))
            for model in models:
                if is_volume_model(model):
                    check_grid_size((self.image_size,) * 3, volume_patch_size(model))
                else:
                    check_image_size(self.image_size, self.image_size)
        except ValueError as error:
            raise UsageError(str(error)) from error
        for batch in self.batch_sizes:
            if int(batch) != batch or batch < 1:
                raise UsageError(f"batch size must be an integer >= 1, got {batch}")
        if self.repeats < 1:
            raise UsageError(f"repeats must be >= 1, got {self.repeats}")
        if self.warmup < 0:
            raise UsageError(f"warmup must be >= 0, got {self.warmup}")
        if self.dense_layout not in DENSE_LAYOUTS:
            raise UsageError(f"unknown dense layout {self.dense_layout!r}; choose from {', '.join(DENSE_LAYOUTS)}")
        device = resolve_device("auto" if self.device is None else self.device, "--device", allow_index=True)
        for name, value in dict(models=models, backends=backends, ratios=ratios, device=device,
                                batch_sizes=tuple(int(b) for b in dict.fromkeys(self.batch_sizes))).items():
            object.__setattr__(self, name, value)  # frozen: normalised once, here
