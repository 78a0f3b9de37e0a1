"""Detection hand-offs of ``sparkme-export``: ``format=detectron2`` writes, byte for byte, the ``.pkl`` that SparK's
``downstream_d2/convert-timm-to-d2.py`` writes from the same weights (its rules restated below, applied to the
pretraining checkpoint's encoder and to a file in the layout of SparK's released ``*_1kpretrained_timm_style.pth``);
``format=mmdet`` is the file SparK's MMDetection ConvNeXt backbone loads with no unexpected key, its output norms
filled from SparK's densify norms when the source has them (missing from an encoder-only file); other families get
one line and exit status 2."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import timm
import torch
from run_records import trained_like
from spark_fixtures import official_convnext_shapes, random_state, timm_resnet_shapes
from torch import nn

from sparkme.export import main
from sparkme.models import LightDecoder, SparK, SparseEncoder, build_spark

# SparK's converter, restated as rules on a timm ResNet key: a key with no "layer" in it (the stem's conv1 / bn1)
# is put under "stem."; then each substitution below replaces every occurrence of its first string, in this order.
# The values become numpy arrays of the tensors as they are.
SPARK_D2_SUBSTITUTIONS = (("layer1", "res2"), ("layer2", "res3"), ("layer3", "res4"), ("layer4", "res5"),
                          ("bn1", "conv1.norm"), ("bn2", "conv2.norm"), ("bn3", "conv3.norm"),
                          ("downsample.0", "shortcut"), ("downsample.1", "shortcut.norm"))
# The top-level fields SparK's converter writes around the weights; pickled with Python's default protocol (4).
SPARK_D2_AUTHOR = "https://github.com/keyu-tian/SparK"
# SparK's downstream_d2/README.md: converting ResNet-50 reports len(state)==318.
RESNET50_D2_KEYS = 318


def spark_d2_key(key: str) -> str:
    if "layer" not in key:
        key = "stem." + key
    for old, new in SPARK_D2_SUBSTITUTIONS:
        key = key.replace(old, new)
    return key


def expected_d2_bytes(timm_style: dict[str, torch.Tensor]) -> bytes:
    """What SparK's converter writes for a ``*_1kpretrained_timm_style.pth`` holding ``timm_style``."""
    weights = {spark_d2_key(k): v.detach().numpy() for k, v in timm_style.items()}
    return pickle.dumps({"model": weights, "__author__": SPARK_D2_AUTHOR, "matching_heuristics": True}, protocol=4)


def pretraining_checkpoint(path: Path, model: SparK, name: str) -> Path:
    config = {"image_size": 64, "model": {"_target_": "sparkme.models.build_spark", "model_name": name,
                                          "source": "timm", "drop_path_rate": 0.0, "decoder_width": 32,
                                          "backend": "torch", "mask_ratio": 0.6}}
    torch.save({"model": model.state_dict(), "config": config, "step": 3}, path)
    return path


@pytest.mark.slow
@pytest.mark.parametrize("name", ["resnet50", "resnet101"])
def test_detectron2_file_is_spark_converters_bytes_from_a_pretraining_checkpoint(name, tmp_path):
    model = trained_like(build_spark(name, backend="torch", decoder_width=32), seed=1)
    ckpt = pretraining_checkpoint(tmp_path / "latest.pt", model, name)
    out = tmp_path / f"{name}_d2.pkl"
    assert main([f"ckpt={ckpt}", "format=detectron2", f"out={out}"]) == 0
    # SparK's timm-style file of these weights: the encoder's tensors without the classifier, in timm's order.
    encoder = {k[len("encoder."):]: v for k, v in model.state_dict().items() if k.startswith("encoder.")}
    timm_style = {k: encoder[k] for k in timm.create_model(name, num_classes=0).state_dict()}
    assert out.read_bytes() == expected_d2_bytes(timm_style)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["resnet50", "resnet101"])
