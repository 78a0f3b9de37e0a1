"""Which modules act on each site on its own: the one predicate the op table, timm's norm + activation layers and
the ConvNeXt leaf all ask.

A pointwise module maps a ``(..., C)`` feature row to a row by the same function at every site, with no weight
along a spatial or channel-mixing dim: torch's and timm's elementwise activations (timm's ``*_me`` memory-efficient
ones included), ``Identity`` and ``Dropout``. It can run on a sparse map's visible rows in any layout.
"""

from __future__ import annotations

from torch import nn

# Files whose modules are elementwise activations, apart from the names below.
ACTIVATION_FILES = ("torch.nn.modules.activation", "timm.layers.activations", "timm.layers.activations_me")
# PReLU (timm's too) scales channel dim 1, which is not the channels of a channels-last row; the rest mix channels
# or positions.
NOT_POINTWISE = frozenset({"PReLU", "GLU", "Softmax", "Softmin", "LogSoftmax", "Softmax2d", "MultiheadAttention"})


def is_pointwise(module: nn.Module) -> bool:
    """True when ``module`` is an elementwise function of each value (activation, ``Identity``, ``Dropout``)."""
    kind = type(module)
    if kind in (nn.Identity, nn.Dropout):
        return True
    return kind.__module__ in ACTIVATION_FILES and kind.__name__ not in NOT_POINTWISE
