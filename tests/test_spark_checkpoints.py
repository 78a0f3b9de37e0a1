"""SparK's released checkpoints in and out: its four file layouts load into sparkme (API and ``init=`` on the CLI),
map back bit-exactly, and a model made from an official-layout file computes the same loss as its source."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from spark_fixtures import (
    official_convnext_shapes,
    random_state,
    spark_module_shapes,
    spark_wrapper,
    timm_resnet_shapes,
)

from sparkme.errors import UsageError
from sparkme.masking import random_mask
from sparkme.models import LightDecoder, SparK, SparseEncoder, build_spark
from sparkme.models.spark_layouts import (
    backbone_family,
    convnext_official_to_timm,
    encoder_to_official,
    fit_pointwise_convs,
    sparkme_to_spark,
)
from sparkme.models.weights import LAYOUTS, load_weights

REPO = Path(__file__).resolve().parent.parent
CONVNEXT = {"convnext_atto": dict(depths=(2, 2, 6, 2), dims=(40, 80, 160, 320)),
            "convnext_tiny": dict(depths=(3, 3, 9, 3), dims=(96, 192, 384, 768))}
# Decoder width of the in-process tests: convnext_atto at 320 exercises SparK's identity densify projection
# (stride-32 width == decoder width), as ConvNeXt-S does at 768.
MODELS = {"resnet18": 64, "convnext_atto": 320}


def encoder_shapes(name: str) -> dict[str, tuple[int, ...]]:
    return timm_resnet_shapes(name) if name.startswith("resnet") else official_convnext_shapes(**CONVNEXT[name])


def official_file(name: str, with_decoder: bool, width: int | None = None, seed: int = 0) -> dict:
    """A stand-in for SparK's download: encoder-only (``*_timm_style`` / ``*_official_style``) or wrapped whole."""
    if not with_decoder:
        return random_state(encoder_shapes(name), seed)
    widths = [64, 128, 256, 512] if name.startswith("resnet") else list(CONVNEXT[name]["dims"])
    norm = "bn" if name.startswith("resnet") else "ln"
    shapes = spark_module_shapes(encoder_shapes(name), widths, width or MODELS[name], norm, 64)
    return spark_wrapper(random_state(shapes, seed), name, 64)


def family(model) -> str | None:
    return backbone_family(k[len("encoder."):] for k in model.state_dict() if k.startswith("encoder."))


def fresh(name: str, seed: int = 1) -> SparK:
    torch.manual_seed(seed)
    width = MODELS[name]
    if name == "convnext_atto":  # SparK's ConvNeXt MLP is Linear; timm's atto defaults to 1x1 convs (conv_mlp)
        encoder = SparseEncoder.from_dense(timm.create_model(name, conv_mlp=False), backend="masked")
        return SparK(encoder, LightDecoder(width))
    return build_spark(name, backend="masked", decoder_width=width)


def loss_of(model, seed: int = 3) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(2, 3, 64, 64, generator=g)
    mask = random_mask(2, 2, 2, ratio=0.5, generator=g)
    model.eval()
    with torch.no_grad():
        return model(images, mask)


@pytest.mark.parametrize("name", list(MODELS))
def test_whole_spark_file_loads_every_key_and_maps_back_bit_exactly(name):
    original = official_file(name, with_decoder=True)
    model = fresh(name)
    report = model.load_weights(original)
    assert report.layout == "spark" and report.kept == []
    assert set(report.ignored) == {"imn_m", "imn_s", "norm_black", "config", "args", "input_size", "arch", "epoch",
                                   "performance_desc", "optimizer", "is_pretrain"}
    back = sparkme_to_spark(model.state_dict(), family(model))
    module = {k: v for k, v in original["module"].items() if k not in ("imn_m", "imn_s", "norm_black", "config")}
    assert set(back) == set(module)
    for key, value in module.items():
        assert back[key].shape == value.shape and torch.equal(back[key], value), key


@pytest.mark.parametrize("name", list(MODELS))
def test_encoder_only_file_loads_the_encoder_and_maps_back_bit_exactly(name):
    original = official_file(name, with_decoder=False)
    model = fresh(name)
    decoder_before = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("encoder.")}
    report = model.load_weights(original)
    assert report.layout == ("encoder" if name.startswith("resnet") else "convnext_official")
    assert sorted(report.kept) == sorted(decoder_before) and report.ignored == {}
    assert all(torch.equal(model.state_dict()[k], v) for k, v in decoder_before.items())
    encoder = {k[len("encoder."):]: v for k, v in model.state_dict().items() if k.startswith("encoder.")}
    back = encoder_to_official(encoder, family(model))
    assert set(back) == set(original)
    for key, value in original.items():
        assert torch.equal(back[key], value), key


