"""Sparse encoders (converted from dense backbones) and the SparK model."""

from sparkme.models.backbones import create_backbone
from sparkme.models.decoder import LightDecoder
from sparkme.models.encoder import SparseEncoder
from sparkme.models.spark import SparK, build_spark, spark_loss

__all__ = ["LightDecoder", "SparK", "SparseEncoder", "build_spark", "create_backbone", "spark_loss"]
