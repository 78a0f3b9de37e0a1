"""Sparse feature maps and their backends (``minkowski``, ``torch``, ``masked``)."""

from sparkme.sparse.base import SparseMap
from sparkme.sparse.context import MaskContext
from sparkme.sparse.conv import ConvSpec, conv2d
from sparkme.sparse.registry import BACKEND_NAMES, available_backends, get_backend, sparse_from_images

__all__ = ["BACKEND_NAMES", "ConvSpec", "MaskContext", "SparseMap", "available_backends", "conv2d", "get_backend",
           "sparse_from_images"]
