"""Every sparse backend against the masked-dense oracle, and the dense <-> sparse converter."""

import copy

import pytest
import timm
import torch
import torchvision

from conftest import ALL_BACKENDS, DEVICE, SPARSE_BACKENDS, randomise_affine, relative_error
from sparkme import SparseEncoder, available_backends, random_mask
from sparkme.errors import UsageError
from sparkme.masking import mask_at_stride
from sparkme.models.backbones import TORCHVISION_RESNETS
from sparkme.models.families import TESTED_MODELS
from sparkme.sparse import ops, sparse_from_images

# The coverage table's families tested here at 224 px (tests/test_families.py covers the others at 64 px), and
# ResNet-18 for the cheaper batch test. ResNets are torchvision's: the converter must take them as well as timm's.
FAMILIES_HERE = ("ResNet", "ConvNeXt", "ConvNeXt V2")
MODELS = ["resnet18", *(TESTED_MODELS[family] for family in FAMILIES_HERE)]
TOLERANCE = 1e-4


def _dense(name: str) -> torch.nn.Module:
    return getattr(torchvision.models, name)() if name in TORCHVISION_RESNETS else timm.create_model(name)


def _inputs(batch, ratio, size=(224, 224), seed=0):
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(batch, 3, *size, generator=generator)
    mask = random_mask(batch, size[0] // 32, size[1] // 32, ratio, generator=generator)
    return images.to(DEVICE), mask.to(DEVICE)


def _forward_backward(encoder, images, mask):
    features = encoder(images, mask)
    generator = torch.Generator().manual_seed(2)
    # Drawn in float64 and cast: the float32 and float64 runs then backpropagate the same numbers (randn draws
    # different values per dtype), so their gradients are comparable.
    projections = [torch.randn(f.shape, generator=generator, dtype=torch.float64).to(f.device, f.dtype)
                   for f in features]
    sum((f * p).sum() for f, p in zip(features, projections)).backward()
    return features, {name: p.grad.clone() for name, p in encoder.named_parameters()}


@pytest.fixture(scope="module")
def dense_models():
    # Seeded here: a module fixture is built before the per-test seed, and the float32 checks depend on the draw.
    # With other random weights float32 gradients of every implementation, the masked oracle included, are
    # sometimes ~1e-3 off instead of ~3e-6 (ResNet-18, seeds 1-8: masked 6e-3 at seed 1, torch 2e-3 at seed 8):
    # train-mode BN over few visible rows amplifies rounding, and which implementation it hits is luck (README).
    torch.manual_seed(0)
    return {name: randomise_affine(_dense(name)) for name in MODELS}


def _run(dense, backend, images, mask, dtype):
    encoder = SparseEncoder.from_dense(copy.deepcopy(dense).to(DEVICE, dtype), backend=backend).train()
    features, grads = _forward_backward(encoder, images.to(dtype), mask)
    buffers = {k: v for k, v in encoder.named_buffers() if v.is_floating_point()}
    return features, grads, buffers


@pytest.mark.slow
@pytest.mark.parametrize("ratio", [0.6, 0.9])
@pytest.mark.parametrize("model_name", MODELS)
def test_sparse_backends_match_masked_oracle_in_float64(dense_models, model_name, ratio):
    """Exact semantics: forward, every parameter gradient and BN running stats agree to 1e-9 in float64."""
    images, mask = _inputs(batch=2, ratio=ratio)
    oracle = _run(dense_models[model_name], "masked", images, mask, torch.float64)
    for backend in SPARSE_BACKENDS:
        features, grads, buffers = _run(dense_models[model_name], backend, images, mask, torch.float64)
        for scale, (actual, expected) in enumerate(zip(features, oracle[0])):
            visible = mask_at_stride(mask, 4 * 2**scale)[:, None].expand_as(expected)
            assert relative_error(actual[visible], expected[visible]) <= 1e-9, (backend, scale)
            assert torch.all(actual[~visible] == 0) and torch.all(expected[~visible] == 0)
        assert grads.keys() == oracle[1].keys() and buffers.keys() == oracle[2].keys()
        for name in grads:
            assert relative_error(grads[name], oracle[1][name]) <= 1e-9, (backend, name)
        for name in buffers:
            assert relative_error(buffers[name], oracle[2][name]) <= 1e-9, (backend, name)


@pytest.mark.slow
@pytest.mark.parametrize("ratio", [0.6, 0.9])
@pytest.mark.parametrize("model_name", MODELS)
def test_sparse_backends_in_float32_are_as_accurate_as_the_oracle(dense_models, model_name, ratio):
    """float32 vs the float64 oracle, same inputs and projections, errors as ||error|| / ||float64 value||: the
    whole gradient within 1e-4 or 2x the float32 *oracle's* own error; each output and gradient tensor within 1e-4
    or 3x the oracle's error on that tensor. ResNet-18 and ConvNeXt meet 1e-4 (their oracle is ~5e-6 off).
    ResNet-50 cannot: train-mode BN over few visible rows (layer4 sees 10 rows at ratio 0.9, batch 2) amplifies
    float32 rounding ~1e5-1e6x, so every float32 implementation, the oracle included, is 1-6 % off overall and up
    to 9 % on single tensors, which one being luck; rounding only the activations to float32 in float64 arithmetic
    reproduces it (tools/float32_study.py, README). Where the oracle shows it (> 1e-3 off overall) the allowance
    has floors 2-3x above that measured noise, 15 % overall and 25 % per tensor, still far below the >= 50 % of a
    gradient scaled by 1.5 or negated."""
    images, mask = _inputs(batch=2, ratio=ratio)
    exact = _run(dense_models[model_name], "masked", images, mask, torch.float64)
    oracle32 = _run(dense_models[model_name], "masked", images, mask, torch.float32)

    def error(values, truths):  # ||values - truths|| / ||truths|| over one tensor or a list of them
        difference = sum(float((v.detach().double() - t).square().sum()) for v, t in zip(values, truths))
        return (difference / max(sum(float(t.square().sum()) for t in truths), 1e-300)) ** 0.5

    for backend in SPARSE_BACKENDS:
        features, grads, _ = _run(dense_models[model_name], backend, images, mask, torch.float32)
        pairs = [(f"scale{i}", features[i], oracle32[0][i], exact[0][i]) for i in range(4)]
        pairs += [(name, grads[name], oracle32[1][name], exact[1][name]) for name in grads]
        names = list(grads)
        oracle_whole = error([oracle32[1][n] for n in names], [exact[1][n] for n in names])
        whole_floor, tensor_floor = (0.15, 0.25) if oracle_whole > 1e-3 else (0.0, 0.0)
        whole = error([grads[n] for n in names], [exact[1][n] for n in names])
        assert whole <= max(TOLERANCE, 2 * oracle_whole, whole_floor), (backend, whole, oracle_whole)
        for name, actual, oracle_value, truth in pairs:
            allowed = max(TOLERANCE, 3 * error([oracle_value], [truth]), tensor_floor)
            assert error([actual], [truth]) <= allowed, (backend, name)


@pytest.mark.slow
@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("model_name", ["resnet50", "convnextv2_atto"])
def test_all_visible_eval_equals_dense_model(dense_models, model_name, backend):
    dense = copy.deepcopy(dense_models[model_name]).to(DEVICE).eval()
    images, _ = _inputs(batch=2, ratio=0.0, size=(128, 160))
    with torch.no_grad():
        features = SparseEncoder.from_dense(dense, backend=backend).eval()(images, None)
        if model_name.startswith("resnet"):
            x = dense.maxpool(dense.relu(dense.bn1(dense.conv1(images))))
            reference = []
            for layer in (dense.layer1, dense.layer2, dense.layer3, dense.layer4):
                x = layer(x)
                reference.append(x)
        else:
            reference = dense.forward_intermediates(images, intermediates_only=True)
    for actual, expected in zip(features, reference):
        assert actual.shape == expected.shape
        assert relative_error(actual, expected) <= TOLERANCE


@pytest.mark.slow
@pytest.mark.parametrize(
    "make_fresh,make_trained",
    [
        (lambda: torchvision.models.resnet50(), lambda: torchvision.models.resnet50()),
        (lambda: timm.create_model("convnext_tiny"), lambda: timm.create_model("convnext_tiny", drop_path_rate=0.1)),
    ],
    ids=["torchvision-resnet50", "timm-convnext_tiny"],
)
def test_to_dense_after_training_step_loads_strict_and_matches(make_fresh, make_trained):
    source = make_trained()
    encoder = SparseEncoder.from_dense(source, backend="minkowski").train()
    # dense -> sparse -> dense is bit-exact before any training
    assert all(torch.equal(v, source.state_dict()[k]) for k, v in encoder.to_dense().state_dict().items())
    optimizer = torch.optim.SGD(encoder.parameters(), lr=0.1)
    images, mask = _inputs(batch=2, ratio=0.6, size=(64, 64))
    sum(f.square().mean() for f in encoder(images, mask)).backward()
    optimizer.step()

    exported = encoder.to_dense().eval()
    fresh = make_fresh()
    fresh.load_state_dict(exported.state_dict(), strict=True)
    fresh.eval()
    assert not torch.equal(fresh.state_dict()[next(iter(encoder.state_dict()))],
                           source.state_dict()[next(iter(encoder.state_dict()))])  # the step changed weights
    for key, value in encoder.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key
    with torch.no_grad():
        assert torch.equal(fresh(images), exported(images))


@pytest.mark.slow
@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("model_name", ["resnet18", "convnextv2_atto"])
def test_outputs_of_a_sample_do_not_depend_on_the_rest_of_the_batch(dense_models, model_name, backend):
    encoder = SparseEncoder.from_dense(dense_models[model_name], backend=backend).to(DEVICE).eval()
    images, mask = _inputs(batch=3, ratio=0.6, size=(96, 128))
    with torch.no_grad():
        alone = encoder(images[:1], mask[:1])
        batched = encoder(images, mask)
    for single, full in zip(alone, batched):
        assert relative_error(full[:1], single) <= 1e-5


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_drop_path_keeps_or_drops_whole_samples(backend):
    images, mask = _inputs(batch=8, ratio=0.6, size=(64, 64))
    sparse = sparse_from_images(torch.ones_like(images), mask, backend)
    drop = timm.layers.DropPath(0.5).train()
    out = ops.drop_path(sparse, drop).to_dense()
    visible = sparse.dense_mask()[:, None].expand_as(out)
    values = [set(out[b][visible[b]].unique().tolist()) for b in range(8)]
    assert all(v in ({0.0}, {2.0}) for v in values), values
    assert {0.0} in values and {2.0} in values  # with p=0.5 and 8 samples, both outcomes (seeded)


def test_unknown_backend_lists_choices():
    with pytest.raises(ValueError, match="unknown sparse backend 'spconv'; choose one of minkowski, torch, masked"):
        SparseEncoder.from_dense(torchvision.models.resnet18(), backend="spconv")


def test_unsupported_backbone_and_layer_are_named():
    with pytest.raises(UsageError, match="unsupported backbone torchvision.models.vgg.VGG: it has no timm feature"):
        SparseEncoder.from_dense(torchvision.models.vgg11())
    model = timm.create_model("resnet18")
    model.layer2[0].act1 = torch.nn.AdaptiveAvgPool2d(1)
    with pytest.raises(UsageError, match=r"cannot run module .*AdaptiveAvgPool2d at 'layer2.0.act1' on sparse maps"):
        SparseEncoder.from_dense(model)


def test_feature_info_and_available_backends():
    encoder = SparseEncoder.from_dense(torchvision.models.resnet50(), backend="torch")
    assert [(f["num_chs"], f["reduction"]) for f in encoder.feature_info] == [(256, 4), (512, 8), (1024, 16),
                                                                              (2048, 32)]
    status = available_backends()
    assert status == {"minkowski": "available", "torch": "available", "masked": "available"}


def test_encoder_does_not_alias_the_dense_model():
    dense = torchvision.models.resnet18()
    encoder = SparseEncoder.from_dense(dense, backend="torch")
    before = copy.deepcopy(dense.state_dict())
    with torch.no_grad():
        next(encoder.parameters()).add_(1.0)
    assert all(torch.equal(v, before[k]) for k, v in dense.state_dict().items())
