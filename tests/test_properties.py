"""Property-based checks (hypothesis) of masking and of every backend against the masked oracle."""

from __future__ import annotations

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from timm.layers import LayerNorm2d
from torch import nn

from conftest import SPARSE_BACKENDS, relative_error
from sparkme.convert import check_graph, run_graph, trace_to_features
from sparkme.masking import mask_at_stride, num_visible, random_mask
from sparkme.sparse import sparse_from_images

grids = st.tuples(st.integers(1, 4), st.integers(1, 4))
ratios = st.one_of(st.sampled_from([0.0, 0.6, 0.75, 0.9, 0.999]), st.floats(0.0, 0.999))


@settings(max_examples=200, deadline=None)
@given(batch=st.integers(1, 5), grid=grids, ratio=ratios, seed=st.integers(0, 2**31))
def test_mask_has_exact_count_and_is_seed_deterministic(batch, grid, ratio, seed):
    h, w = grid
    mask = random_mask(batch, h, w, ratio, generator=torch.Generator().manual_seed(seed))
    assert mask.flatten(1).sum(1).tolist() == [num_visible(h, w, ratio)] * batch
    assert torch.equal(mask, random_mask(batch, h, w, ratio, generator=torch.Generator().manual_seed(seed)))
    for stride in (1, 4, 32):
        assert int(mask_at_stride(mask, stride).sum()) == int(mask.sum()) * (32 // stride) ** 2


def _stack(channels: int) -> nn.Sequential:
    """Every kind of spatial op a supported backbone uses, with BN (visible-site statistics) between."""
    return nn.Sequential(
        nn.Conv2d(3, channels, 7, stride=2, padding=3), nn.BatchNorm2d(channels), nn.ReLU(),
        nn.MaxPool2d(3, stride=2, padding=1),
        nn.Conv2d(channels, channels, 3, padding=1), LayerNorm2d(channels),
        nn.Conv2d(channels, channels, 7, padding=3, groups=channels),
        nn.Conv2d(channels, 2 * channels, 2, stride=2), nn.GELU(),
        nn.Conv2d(2 * channels, channels, 1, stride=2),
    ).double()


def _run_sparse(stack: nn.Sequential, x):
    """``stack`` through the encoder's own graph machinery: traced, checked against the op table, run sparsely."""
    traced = trace_to_features(stack, [str(len(stack) - 1)])
    check_graph(traced.graph, traced)
    return run_graph(traced.graph, traced, x)[0]


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(batch=st.integers(1, 3), grid=grids, ratio=ratios, seed=st.integers(0, 2**31))
def test_every_backend_agrees_with_masked_on_random_shapes(batch, grid, ratio, seed):
    torch.manual_seed(seed)
    h, w = grid
    images = torch.randn(batch, 3, 32 * h, 32 * w, dtype=torch.float64)
    mask = random_mask(batch, h, w, ratio, generator=torch.Generator().manual_seed(seed))
    stack = _stack(4).train()
    expected = _run_sparse(stack, sparse_from_images(images, mask, "masked")).to_dense()
    for backend in SPARSE_BACKENDS:
        actual = _run_sparse(stack, sparse_from_images(images, mask, backend)).to_dense()
        assert actual.shape == expected.shape == (batch, 4, 2 * h, 2 * w)
        assert relative_error(actual, expected) <= 1e-9, backend