@pytest.mark.parametrize("name", list(MODELS))
def test_model_loaded_from_official_layout_computes_the_same_loss_as_its_source(name, tmp_path):
    source = fresh(name, seed=5)
    with torch.no_grad():
        for p in source.parameters():  # away from the initialisation, so the test sees every tensor
            p.add_(0.01 * torch.randn_like(p))
    path = tmp_path / "withdecoder_spark_style.pth"
    torch.save(spark_wrapper(sparkme_to_spark(source.state_dict(), family(source), input_size=64), name, 64),
               path)
    copy = fresh(name, seed=6)
    assert not torch.equal(loss_of(copy), loss_of(source))
    copy.load_weights(path)
    assert torch.equal(loss_of(copy), loss_of(source))


def test_bad_files_give_one_clear_usage_error(tmp_path):
    model = fresh("resnet18")
    resnet50 = random_state(timm_resnet_shapes("resnet50"))
    with pytest.raises(UsageError, match=r"shape mismatch.*conv1.weight|unknown to this model"):
        load_weights(model, resnet50)
    with pytest.raises(UsageError, match="unknown checkpoint layout"):
        load_weights(model, {"foo.weight": torch.zeros(3)})
    with pytest.raises(UsageError, match="official ConvNeXt layout.*resnet"):
        load_weights(model, official_file("convnext_atto", with_decoder=False))
    whole = official_file("resnet18", with_decoder=True)
    whole["module"]["dense_decoder.extra.weight"] = torch.zeros(1)
    with pytest.raises(UsageError, match="dense_decoder.extra.weight"):
        load_weights(model, whole)
    with pytest.raises(UsageError, match="decoder_width"):
        load_weights(build_spark("resnet18", "masked", decoder_width=32), official_file("resnet18", True))
    truncated = tmp_path / "cut.pth"
    torch.save(official_file("resnet18", with_decoder=False), truncated)
    truncated.write_bytes(truncated.read_bytes()[:1000])
    with pytest.raises(UsageError, match="truncated or not a torch checkpoint"):
        load_weights(model, truncated)
    pickled = tmp_path / "pickled.pth"
    torch.save({"model": Path("x")}, pickled)
    with pytest.raises(UsageError, match="pickled Python objects") as error:
        load_weights(model, pickled)
    assert "weights_only=False" not in str(error.value)


def test_official_linear_mlp_fits_timm_conv_mlp_convnext_and_maps_back_bit_exactly():
    """timm's convnext_atto ... nano hold the block MLP as 1x1 convs, the official layout as Linear."""
    original = random_state(official_convnext_shapes(**CONVNEXT["convnext_atto"]))
    expected = timm.create_model("convnext_atto", num_classes=0).state_dict()
    renamed, ignored = convnext_official_to_timm(original)
    fitted = fit_pointwise_convs(renamed, expected)
    timm.create_model("convnext_atto", num_classes=0).load_state_dict(
        dict(fitted, **{k: v for k, v in expected.items() if k.startswith("head.")}), strict=True)
    assert fitted["stages.2.blocks.5.mlp.fc1.weight"].shape == (640, 160, 1, 1) and ignored == {}
    back = encoder_to_official(fitted, "convnext")
    assert set(back) == set(original) and all(torch.equal(back[k], v) for k, v in original.items())


@pytest.mark.parametrize("name", ["resnet18", "convnext_tiny"])
def test_init_on_the_cli_accepts_the_encoder_only_and_the_whole_spark_layouts(name, tmp_path):
    files = [tmp_path / f"{name}_1kpretrained.pth", tmp_path / f"{name}_withdecoder_1kpretrained_spark_style.pth"]
    torch.save(official_file(name, with_decoder=False), files[0])
    torch.save(official_file(name, with_decoder=True, width=32), files[1])
    command = [sys.executable, "-m", "sparkme.cli", "-m", "debug=fast", "backend=masked", "data=synthetic",
               f"model={name}", "model.decoder_width=32", "trainer.max_steps=1", "export_formats=[]",
               f"init={files[0]},{files[1]}",
               f"hydra.sweep.dir={tmp_path / 'runs'}"]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    encoder_layout = LAYOUTS["encoder" if name.startswith("resnet") else "convnext_official"]
    assert f"init={files[0]}: {encoder_layout}" in output
    assert f"init={files[1]}: {LAYOUTS['spark']}; loaded" in output
