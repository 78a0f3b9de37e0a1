"""The shared pointwise ops (``sparkme.sparse.ops``) against plain torch / timm on the visible rows.

``masked``, the oracle of every backend test, runs the same ``ops`` code as the backends it judges, so a bug there
(BatchNorm statistics over all sites, GRN pooled over the batch, DropPath per site) would pass every oracle
comparison. These references never call ``ops``: they gather the visible rows of a dense tensor themselves and run
``F.batch_norm``, ``F.layer_norm``, timm's ``GlobalResponseNorm`` and timm's ``drop_path`` on them.
"""

from __future__ import annotations

import copy

import pytest
import timm.layers
import torch
import torch.nn.functional as F
from timm.layers.grn import GlobalResponseNorm

from conftest import ALL_BACKENDS, relative_error
from sparkme.masking import mask_at_stride, random_mask
from sparkme.sparse import ops, sparse_from_images

CHANNELS = 6
EXACT = 1e-10  # float64 throughout: anything above rounding is a semantic difference


def _inputs(batch: int = 3, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 images (B, C, 64, 96) with a distinct offset per channel and sample (so statistics over the wrong
    set of sites give clearly different numbers) and a mask hiding 4 of the 6 patches of each image."""
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(batch, CHANNELS, 64, 96, generator=generator, dtype=torch.float64)
    images = images * 1.7 + torch.randn(batch, CHANNELS, 1, 1, generator=generator, dtype=torch.float64)
    mask = random_mask(batch, 2, 3, 0.6, generator=generator)
    return images, mask


def _visible_rows(dense: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``(B, C, H, W)`` -> ``(N, C)`` rows of the visible pixels, (batch, y, x) order."""
    return dense.permute(0, 2, 3, 1)[mask_at_stride(mask, 1)]


def _scatter_rows(rows: torch.Tensor, mask: torch.Tensor, batch: int) -> torch.Tensor:
    """Inverse of ``_visible_rows``: ``(N, C)`` -> ``(B, C, H, W)`` with zeros at masked pixels."""
    pixel_mask = mask_at_stride(mask, 1)
    dense = rows.new_zeros(batch, *pixel_mask.shape[1:], rows.shape[1])
    return dense.index_put((pixel_mask,), rows).permute(0, 3, 1, 2)


def _randomised(module: torch.nn.Module) -> torch.nn.Module:
    """Non-trivial affine parameters (the defaults 1/0, or GRN's 0/0, would hide a wrong formula)."""
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator, dtype=parameter.dtype) * 0.5 + 1.0)
    return module


def _sparse_output_and_grads(op, module, images, mask, backend, upstream):
    """Dense output of ``op(sparse map of images, module)`` and the gradients of ``sum(out * upstream)``."""
    images = images.clone().requires_grad_()
    out = op(sparse_from_images(images, mask, backend), module).to_dense()
    (out * upstream).sum().backward()
    return out.detach(), images.grad, {n: p.grad.clone() for n, p in module.named_parameters()}


def _reference_output_and_grads(fn, module, images, mask, upstream):
    """Same, with ``fn(visible rows, module) -> rows`` written in plain torch and scattered back."""
    images = images.clone().requires_grad_()
    out = _scatter_rows(fn(_visible_rows(images, mask), module), mask, images.shape[0])
    (out * upstream).sum().backward()
    return out.detach(), images.grad, {n: p.grad.clone() for n, p in module.named_parameters()}


