"""Pretrained files into a dense classifier: a sparkme checkpoint, every ``sparkme-export`` format and SparK's
ConvNeXt layout load with only the head new; other models' files fail in one line naming the problem."""

from __future__ import annotations

import pytest
import timm
import torch
import torchvision

from sparkme.errors import UsageError
from sparkme.export import export_state_dict, spark_withdecoder_state
from sparkme.models.dense_weights import load_pretrained_dense
from sparkme.models.spark import build_spark
from sparkme.models.spark_layouts import convnext_timm_to_official


@pytest.fixture(scope="module")
def spark18():
    torch.manual_seed(0)
    return build_spark("resnet18", backend="torch", decoder_width=64)


def _assert_encoder_equal(model: torch.nn.Module, spark) -> None:
    state = model.state_dict()
    for key, value in spark.encoder.state_dict().items():
        assert torch.equal(state[key], value), key


def test_sparkme_checkpoint_loads_with_only_fc_new(spark18, tmp_path):
    path = tmp_path / "latest.pt"
    torch.save({"kind": "pretrain", "model_name": "resnet18", "model": spark18.state_dict(), "step": 3}, path)
    model = timm.create_model("resnet18", num_classes=7)
    report = load_pretrained_dense(model, "resnet18", path)
    assert report.layout == "sparkme" and report.new == ["fc.bias", "fc.weight"]
    assert any(key.startswith("decoder.") for key in report.ignored)
    _assert_encoder_equal(model, spark18)
    assert "fc" in str(report)


@pytest.mark.parametrize("fmt", ["timm", "torchvision", "spark", "spark_withdecoder"])
def test_every_export_format_loads_into_timm_and_torchvision(spark18, tmp_path, fmt):
    if fmt == "spark_withdecoder":
        state = spark_withdecoder_state(spark18, "resnet18", 64)
    else:
        state = export_state_dict(spark18.encoder, "resnet18", fmt)
    path = tmp_path / f"{fmt}.pt"
    torch.save(state, path)
    for model in (timm.create_model("resnet18", num_classes=3), torchvision.models.resnet18(num_classes=3)):
        report = load_pretrained_dense(model, "resnet18", path)
        assert report.new == ["fc.bias", "fc.weight"], report
        _assert_encoder_equal(model, spark18)


def test_spark_official_convnext_layout_reports_the_never_pretrained_head_norm(tmp_path):
    source = timm.create_model("convnext_atto", num_classes=0)
    path = tmp_path / "convnext_official_style.pth"
    torch.save(convnext_timm_to_official(source.state_dict()), path)
    model = timm.create_model("convnext_atto", num_classes=5)
    report = load_pretrained_dense(model, "convnext_atto", path)
    assert report.layout == "convnext_official"
    assert {k.rsplit(".", 1)[0] for k in report.new} == {"head.norm", "head.fc"}
    assert torch.equal(model.stages[3].blocks[1].mlp.fc2.weight, source.stages[3].blocks[1].mlp.fc2.weight)


def test_a_file_of_another_model_fails_in_one_line(spark18, tmp_path):
    named = tmp_path / "named.pt"
    torch.save({"kind": "pretrain", "model_name": "resnet18", "model": spark18.state_dict()}, named)
    with pytest.raises(UsageError, match="are of resnet18; this run builds resnet34"):
        load_pretrained_dense(timm.create_model("resnet34"), "resnet34", named)
    unnamed = tmp_path / "unnamed.pt"
    torch.save(export_state_dict(spark18.encoder, "resnet18", "timm"), unnamed)
    with pytest.raises(UsageError, match="missing") as error:
        load_pretrained_dense(timm.create_model("resnet34"), "resnet34", unnamed)
    assert "\n" not in str(error.value)
    wrong_width = {k: v for k, v in timm.create_model("resnet18", num_classes=0).state_dict().items()}
    wrong_width["layer1.0.conv1.weight"] = torch.zeros(32, 64, 3, 3)
    with pytest.raises(UsageError, match="shape mismatch"):
        load_pretrained_dense(timm.create_model("resnet18"), "resnet18", wrong_width)


def test_checks_on_the_meta_device_cost_nothing_and_still_refuse(spark18, tmp_path):
    path = tmp_path / "latest.pt"
    torch.save({"model": spark18.state_dict(), "model_name": "resnet18"}, path)
    with torch.device("meta"):
        model = timm.create_model("resnet18", num_classes=4)
    load_pretrained_dense(model, "resnet18", path)
    assert model.fc.weight.is_meta
