"""The 3-D engine: every sparse backend against the masked oracle on volumes (float64, outputs, every gradient and
norm statistics), the oracle against the dense model itself, SparK's 3-D rules, and export back to dense.

Volumes are tiny (32^3 for the test ResEnc with total stride 16, 64x32x32 for MONAI's stride-32 ResNet) so the file
runs in about a minute on two cores.
"""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import ALL_BACKENDS, SPARSE_BACKENDS, relative_error
from sparkme import build_spark
from sparkme.masking import mask_at_stride, random_grid_mask
from sparkme.models.encoder import SparseEncoder
from sparkme.models.volumes import create_volume_backbone, resenc_unet, volume_feature_levels, volume_patch_size
from sparkme.sparse import MaskContext, get_backend, ops
from sparkme.sparse.conv import freeze_spec, module_conv2d

TOLERANCE = 1e-9  # float64: sparse and dense sums differ in order only


def _randomise_norms(model: nn.Module) -> nn.Module:
    """Norm affines away from 1/0 (and BN running stats), so every norm parameter matters."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.modules.batchnorm._NormBase, nn.GroupNorm)) and module.weight is not None:
                module.weight.copy_(1 + 0.3 * torch.randn(module.weight.shape, generator=generator))
                module.bias.copy_(0.3 * torch.randn(module.bias.shape, generator=generator))
    return model


def _edge_mask(batch: int, grid: tuple[int, ...]) -> torch.Tensor:
    """Sample 0 all visible, sample 1 one visible patch, the rest random halves: the per-sample statistics'
    edge cases."""
    mask = random_grid_mask(batch, grid, 0.5, generator=torch.Generator().manual_seed(3))
    mask[0] = True
    mask[1] = False
    mask[1].view(-1)[-1] = True
    return mask


def _run(dense, name, backend, volumes, mask):
    encoder = SparseEncoder(copy.deepcopy(dense), backend=backend, levels=volume_feature_levels(name, dense),
                            densify_norm="in", patch_size=volume_patch_size(name), spatial_dims=3).train()
    features = encoder(volumes, mask)
    generator = torch.Generator().manual_seed(2)
    projections = [torch.randn(f.shape, generator=generator, dtype=f.dtype) for f in features]
    sum((f * p).sum() for f, p in zip(features, projections)).backward()
    grads = {key: p.grad.clone() for key, p in encoder.named_parameters()}
    buffers = {key: b.clone() for key, b in encoder.named_buffers() if b.is_floating_point()}
    return encoder, [f.detach() for f in features], grads, buffers


def _assert_close(ours, oracle, what):
    features, grads, buffers = ours
    ref_features, ref_grads, ref_buffers = oracle
    for level, (a, b) in enumerate(zip(features, ref_features)):
        assert relative_error(a, b) < TOLERANCE, f"{what}: feature level {level}"
    # Conv biases followed by an instance norm have an exactly-zero gradient; compare to the largest gradient.
    scale = max(g.abs().max().item() for g in ref_grads.values())
    for key, grad in ref_grads.items():
        assert (grads[key] - grad).abs().max().item() <= TOLERANCE * scale, f"{what}: gradient of {key}"
    for key, buffer in ref_buffers.items():
        assert relative_error(buffers[key], buffer) < TOLERANCE, f"{what}: norm statistic {key}"


CASES = {  # model -> (batch, volume size, input channels)
    "resenc_tiny": (3, (32, 32, 32), 2),
    "monai_resnet10": (3, (64, 32, 32), 1),
    "monai_segresnet": (2, (16, 16, 16), 1),  # GroupNorm, pre-activation blocks; total stride 8
}


@pytest.fixture(scope="module")
def oracle_runs():
    """The masked oracle's run of each model, shared by the backend tests."""
    runs = {}
    for name, (batch, size, channels) in CASES.items():
        torch.manual_seed(0)
        dense = _randomise_norms(create_volume_backbone(name, in_chans=channels)).double()
        volumes = torch.randn(batch, channels, *size, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
        mask = _edge_mask(batch, tuple(side // volume_patch_size(name) for side in size))
        runs[name] = (dense, volumes, mask, _run(dense, name, "masked", volumes, mask)[1:])
    return runs


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("backend", SPARSE_BACKENDS)
def test_3d_encoders_equal_the_masked_oracle(oracle_runs, name, backend):
    dense, volumes, mask, oracle = oracle_runs[name]
    _assert_close(_run(dense, name, backend, volumes, mask)[1:], oracle, f"{name} on {backend}")


def test_the_oracle_is_the_dense_resenc_on_an_all_visible_sample(oracle_runs):
    """Instance norm is per sample: the all-visible sample's features are the dense encoder's on that sample alone
    (an independent check of the oracle, down to the deepest stage)."""
    dense, volumes, mask, (features, _, _) = oracle_runs["resenc_tiny"]
    reference = dense.train()(volumes[:1])
    levels = volume_feature_levels("resenc_tiny", dense)
    for level, feature in zip(levels, features):
        stage = int(level["module"].split(".")[1])
        assert relative_error(feature[:1], reference[stage]) < TOLERANCE


def test_instance_norm_statistics_are_over_visible_voxels_only(oracle_runs):
    """The nearly empty sample (one visible patch) is normalised with the mean and variance of its visible voxels
    alone (nnssl's sparse instance norm), computed here from the dense conv of the masked volume."""
    dense, volumes, mask, _ = oracle_runs["resenc_tiny"]
    stem = dense.stem.convs[0]
    freeze_spec(stem.conv)
    visible = mask_at_stride(mask, 1, 16)[1]
    with torch.no_grad():
        conv = F.conv3d(volumes * mask_at_stride(mask, 1, 16)[:, None], stem.conv.weight, stem.conv.bias, padding=1)
        rows = conv[1][:, visible]  # (C, N_visible)
        mean, variance = rows.mean(dim=1, keepdim=True), rows.var(dim=1, unbiased=False, keepdim=True)
        expected = (rows - mean) / torch.sqrt(variance + stem.norm.eps) * stem.norm.weight[:, None] \
            + stem.norm.bias[:, None]
        for backend in ALL_BACKENDS:
            x = get_backend(backend).from_images(volumes, MaskContext(mask, volumes.shape[2:], patch_size=16))
            out = ops.instance_norm(module_conv2d(x, stem.conv), stem.norm).to_dense()[1]  # (C, D, H, W)
            assert relative_error(out[:, visible], expected) < TOLERANCE, backend
            assert (out[:, ~visible] == 0).all(), backend


class _PoolNet(nn.Module):
    """LeakyReLU then max pooling (the case where a zero-filled pool lets a masked 0 win), then GroupNorm, PReLU,
    a grouped 3x3x3 conv, a depthwise conv, a 1x1x1 conv, concatenation and average pooling."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv3d(2, 8, 3, padding=1)
        self.act = nn.LeakyReLU(0.1)
        self.pool = nn.MaxPool3d(3, 2, 1)
        self.norm = nn.GroupNorm(2, 8)
        self.prelu = nn.PReLU(8)
        self.grouped = nn.Conv3d(8, 8, 3, stride=2, padding=1, groups=2)
        self.depthwise = nn.Conv3d(8, 8, 3, padding=1, groups=8)
        self.pointwise = nn.Conv3d(16, 8, 1)
        self.avg = nn.AvgPool3d(2, 2)
        self.inorm = nn.InstanceNorm3d(8, affine=True)

    def forward(self, x):
        x = self.pool(self.act(self.stem(x) + -3.0))  # mostly negative before the pool
        x = self.prelu(self.norm(x))
        y = self.grouped(x)
        y = torch.cat([y, self.depthwise(y)], dim=1)
        y = self.inorm(self.pointwise(y))
        return self.avg(y) + 0.5


POOL_LEVELS = [dict(module="pool", reduction=2, num_chs=8), dict(module="prelu", reduction=2, num_chs=8),
               dict(module="inorm", reduction=4, num_chs=8), dict(module="avg", reduction=8, num_chs=8)]


def _pool_net_run(backend, dense, volumes, mask):
    encoder = SparseEncoder(dense, backend=backend, levels=POOL_LEVELS, densify_norm="in", patch_size=8,
                            spatial_dims=3)
    features = encoder(volumes, mask)
    sum((f * torch.cos(torch.arange(f.numel(), dtype=f.dtype)).view(f.shape)).sum() for f in features).backward()
    return [f.detach() for f in features], {k: p.grad.clone() for k, p in encoder.named_parameters()}, {}


def test_max_pool_with_negatives_and_the_other_3d_ops_on_every_backend():
    torch.manual_seed(0)
    dense = _randomise_norms(_PoolNet()).double()
    volumes = torch.randn(2, 2, 16, 16, 16, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    mask = _edge_mask(2, (2, 2, 2))
    oracle = _pool_net_run("masked", dense, volumes, mask)
    # The oracle's max is over visible voxels: for the nearly empty sample, recompute it with -inf at masked voxels
    # and check the zero-filled pool differs (so the case is exercised).
    with torch.no_grad():
        visible = mask_at_stride(mask, 1, 8)[:, None]
        activated = dense.act(dense.stem(volumes * visible) + -3.0)
        expected = F.max_pool3d(activated.masked_fill(~visible, float("-inf")), 3, 2, 1)
        zero_filled = F.max_pool3d(activated * visible, 3, 2, 1)
        visible2 = mask_at_stride(mask, 2, 8)[:, None]
        assert torch.equal(oracle[0][0][visible2.expand_as(expected)], expected[visible2.expand_as(expected)])
        assert not torch.equal(expected[visible2.expand_as(expected)], zero_filled[visible2.expand_as(expected)])
    for backend in SPARSE_BACKENDS:
        _assert_close(_pool_net_run(backend, dense, volumes, mask), oracle, f"pool net on {backend}")


def test_to_dense_loads_strictly_and_its_keys_fit_the_nnunet_network():
    dense = create_volume_backbone("resenc_tiny", in_chans=1)
    encoder = SparseEncoder(dense, backend="torch", levels=volume_feature_levels("resenc_tiny", dense),
                            densify_norm="in", patch_size=16, spatial_dims=3)
    with torch.no_grad():
        for p in encoder.parameters():
            p.add_(torch.randn_like(p))
    exported = encoder.to_dense()
    fresh = create_volume_backbone("resenc_tiny", in_chans=1)
    fresh.load_state_dict(exported.state_dict(), strict=True)
    volumes = torch.randn(1, 1, 32, 32, 32)
    reference = encoder(volumes)  # all visible: the sparse encoder is the dense one
    for level, feature in zip(volume_feature_levels("resenc_tiny", dense), reference):
        stage = int(level["module"].split(".")[1])
        assert relative_error(fresh(volumes)[stage], feature) < 1e-5
    network = resenc_unet("resenc_tiny", in_chans=1, num_classes=3).state_dict()
    prefixed = {f"encoder.{key}": value for key, value in exported.state_dict().items()}
    assert set(prefixed) <= set(network)
    assert all(network[key].shape == value.shape for key, value in prefixed.items())


@pytest.mark.slow
def test_3d_spark_forward_backward_agrees_on_every_backend():
    results = {}
    for backend in ALL_BACKENDS:
        torch.manual_seed(0)
        spark = build_spark("resenc_tiny", backend=backend, in_chans=2, decoder_width=16, mask_ratio=0.75).double()
        volumes = torch.randn(2, 2, 32, 32, 32, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
        mask = spark.sample_mask(volumes, torch.Generator().manual_seed(2))
        loss = spark(volumes, mask)
        loss.backward()
        results[backend] = loss.item(), {k: p.grad.clone() for k, p in spark.named_parameters()}
    loss, grads = results["masked"]
    assert 0.5 < loss < 2.0  # SparK's ~1 at initialisation: a ~0 prediction of a per-patch-normalised target
    scale = max(g.abs().max().item() for g in grads.values())
    for backend in SPARSE_BACKENDS:
        assert abs(results[backend][0] - loss) < 1e-10 * loss, backend
        for key, grad in grads.items():
            assert (results[backend][1][key] - grad).abs().max().item() <= TOLERANCE * scale, (backend, key)


@pytest.mark.slow
def test_3d_spark_rules():
    torch.manual_seed(0)
    # On the oracle: the masked-dense backend is the one that holds masked voxels, so the one that could leak them.
    spark = build_spark("resenc_tiny", backend="masked", in_chans=1, decoder_width=16, mask_ratio=0.75)
    volumes = torch.randn(2, 1, 32, 32, 32)
    mask = spark.sample_mask(volumes, torch.Generator().manual_seed(0))
    # Cubic patches at the encoder's total stride: the mask grid is the bottleneck grid, so every stage is sparse.
    assert spark.patch_size == 16 and mask.shape == (2, 2, 2, 2) and mask.sum().item() == 2 * 2
    features = spark.encoder.forward_sparse(volumes, mask)
    assert tuple(features[-1].dense_mask().shape[1:]) == tuple(mask.shape[1:])
    for feature in features:
        visible = feature.visible_rows(feature.features).shape[0]
        assert visible == mask.sum().item() * (16 // feature.stride) ** 3
    # The input is masked before the first convolution: masked voxels never reach the reconstruction.
    changed = torch.where(mask_at_stride(mask, 1, 16)[:, None], volumes, torch.randn_like(volumes) * 100)
    spark.eval()
    with torch.no_grad():
        assert torch.equal(spark.reconstruct_normalised(volumes, mask), spark.reconstruct_normalised(changed, mask))
        original, masked_input, pasted = spark.reconstruct(volumes, mask)
    assert pasted.shape == original.shape == (2, 1, 32, 32, 32)
    visible = mask_at_stride(mask, 1, 16)[:, None]
    assert torch.equal(pasted[visible], volumes[visible]) and (masked_input[~visible] == 0).all()
    # Plain MSE (nnssl's) is the per-voxel squared error over the masked patches.
    spark.loss = "mse"
    with torch.no_grad():
        output = spark.reconstruct_normalised(volumes, mask)
        hidden = ~visible
        expected = ((output - volumes)[hidden.expand_as(volumes)] ** 2).mean()
        assert torch.allclose(spark(volumes, mask), expected)


def test_monai_resnet18_builds_a_3d_spark_with_stride_32_patches():
    with torch.device("meta"):
        spark = build_spark("monai_resnet18", backend="masked", in_chans=3, decoder_width=64)
    assert spark.patch_size == 32 and spark.spatial_dims == 3
    assert [level["reduction"] for level in spark.encoder.feature_info] == [4, 8, 16, 32]
    assert spark.decoder.proj.out_channels == 3