def _assert_close(actual, expected, what: str) -> None:
    """Outputs, input gradients and parameter gradients, as returned by the two helpers above."""
    (a_out, a_grad, a_params), (e_out, e_grad, e_params) = actual, expected
    assert relative_error(a_out, e_out) <= EXACT, f"{what}: output"
    assert relative_error(a_grad, e_grad) <= EXACT, f"{what}: input gradient"
    assert a_params.keys() == e_params.keys()
    for key in e_params:
        assert relative_error(a_params[key], e_params[key]) <= EXACT, f"{what}: gradient of {key}"


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_batch_norm_in_train_mode_equals_f_batch_norm_of_the_visible_rows(backend):
    """Output, input and affine gradients, running mean/var and the batch counter, over two steps."""
    images, mask = _inputs()
    upstream = torch.randn(images.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    bn = _randomised(torch.nn.BatchNorm2d(CHANNELS).double()).train()
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2.0)
    reference_bn = copy.deepcopy(bn)

    def reference(rows, module):
        return F.batch_norm(rows, module.running_mean, module.running_var, module.weight, module.bias,
                            training=True, momentum=module.momentum, eps=module.eps)

    for step in range(2):  # the second step starts from updated running statistics
        step_images = images + step
        actual = _sparse_output_and_grads(ops.batch_norm, bn, step_images, mask, backend, upstream)
        expected = _reference_output_and_grads(reference, reference_bn, step_images, mask, upstream)
        _assert_close(actual, expected, f"{backend} step {step}")
        assert relative_error(bn.running_mean, reference_bn.running_mean) <= EXACT, backend
        assert relative_error(bn.running_var, reference_bn.running_var) <= EXACT, backend
        for module in (bn, reference_bn):
            module.zero_grad()
    assert int(bn.num_batches_tracked) == 2
    # The statistics of all sites (masked zeros included) are far from the visible ones: the test can tell.
    all_sites = (images * mask_at_stride(mask, 1)[:, None]).transpose(0, 1).flatten(1)
    assert (all_sites.mean(1) - _visible_rows(images, mask).mean(0)).abs().max() > 0.1


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_batch_norm_in_eval_mode_uses_the_running_statistics(backend):
    images, mask = _inputs()
    bn = _randomised(torch.nn.BatchNorm2d(CHANNELS).double()).eval()
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2.0)
    before = copy.deepcopy(bn.state_dict())
    with torch.no_grad():
        out = ops.batch_norm(sparse_from_images(images, mask, backend), bn).to_dense()
        rows = F.batch_norm(_visible_rows(images, mask), bn.running_mean, bn.running_var, bn.weight, bn.bias,
                            training=False, eps=bn.eps)
    assert relative_error(out, _scatter_rows(rows, mask, images.shape[0])) <= EXACT
    assert all(torch.equal(v, before[k]) for k, v in bn.state_dict().items())


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_layer_norm_equals_f_layer_norm_of_each_visible_row(backend):
    images, mask = _inputs()
    upstream = torch.randn(images.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    ln = _randomised(torch.nn.LayerNorm(CHANNELS, eps=1e-6).double())
    reference_ln = copy.deepcopy(ln)
    actual = _sparse_output_and_grads(ops.layer_norm, ln, images, mask, backend, upstream)
    expected = _reference_output_and_grads(
        lambda rows, m: F.layer_norm(rows, (CHANNELS,), m.weight, m.bias, m.eps), reference_ln, images, mask, upstream)
    _assert_close(actual, expected, backend)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_global_response_norm_equals_timm_grn_per_sample_on_the_visible_sites(backend):
    """timm's own GRN on one image at a time, its masked sites zero (they add nothing to the L2 norm): the norm is
    per sample over that sample's visible sites, never over the whole batch."""
    images, mask = _inputs()
    upstream = torch.randn(images.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    grn = _randomised(GlobalResponseNorm(CHANNELS, channels_last=True).double())
    reference_grn = copy.deepcopy(grn)
    pixel_mask = mask_at_stride(mask, 1)[:, None]
    leaf = images.clone().requires_grad_()
    sparse = sparse_from_images(leaf, mask, backend)
    out = ops.global_response_norm(sparse, grn).to_dense()
    (out * upstream).sum().backward()

    reference_leaf = images.clone().requires_grad_()
    masked = (reference_leaf * pixel_mask).permute(0, 2, 3, 1)
    per_image = [reference_grn(masked[b:b + 1]) for b in range(images.shape[0])]
    expected = torch.cat(per_image).permute(0, 3, 1, 2) * pixel_mask
    (expected * upstream).sum().backward()

    assert relative_error(out.detach(), expected.detach()) <= EXACT
    assert relative_error(leaf.grad, reference_leaf.grad) <= EXACT
    for name, parameter in grn.named_parameters():
        assert relative_error(parameter.grad, dict(reference_grn.named_parameters())[name].grad) <= EXACT, name
    # Pooling the norm over the batch gives a clearly different answer on these inputs.
    pooled = reference_grn(masked.detach().reshape(1, -1, masked.shape[2], CHANNELS)).reshape(masked.shape)
    assert relative_error(pooled.permute(0, 3, 1, 2) * pixel_mask, expected.detach()) > 1e-3


@pytest.mark.parametrize("scale_by_keep", [True, False])
@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_drop_path_equals_timm_drop_path_with_the_same_random_state(backend, scale_by_keep):
    """Same global RNG state -> the same samples dropped as timm's ``DropPath`` on the dense tensor, scaled the
    same way; identity in eval mode."""
    images, mask = _inputs(batch=8)
    pixel_mask = mask_at_stride(mask, 1)[:, None]
    drop = timm.layers.DropPath(0.5, scale_by_keep=scale_by_keep).train()
    torch.manual_seed(11)
    out = ops.drop_path(sparse_from_images(images, mask, backend), drop).to_dense()
    torch.manual_seed(11)
    expected = drop(images * pixel_mask)
    assert relative_error(out, expected) <= EXACT
    kept = [bool(expected[b].abs().sum() > 0) for b in range(8)]
    assert any(kept) and not all(kept), kept  # both outcomes occur with this seed: the comparison means something
    drop.eval()
    same = ops.drop_path(sparse_from_images(images, mask, backend), drop).to_dense()
    assert torch.equal(same, images * pixel_mask)
