"""Backend names -> sparse map classes, imported lazily so a missing optional library only affects its backend."""

from __future__ import annotations

import importlib

from sparkme.sparse.base import SparseMap
from sparkme.sparse.context import MaskContext

_BACKENDS = {
    "minkowski": ("sparkme.sparse.minkowski_backend", "MinkowskiMap",
                  "install MinkowskiEngine with `sparkme-install-minkowski` (in a checkout: "
                  "`python tools/install_minkowski.py`), or use backend=torch, which needs only torch"),
    "torch": ("sparkme.sparse.torch_backend", "TorchSparseMap", "needs only torch"),
    "masked": ("sparkme.sparse.masked_backend", "MaskedDenseMap", "needs only torch"),
}

BACKEND_NAMES = tuple(_BACKENDS)


def get_backend(name: str) -> type[SparseMap]:
    """The ``SparseMap`` class of backend ``name``.

    Raises:
        ValueError: unknown name (the message lists the choices).
        ImportError: the backend's library is not installed (the message says how to install it).
    """
    if name not in _BACKENDS:
        raise ValueError(f"unknown sparse backend {name!r}; choose one of {', '.join(BACKEND_NAMES)}")
    module_name, class_name, hint = _BACKENDS[name]
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ImportError(f"sparse backend {name!r} is not available: {error}. To fix: {hint}") from error
    return getattr(module, class_name)


def available_backends() -> dict[str, str]:
    """Every backend name mapped to ``"available"`` or the reason it cannot be used on this machine."""
    status = {}
    for name in BACKEND_NAMES:
        try:
            get_backend(name)
            status[name] = "available"
        except ImportError as error:
            status[name] = str(error)
    return status


def sparse_from_images(images, mask, backend: str) -> SparseMap:
    """The stride-1 sparse map of the visible pixels of ``images`` ``(B, C, H, W)`` under patch ``mask``
    ``(B, H//32, W//32)`` (True = visible) on ``backend``."""
    return get_backend(backend).from_images(images, MaskContext(mask, tuple(images.shape[2:])))