def test_detectron2_file_is_spark_converters_bytes_from_sparks_released_layout(name, tmp_path):
    released = random_state(timm_resnet_shapes(name), seed=2)
    source = tmp_path / f"{name}_1kpretrained_timm_style.pth"
    torch.save(released, source)
    out = tmp_path / f"{name}_d2.pkl"
    assert main([f"ckpt={source}", f"model={name}", "format=detectron2", f"out={out}"]) == 0
    written = out.read_bytes()
    assert written == expected_d2_bytes(released)
    # The file is the one this test just wrote (trusted): reading it back with pickle is safe here only.
    contents = pickle.loads(written)
    assert set(contents) == {"model", "__author__", "matching_heuristics"}
    floats = {k: v for k, v in contents["model"].items() if not k.endswith("num_batches_tracked")}
    assert all(v.dtype.name == "float32" for v in floats.values())
    if name == "resnet50":
        assert len(contents["model"]) == RESNET50_D2_KEYS
        assert {"stem.conv1.weight", "stem.conv1.norm.running_var", "res2.0.shortcut.norm.bias",
                "res5.2.conv3.norm.weight"} <= set(contents["model"])


@pytest.mark.parametrize("name", ["convnext_atto", "resnet50d", "efficientnet_b0"])
def test_detectron2_refuses_other_families_in_one_line(name, tmp_path, capsys):
    source = tmp_path / "weights.pt"
    torch.save({"conv1.weight": torch.zeros(1)}, source)  # never read: the refusal comes first
    with pytest.raises(SystemExit) as exit_info:
        main([f"ckpt={source}", f"model={name}", "format=detectron2", f"out={tmp_path / 'x.pkl'}"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1, err
    assert err.startswith("sparkme-export: error: format=detectron2 writes detectron2's ResNet") and name in err
    assert not (tmp_path / "x.pkl").exists()


def test_detectron2_refusal_comes_before_the_model_is_rebuilt(tmp_path, capsys):
    """From a pretraining checkpoint too, the backbone's name is checked before anything heavy."""
    dense = timm.create_model("convnext_atto", conv_mlp=False)
    model = SparK(SparseEncoder.from_dense(dense, "torch"), LightDecoder(32))
    ckpt = pretraining_checkpoint(tmp_path / "latest.pt", model, "convnext_atto")
    with pytest.raises(SystemExit) as exit_info:
        main([f"ckpt={ckpt}", "format=detectron2", f"out={tmp_path / 'x.pkl'}"])
    assert exit_info.value.code == 2 and "'convnext_atto'" in capsys.readouterr().err


# --- MMDetection / MMSegmentation: SparK's downstream_mmdet ConvNeXt backbone ----------------------------------
# mmcv 1.x / mmdet 2.x, which SparK's backbone file imports, have no wheels for this torch (mmcv compiles its ops),
# so the backbone is rebuilt here from that definition's text: the same module names and tensor shapes.

class ChannelsNorm(nn.Module):
    """The definition's own LayerNorm: parameters ``weight`` and ``bias`` of the channel count."""

    def __init__(self, channels: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))


class MMDetConvNeXtBlock(nn.Module):
    """dwconv 7x7 depthwise, norm, pwconv1 / pwconv2 as Linear (C -> 4C -> C), layer scale ``gamma`` (C,)."""

    def __init__(self, dim: int):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.norm = ChannelsNorm(dim)
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.pwconv2 = nn.Linear(4 * dim, dim)
        self.gamma = nn.Parameter(torch.ones(dim))


class MMDetConvNeXt(nn.Module):
    """``downsample_layers``: [stem conv 4x4/4 + norm] then three [norm + conv 2x2/2]; ``stages``: one Sequential
    of blocks per stage; ``norm0`` .. ``norm3``: a norm on each returned stage (``out_indices=[0, 1, 2, 3]``)."""

    def __init__(self, depths: tuple[int, ...], dims: tuple[int, ...]):
        super().__init__()
        self.downsample_layers = nn.ModuleList([nn.Sequential(nn.Conv2d(3, dims[0], 4, stride=4),
                                                              ChannelsNorm(dims[0]))])
        for i in range(3):
            self.downsample_layers.append(nn.Sequential(ChannelsNorm(dims[i]),
                                                        nn.Conv2d(dims[i], dims[i + 1], 2, stride=2)))
        self.stages = nn.ModuleList(nn.Sequential(*[MMDetConvNeXtBlock(d) for _ in range(n)])
                                    for n, d in zip(depths, dims))
        for i, d in enumerate(dims):
            self.add_module(f"norm{i}", ChannelsNorm(d))


def mmcv_custom_state_dict(checkpoint: dict) -> dict[str, torch.Tensor]:
    """What ``mmcv_custom.load_checkpoint`` hands to ``load_state_dict``: the ``state_dict`` entry, else the
    ``model`` entry, else the dict itself; a ``module.`` prefix stripped; when the alphabetically first key starts
    with ``encoder``, only the ``encoder.`` keys, unprefixed."""
    state = checkpoint.get("state_dict", checkpoint.get("model", checkpoint))
    if next(iter(state)).startswith("module."):
        state = {k[len("module."):]: v for k, v in state.items()}
    if sorted(state)[0].startswith("encoder"):
        state = {k[len("encoder."):]: v for k, v in state.items() if k.startswith("encoder.")}
    return state


# (timm name, SparK's downstream config values): convnext_tiny as in ConvNeXt's mmdet config; convnext_atto small.
MMDET_CONVNEXTS = {"convnext_atto": ((2, 2, 6, 2), (40, 80, 160, 320)),
                   "convnext_tiny": ((3, 3, 9, 3), (96, 192, 384, 768))}
NEW_OUTPUT_NORMS = {f"norm{i}.{p}" for i in range(4) for p in ("weight", "bias")}


def densify_norm_of_stage(model_state: dict[str, torch.Tensor], stage: int, param: str) -> torch.Tensor:
    """SparK's densify norm at the output of ConvNeXt stage ``stage``: its ``densify_norms[j]`` counts from the
    smallest map (stride 32, stage 3) up, so stage i is j = 3 - i (sparkme's ``densify.j`` keeps SparK's index)."""
    return model_state[f"densify.{3 - stage}.norm.{param}"]


def assert_output_norms_are_densify_norms(loaded: dict[str, torch.Tensor], model_state: dict[str, torch.Tensor]):
    for i in range(4):
        for param in ("weight", "bias"):
            assert torch.equal(loaded[f"norm{i}.{param}"], densify_norm_of_stage(model_state, i, param)), (i, param)


@pytest.mark.parametrize("name", list(MMDET_CONVNEXTS))
def test_mmdet_file_loads_into_sparks_convnext_backbone(name, tmp_path):
    depths, dims = MMDET_CONVNEXTS[name]
    model = trained_like(build_spark(name, backend="torch", decoder_width=32), seed=3)
    dense = model.encoder.to_dense().state_dict()  # timm's atto holds its MLP as 1x1 convs, the backbone as Linear
    ckpt = pretraining_checkpoint(tmp_path / "latest.pt", model, name)
    out = tmp_path / f"{name}_mmdet.pth"
    assert main([f"ckpt={ckpt}", "format=mmdet", f"out={out}"]) == 0
    checkpoint = torch.load(out, weights_only=True)
    assert list(checkpoint) == ["state_dict"]
    backbone = MMDetConvNeXt(depths, dims)
    result = backbone.load_state_dict(mmcv_custom_state_dict(checkpoint), strict=False)
    assert result.unexpected_keys == [] and result.missing_keys == [], result
    loaded = backbone.state_dict()
    assert_output_norms_are_densify_norms(loaded, model.state_dict())
    assert torch.equal(loaded["stages.2.1.pwconv1.weight"], dense["stages.2.blocks.1.mlp.fc1.weight"].flatten(1))
    assert torch.equal(loaded["downsample_layers.3.1.weight"], dense["stages.3.downsample.1.weight"])
    assert torch.equal(loaded["downsample_layers.0.1.bias"], dense["stem.1.bias"])
    # The same weights as format=spark (SparK's *_official_style file), only wrapped.
    spark_out = tmp_path / f"{name}_official_style.pth"
    assert main([f"ckpt={ckpt}", "format=spark", f"out={spark_out}"]) == 0
    official = torch.load(spark_out, weights_only=True)
    assert list(official) == [k for k in checkpoint["state_dict"] if k not in NEW_OUTPUT_NORMS]
    assert all(torch.equal(official[k], checkpoint["state_dict"][k]) for k in official)


def test_mmdet_file_from_sparks_withdecoder_file_has_its_densify_norms(tmp_path):
    """SparK's ``*_withdecoder_*spark_style`` layout holds ``densify_norms.j``: they fill the output norms."""
    model = trained_like(build_spark("convnext_atto", backend="torch"), seed=5)
    ckpt = pretraining_checkpoint(tmp_path / "latest.pt", model, "convnext_atto")
    ckpt_state = torch.load(ckpt, weights_only=True)
    ckpt_state["config"]["model"]["decoder_width"] = 768  # the width model=NAME rebuilds SparK with
    torch.save(ckpt_state, ckpt)
    source = tmp_path / "convnext_atto_withdecoder_1kpretrained_spark_style.pth"
    assert main([f"ckpt={ckpt}", "format=spark_withdecoder", f"out={source}"]) == 0
    out = tmp_path / "mmdet.pth"
    assert main([f"ckpt={source}", "model=convnext_atto", "format=mmdet", f"out={out}"]) == 0
    backbone = MMDetConvNeXt(*MMDET_CONVNEXTS["convnext_atto"])
    result = backbone.load_state_dict(mmcv_custom_state_dict(torch.load(out, weights_only=True)), strict=False)
    assert result.unexpected_keys == [] and result.missing_keys == [], result
    assert_output_norms_are_densify_norms(backbone.state_dict(), model.state_dict())


def test_mmdet_file_from_sparks_released_convnext_layout(tmp_path, capsys):
    """An encoder-only file has no densify norms: the output norms stay missing, and the export says so."""
    depths, dims = MMDET_CONVNEXTS["convnext_tiny"]
    released = random_state(official_convnext_shapes(depths, dims), seed=4)
    source = tmp_path / "convnextT_1kpretrained_official_style.pth"
    torch.save(released, source)
    out = tmp_path / "mmdet.pth"
    assert main([f"ckpt={source}", "model=convnext_tiny", "format=mmdet", f"out={out}"]) == 0
    checkpoint = torch.load(out, weights_only=True)
    state = checkpoint["state_dict"]
    assert set(state) == set(released) and all(torch.equal(state[k], v) for k, v in released.items())
    result = MMDetConvNeXt(depths, dims).load_state_dict(mmcv_custom_state_dict(checkpoint), strict=False)
    assert result.unexpected_keys == [] and set(result.missing_keys) == NEW_OUTPUT_NORMS, result
    said = [line for line in capsys.readouterr().out.splitlines() if "norm0-norm3" in line]
    assert len(said) == 1 and "encoder only" in said[0], said


@pytest.mark.parametrize("name", ["resnet50", "convnextv2_atto"])
def test_mmdet_refuses_other_families_in_one_line(name, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([f"ckpt={tmp_path / 'never_read.pt'}", f"model={name}", "format=mmdet", f"out={tmp_path / 'x.pth'}"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1, err
    assert err.startswith("sparkme-export: error: format=mmdet writes SparK's MMDetection ConvNeXt") and name in err


# --- model=NAME: exports from files that are not sparkme checkpoints -------------------------------------------

@pytest.mark.slow
def test_model_argument_names_what_is_wrong_in_one_line(tmp_path, capsys):
    released = tmp_path / "resnet18_1kpretrained_timm_style.pth"
    torch.save(random_state(timm_resnet_shapes("resnet18"), seed=9), released)
    cases = {("model=resnet1800", "format=timm"): "unknown model 'resnet1800'",
             ("model=resnet34", "format=timm"): "do not fit this model",
             ("model=resnet18", "format=spark_withdecoder"): "holds the encoder only"}
    for extra, expected in cases.items():
        with pytest.raises(SystemExit) as exit_info:
            main([f"ckpt={released}", f"out={tmp_path / 'x.pt'}", *extra])
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and err.count("\n") == 1 and expected in err, (extra, err)
    assert not (tmp_path / "x.pt").exists()
