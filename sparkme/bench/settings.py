"""Checks of the benchmark settings, all run before any model is built so that a typo fails in a second."""

from __future__ import annotations

from collections.abc import Sequence

import timm
import torch

from sparkme.errors import UsageError
from sparkme.masking import check_image_size, check_mask_ratio
from sparkme.models.backbones import SUPPORTED_PREFIXES, TESTED_MODELS
from sparkme.models.spark import DENSE_LAYOUTS
from sparkme.sparse.registry import BACKEND_NAMES, get_backend

REFERENCE = "masked"  # the backend every ratio is taken against


def check_model_name(name: str) -> str:
    """``name`` when timm has it and sparkme supports its family (``backbones.TESTED_MODELS``), else a UsageError."""
    if not (name.startswith(SUPPORTED_PREFIXES) and timm.is_model(name)):
        raise UsageError(f"unknown model {name!r}; choose a timm model of a supported family: "
                         + ", ".join(f"{family} (e.g. {model})" for family, model in TESTED_MODELS.items()))
    return name


def check_backends(backends: Sequence[str]) -> list[str]:
    """Deduplicated backends in the given order, with ``masked`` appended when missing (it is the reference).

    Raises:
        UsageError: an unknown name (the message lists the choices) or a backend whose library is missing.
    """
    names: list[str] = []
    for name in backends:
        if name not in BACKEND_NAMES:
            raise UsageError(f"unknown backend {name!r}; choose from {', '.join(BACKEND_NAMES)}")
        if name not in names:
            names.append(name)
    if REFERENCE not in names:
        names.append(REFERENCE)
    for name in names:
        try:
            get_backend(name)
        except ImportError as error:
            raise UsageError(str(error)) from error
    return names


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``None``/``"auto"`` -> cuda when available, else cpu; a UsageError for an unusable device."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as error:
        raise UsageError(f"unknown device {str(device)!r}; choose auto, cpu, cuda or cuda:N") from error
    if resolved.type not in ("cpu", "cuda"):
        raise UsageError(f"unsupported device {str(device)!r}; choose auto, cpu, cuda or cuda:N")
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"device {str(device)!r} requested but CUDA is not available; choose auto or cpu")
    return resolved


def validate(
    models: Sequence[str],
    backends: Sequence[str],
    ratios: Sequence[float],
    batch_sizes: Sequence[int],
    image_size: int,
    repeats: int,
    warmup: int,
    dense_layout: str = "auto",
) -> tuple[list[str], list[str], list[float], list[int]]:
    """Deduplicated, checked ``(models, backends, ratios, batch_sizes)``; a UsageError names the first bad value."""
    if not models:
        raise UsageError("no model given; pass at least one, e.g. resnet50")
    if not ratios:
        raise UsageError("no mask ratio given; pass at least one in [0, 1), e.g. 0.6")
    if not batch_sizes:
        raise UsageError("no batch size given; pass at least one integer >= 1")
    models = [check_model_name(m) for m in dict.fromkeys(models)]
    backends = check_backends(backends)
    try:
        ratios = [check_mask_ratio(r) for r in dict.fromkeys(ratios)]
        check_image_size(image_size, image_size)
    except ValueError as error:
        raise UsageError(str(error)) from error
    for batch in batch_sizes:
        if int(batch) != batch or batch < 1:
            raise UsageError(f"batch size must be an integer >= 1, got {batch}")
    if repeats < 1:
        raise UsageError(f"repeats must be >= 1, got {repeats}")
    if warmup < 0:
        raise UsageError(f"warmup must be >= 0, got {warmup}")
    if dense_layout not in DENSE_LAYOUTS:
        raise UsageError(f"unknown dense layout {dense_layout!r}; choose from {', '.join(DENSE_LAYOUTS)}")
    return models, backends, ratios, [int(b) for b in dict.fromkeys(batch_sizes)]
