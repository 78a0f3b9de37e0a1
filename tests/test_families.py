"""Every family of the coverage table (``sparkme.models.families.TESTED_MODELS``) on every backend: exact against
the masked-dense oracle in float64, equal to the dense model when nothing is masked, and exported by a strict load.

Inputs are 64x64 (a 2x2 patch grid) so that nine ImageNet-sized models stay cheap on a CPU.
"""

import copy

import pytest
import timm
import torch
from test_encoders import FAMILIES_HERE
from torch import nn

from conftest import ALL_BACKENDS, DEVICE, SPARSE_BACKENDS, relative_error
from sparkme import SparseEncoder, build_spark, random_mask
from sparkme.engine.distributed import to_sync_batchnorm
from sparkme.errors import UsageError
from sparkme.masking import mask_at_stride
from sparkme.models.families import TESTED_MODELS

# The families of test_encoders.py have their own, larger-input tests there.
MODELS = [model for family, model in TESTED_MODELS.items() if family not in FAMILIES_HERE]
SIZE = 64


def _randomised(name: str) -> nn.Module:
    """A timm model with non-trivial norm affines and running stats, so every parameter and buffer matters."""
    model = timm.create_model(name)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.weight.copy_(torch.randn(module.weight.shape, generator=generator) * 0.2 + 1)
                module.bias.copy_(torch.randn(module.bias.shape, generator=generator) * 0.2)
                module.running_mean.copy_(torch.randn(module.running_mean.shape, generator=generator) * 0.2)
                module.running_var.uniform_(0.5, 1.5, generator=generator)
    return model


@pytest.fixture(scope="module")
def dense_models():
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = _randomised(name)
        return copy.deepcopy(cache[name])

    return get


