"""Sparse encoders (converted from dense backbones) and the SparK model."""

from sparkme.models.encoder import SparseEncoder

__all__ = ["SparseEncoder"]
