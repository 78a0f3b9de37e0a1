"""sparkme: SparK masked-image-modeling pretraining for ConvNets with true sparse convolution.

The public API is imported lazily, so ``sparkme.install`` (the MinkowskiEngine installer) runs with torch alone.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "SparK": "sparkme.models",
    "SparseEncoder": "sparkme.models",
    "build_spark": "sparkme.models",
    "available_backends": "sparkme.sparse",
    "random_mask": "sparkme.masking",
    "upsample_mask": "sparkme.masking",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'sparkme' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
