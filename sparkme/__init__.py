"""sparkme: SparK masked-image-modeling pretraining for ConvNets with true sparse convolution."""

from sparkme.masking import random_mask, upsample_mask
from sparkme.models import SparK, SparseEncoder, build_spark
from sparkme.sparse import available_backends

__version__ = "0.1.0"

__all__ = ["SparK", "SparseEncoder", "build_spark", "available_backends", "random_mask", "upsample_mask"]
