"""Oracle comparisons with DropPath **on** (the other equivalence tests run with it off).

DropPath draws one Bernoulli number per sample and block from the global generator, in block order, exactly as timm's
``drop_path`` does; so with the same generator state every backend, and the dense timm model itself, drop the same
samples. Two references: the dense timm model in train mode with every patch visible (independent of the sparse
converter, so a block that skips its DropPath fails here), and the masked oracle at mask ratio 0.6.
"""

from __future__ import annotations

import copy

import pytest
import timm
import torch

from conftest import ALL_BACKENDS, SPARSE_BACKENDS, relative_error
from sparkme import SparseEncoder, random_mask

DROP_PATH = 0.5
MODELS = ["convnext_atto", "resnet18"]  # timm ResNets carry DropPath in their blocks too
SEED = 7


def _dense(name: str, drop_path: float = DROP_PATH) -> torch.nn.Module:
    """float64 timm model with non-trivial affines and layer scales (ConvNeXt's default gamma of 1e-6 would make
    every residual branch, and so every DropPath, invisible at 1e-9)."""
    torch.manual_seed(0)
    model = timm.create_model(name, drop_path_rate=drop_path).double()
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for module in model.modules():
            for attribute in ("weight", "bias", "gamma"):
                tensor = getattr(module, attribute, None)
                if isinstance(tensor, torch.Tensor) and tensor.dim() == 1:
                    tensor.copy_(torch.randn(tensor.shape, generator=generator, dtype=tensor.dtype) * 0.2
                                 + (attribute != "bias"))
    return model.train()


def _images(batch: int = 4) -> torch.Tensor:
    return torch.randn(batch, 3, 64, 64, generator=torch.Generator().manual_seed(3), dtype=torch.float64)


def _run_sparse(dense, backend, images, mask, backward: bool = True):
    """Features, parameter gradients and buffers of the sparse twin, with the global generator at ``SEED``."""
    encoder = SparseEncoder.from_dense(copy.deepcopy(dense), backend=backend).train()
    torch.manual_seed(SEED)
    features = encoder(images, mask)
    if not backward:
        return features, {}, dict(encoder.named_buffers())
    projections = [torch.randn(f.shape, generator=torch.Generator().manual_seed(i), dtype=f.dtype)
                   for i, f in enumerate(features)]
    sum((f * p).sum() for f, p in zip(features, projections)).backward()
    grads = {name: p.grad for name, p in encoder.named_parameters()}
    return features, grads, dict(encoder.named_buffers())


def _dense_stage_outputs(model: torch.nn.Module, images: torch.Tensor) -> list[torch.Tensor]:
    torch.manual_seed(SEED)
    outputs = model.forward_intermediates(images, intermediates_only=True)
    return outputs[-4:]  # timm ResNets also return the stride-2 stem output first


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("model_name", MODELS)
def test_all_visible_train_mode_with_drop_path_equals_the_dense_timm_model(model_name, backend):
    dense = _dense(model_name)
    images = _images()
    mask = torch.ones(images.shape[0], 2, 2, dtype=torch.bool)
    with torch.no_grad():
        features, _, buffers = _run_sparse(dense, backend, images, mask, backward=False)
    reference_model = copy.deepcopy(dense)
    with torch.no_grad():
        reference = _dense_stage_outputs(reference_model, images)
        undropped = _dense_stage_outputs(_dense(model_name, drop_path=0.0), images)
    for scale, (actual, expected) in enumerate(zip(features, reference)):
        assert relative_error(actual, expected) <= 1e-9, (backend, scale)
    # Train-mode BatchNorm over all sites updated the same running statistics as the dense model's.
    for name, value in reference_model.named_buffers():
        if name in buffers and value.is_floating_point():
            assert relative_error(buffers[name], value) <= 1e-9, name
    assert relative_error(undropped[-1], reference[-1]) > 1e-2  # some samples were dropped: the test can fail


@pytest.mark.parametrize("model_name", MODELS)
def test_sparse_backends_match_masked_with_drop_path_on_and_the_same_random_state(model_name):
    dense = _dense(model_name)
    images = _images()
    mask = random_mask(images.shape[0], 2, 2, 0.6, generator=torch.Generator().manual_seed(4))
    oracle = _run_sparse(dense, "masked", images, mask)
    without_drop = _run_sparse(_dense(model_name, drop_path=0.0), "masked", images, mask)
    assert relative_error(without_drop[0][-1].detach(), oracle[0][-1].detach()) > 1e-2
    for backend in SPARSE_BACKENDS:
        features, grads, buffers = _run_sparse(dense, backend, images, mask)
        for scale, (actual, expected) in enumerate(zip(features, oracle[0])):
            assert relative_error(actual.detach(), expected.detach()) <= 1e-9, (backend, scale)
        assert grads.keys() == oracle[1].keys()
        for name in grads:
            assert relative_error(grads[name], oracle[1][name]) <= 1e-9, (backend, name)
        for name, value in oracle[2].items():
            if value.is_floating_point():
                assert relative_error(buffers[name], value) <= 1e-9, (backend, name)