def _inputs(batch, ratio, seed=0):
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(batch, 3, SIZE, SIZE, generator=generator, dtype=torch.float64)
    mask = random_mask(batch, SIZE // 32, SIZE // 32, ratio, generator=generator)
    return images.to(DEVICE), mask.to(DEVICE)


def _step(encoder, images, mask):
    """Features, parameter gradients and float buffers after one forward/backward of a fixed random projection."""
    encoder.zero_grad(set_to_none=True)
    features = encoder(images, mask)
    generator = torch.Generator().manual_seed(2)
    projections = [torch.randn(f.shape, generator=generator, dtype=f.dtype).to(f.device) for f in features]
    sum((f * p).sum() for f, p in zip(features, projections)).backward()
    grads = {name: p.grad.clone() for name, p in encoder.named_parameters()}
    buffers = {k: v.clone() for k, v in encoder.named_buffers() if v.is_floating_point()}
    return features, grads, buffers


@pytest.mark.slow
@pytest.mark.parametrize("model_name", MODELS)
def test_sparse_backends_match_masked_oracle_in_float64(dense_models, model_name):
    """Masks 0.6 then 0.9 (BN statistics carried over), train mode: the 4 feature maps, every parameter gradient
    and every BN running statistic agree to 1e-9; masked sites are exactly 0. A gradient that is analytically 0
    (a BN bias right before another train-mode BN) is rounding noise, so each gradient error is measured against
    the larger of its own scale and the model's largest gradient."""
    dense = dense_models(model_name).double().to(DEVICE)
    encoders = {b: SparseEncoder.from_dense(dense, backend=b).train() for b in ALL_BACKENDS}
    for ratio in (0.6, 0.9):
        # batch 4: at mask 0.9 a stride-32 map has one site per image, and train-mode BN over only 2 rows would
        # amplify rounding far beyond 1e-9
        images, mask = _inputs(batch=4, ratio=ratio)
        oracle = _step(encoders["masked"], images, mask)
        grad_scale = max(g.abs().max().item() for g in oracle[1].values())
        for backend in SPARSE_BACKENDS:
            features, grads, buffers = _step(encoders[backend], images, mask)
            for scale, (actual, expected) in enumerate(zip(features, oracle[0])):
                visible = mask_at_stride(mask, 4 * 2**scale)[:, None].expand_as(expected)
                assert relative_error(actual[visible], expected[visible]) <= 1e-9, (backend, ratio, scale)
                assert torch.all(actual[~visible] == 0) and torch.all(expected[~visible] == 0)
            assert grads.keys() == oracle[1].keys() and buffers.keys() == oracle[2].keys()
            for name, expected in oracle[1].items():
                error = (grads[name] - expected).abs().max().item()
                assert error <= 1e-9 * max(expected.abs().max().item(), grad_scale), (backend, ratio, name)
            for name in buffers:
                assert relative_error(buffers[name], oracle[2][name]) <= 1e-9, (backend, ratio, name)


def _dense_features(model: nn.Module, images: torch.Tensor, modules: list[str]) -> list[torch.Tensor]:
    """The outputs of the feature modules in the dense model's own forward (hooks, as timm's FeatureHooks)."""
    outputs = {}
    handles = [model.get_submodule(name).register_forward_hook(lambda m, i, o, name=name: outputs.__setitem__(name, o))
               for name in modules]
    try:
        model(images)
    finally:
        for handle in handles:
            handle.remove()
    return [outputs[name] for name in modules]


@pytest.mark.slow
@pytest.mark.parametrize("model_name", MODELS)
def test_all_visible_eval_equals_dense_model(dense_models, model_name):
    dense = dense_models(model_name).double().to(DEVICE).eval()
    images, _ = _inputs(batch=2, ratio=0.0)
    with torch.no_grad():
        encoders = {b: SparseEncoder.from_dense(dense, backend=b).eval() for b in ALL_BACKENDS}
        reference = _dense_features(dense, images, [level["module"] for level in encoders["torch"].feature_info])
        for backend, encoder in encoders.items():
            for actual, expected in zip(encoder(images, None), reference):
                assert actual.shape == expected.shape
                assert relative_error(actual, expected) <= 1e-9, backend


@pytest.mark.slow
@pytest.mark.parametrize("model_name", MODELS)
def test_export_after_a_training_step_loads_strict_into_the_timm_model(dense_models, model_name):
    dense = dense_models(model_name)
    encoder = SparseEncoder.from_dense(dense, backend="torch").train()
    images, mask = _inputs(batch=2, ratio=0.6)
    optimizer = torch.optim.SGD(encoder.parameters(), lr=0.1)
    sum(f.square().mean() for f in encoder(images.float(), mask)).backward()
    optimizer.step()
    fresh = timm.create_model(model_name)
    fresh.load_state_dict(encoder.to_dense().state_dict(), strict=True)
    for key, value in encoder.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key
    changed = [k for k, v in encoder.state_dict().items() if not torch.equal(v, dense.state_dict()[k])]
    assert changed  # the step reached the exported weights


def test_feature_levels_come_from_feature_info_at_strides_4_to_32():
    encoder = SparseEncoder.from_dense(timm.create_model("efficientnet_b0"), backend="torch")
    assert [(f["module"], f["reduction"], f["num_chs"]) for f in encoder.feature_info] == [
        ("blocks.1", 4, 24), ("blocks.2", 8, 40), ("blocks.4", 16, 112), ("blocks.6", 32, 320)]
    assert "conv_head.weight" not in encoder.state_dict()  # the classification head is not part of the encoder


def test_model_without_the_four_strides_is_refused_naming_what_it_has():
    with pytest.raises(UsageError, match=r"no feature level at stride \[4, 8, 32\].*blocks.11 \(stride 16\)"):
        SparseEncoder.from_dense(timm.create_model("vit_tiny_patch16_224"), backend="torch")


def test_unsupported_op_and_setting_are_refused_at_conversion_naming_the_module():
    model = timm.create_model("resnet18")
    model.layer2[0].act1 = nn.LocalResponseNorm(2)  # (PReLU, refused here before, converts since 3-D models use it)
    with pytest.raises(UsageError, match=r"module torch.nn.modules.normalization.LocalResponseNorm at 'layer2.0.act1'"):
        SparseEncoder.from_dense(model, backend="torch")
    dilated = timm.create_model("resnet18")
    dilated.layer3[1].conv1.dilation, dilated.layer3[1].conv1.padding = (2, 2), (2, 2)
    with pytest.raises(UsageError, match=r"Conv2d at 'layer3.1.conv1'.*dilation 1"):
        SparseEncoder.from_dense(dilated, backend="torch")


@pytest.mark.slow
@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_spark_training_step_runs_for_a_new_family(backend):
    """The decoder is wired from the encoder's feature_info: a SparK step on MobileNetV3 (depthwise, SE with
    hard-sigmoid, hard-swish) trains every encoder parameter that reaches the features."""
    model = build_spark("mobilenetv3_large_100", backend=backend, decoder_width=32).to(DEVICE).train()
    images, mask = _inputs(batch=2, ratio=0.6)
    loss = model(images.float(), mask)
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.encoder.parameters())


def test_sync_batchnorm_conversion_keeps_the_fused_activations_of_timm_families():
    """``trainer.sync_bn`` converts with timm's converter: RegNet's BatchNormAct2d becomes SyncBatchNormAct with its
    ReLU, so the loss is unchanged (outside a process group SyncBatchNorm computes plain batch norm)."""
    torch.manual_seed(0)
    model = build_spark("regnety_016", backend="masked", decoder_width=32).double()
    images = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    mask = random_mask(2, 2, 2, 0.5, generator=torch.Generator().manual_seed(0))
    expected = model(images, mask)
    converted = to_sync_batchnorm(copy.deepcopy(model))
    assert any(type(m).__name__ == "SyncBatchNormAct" for m in converted.modules())
    assert torch.equal(converted(images, mask), expected)
