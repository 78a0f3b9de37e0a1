"""The sparse conv's frozen spec (``sparkme.sparse.conv``): one algorithm per geometry, chosen at conversion and
stored on the module, never re-derived by a forward."""

from __future__ import annotations

from unittest import mock

import pytest
import timm
import torch
from torch import nn

from sparkme import SparseEncoder, random_mask
from sparkme.errors import UsageError
from sparkme.sparse.conv import SPEC_ATTRIBUTE, Algorithm, ConvSpec

# (in, out, kernel, stride, groups) -> the algorithm true-sparse backends run
ALGORITHMS = [
    ((16, 24, 1, 1, 1), Algorithm.PER_SITE),
    ((16, 16, 1, 1, 16), Algorithm.PER_SITE),  # a 1x1 depthwise conv is still one row-wise product
    ((16, 16, 7, 1, 16), Algorithm.GRID_DEPTHWISE),
    ((16, 24, 3, 1, 1), Algorithm.GATHER_GEMM),
    ((16, 24, 1, 2, 1), Algorithm.GATHER_GEMM),
    ((3, 16, 4, 4, 1), Algorithm.GATHER_GEMM),
    ((16, 16, 3, 2, 16), Algorithm.GATHER_DEPTHWISE),
    ((16, 32, 3, 1, 4), Algorithm.GATHER_GROUPED),
    ((16, 32, 3, 2, 4), Algorithm.GATHER_GROUPED),
]


@pytest.mark.parametrize(("geometry", "algorithm"), ALGORITHMS)
def test_spec_picks_one_algorithm_per_geometry(geometry, algorithm):
    c_in, c_out, kernel, stride, groups = geometry
    padding = kernel // 2 if kernel % 2 else 0
    spec = ConvSpec.of(nn.Conv2d(c_in, c_out, kernel, stride, padding, groups=groups))
    assert spec == ConvSpec(kernel, stride, padding, groups, algorithm)
    assert spec.same_sites == (stride == 1)


@pytest.mark.parametrize("conv", [nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect"),
                                  nn.Conv2d(4, 4, 3, padding=2, dilation=2), nn.Conv2d(4, 4, (3, 1), padding=(1, 0)),
                                  nn.Conv2d(4, 4, 3, padding=0)])
def test_spec_refuses_convs_without_a_sparse_meaning(conv):
    with pytest.raises(ValueError, match="padding_mode|dilation 1|geometry"):
        ConvSpec.of(conv)


@pytest.mark.parametrize("model_name", ["resnet18", "convnext_atto"])
def test_conversion_freezes_the_spec_of_every_conv_and_forwards_never_rederive_it(model_name):
    encoder = SparseEncoder.from_dense(timm.create_model(model_name), backend="torch").train()
    convs = [m for m in encoder.modules() if isinstance(m, nn.Conv2d)]
    assert convs and all(getattr(m, SPEC_ATTRIBUTE) == ConvSpec.of(m) for m in convs)
    generator = torch.Generator().manual_seed(0)
    images, mask = torch.randn(2, 3, 64, 64, generator=generator), random_mask(2, 2, 2, 0.5, generator=generator)
    with mock.patch.object(ConvSpec, "of", side_effect=AssertionError("spec derived during a forward")):
        features = encoder(images, mask)
    assert [f.shape[1] for f in features] == [level["num_chs"] for level in encoder.feature_info]


def test_a_conv_with_reflect_padding_is_refused_at_conversion_naming_it():
    model = timm.create_model("resnet18")
    model.layer1[0].conv1.padding_mode = "reflect"
    with pytest.raises(UsageError, match=r"Conv2d at 'layer1.0.conv1'.*padding_mode='reflect'"):
        SparseEncoder.from_dense(model, backend="torch")
