"""``sparkme-export``: SparK's layouts out (``format=spark`` round-trips through ``init=``/``load_weights``), and
every bad input ends as one ``sparkme-export: error: <what, the value, what is accepted>`` line with status 2."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from spark_fixtures import official_convnext_shapes, timm_resnet_shapes

from sparkme.export import export_state_dict, main
from sparkme.models import LightDecoder, SparK, SparseEncoder, build_spark
from sparkme.models.backbones import create_backbone

BIN = Path(sys.executable).parent
CONFIG = {"image_size": 64, "model": {"_target_": "sparkme.models.build_spark", "model_name": "resnet18",
                                      "source": "timm", "drop_path_rate": 0.0, "decoder_width": 32,
                                      "backend": "torch", "mask_ratio": 0.6}}


def trained_like(model: SparK) -> SparK:
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    return model


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> tuple[Path, SparK]:
    torch.manual_seed(0)
    model = trained_like(build_spark("resnet18", backend="torch", decoder_width=32))
    path = tmp_path_factory.mktemp("ckpt") / "latest.pt"
    torch.save({"model": model.state_dict(), "config": CONFIG, "step": 3}, path)
    return path, model


def test_spark_format_is_spark_downstream_layout_and_loads_back_bit_exactly():
    torch.manual_seed(0)
    resnet = trained_like(build_spark("resnet18", backend="masked", decoder_width=32))
    state = export_state_dict(resnet.encoder, "resnet18", "spark")
    assert {k: tuple(v.shape) for k, v in state.items()} == timm_resnet_shapes("resnet18")
    copy = build_spark("resnet18", backend="masked", decoder_width=32)
    copy.load_weights(state)
    assert all(torch.equal(v, resnet.state_dict()[k]) for k, v in copy.state_dict().items() if k.startswith("encoder."))

    dense = timm.create_model("convnext_atto", conv_mlp=False)  # SparK's ConvNeXt MLP is Linear
    cnx = SparK(SparseEncoder.from_dense(dense, "masked"), LightDecoder(32))
    official = export_state_dict(cnx.encoder, "convnext_atto", "spark")
    expected = official_convnext_shapes(depths=(2, 2, 6, 2), dims=(40, 80, 160, 320))
    assert {k: tuple(v.shape) for k, v in official.items()} == expected
    fc1 = cnx.encoder.state_dict()["stages.2.blocks.5.mlp.fc1.weight"]
    assert torch.equal(official["stages.2.5.pwconv1.weight"], fc1)


def test_export_cli_spark_formats_round_trip(checkpoint, tmp_path):
    path, model = checkpoint
    out = tmp_path / "resnet18_1kpretrained_timm_style.pth"
    assert main([f"ckpt={path}", "format=spark", f"out={out}"]) == 0
    state = torch.load(out, weights_only=True)
    encoder = {k[len("encoder."):]: v for k, v in model.state_dict().items() if k.startswith("encoder.")}
    assert set(state) == set(encoder) and all(torch.equal(state[k], encoder[k]) for k in state)

    whole = tmp_path / "res18_withdecoder_1kpretrained_spark_style.pth"
    assert main([f"ckpt={path}", "format=spark_withdecoder", f"out={whole}"]) == 0
    loaded = torch.load(whole, weights_only=True)
    assert loaded["arch"] == "resnet18" and loaded["module"]["norm_black"].shape == (1, 3, 64, 64)
    copy = build_spark("resnet18", backend="torch", decoder_width=32)
    report = copy.load_weights(whole)
    assert report.layout == "spark" and report.kept == []
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in copy.state_dict().items())


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory, checkpoint) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bad")
    files = {"dir": root, "ckpt": checkpoint[0], "garbage": root / "garbage.pt", "truncated": root / "cut.pt",
             "plain": root / "plain.pt", "no_config": root / "no_config.pt"}
    files["garbage"].write_bytes(os.urandom(2048))
    files["truncated"].write_bytes(checkpoint[0].read_bytes()[:5000])
    torch.save({"weight": torch.zeros(3)}, files["plain"])
    torch.save({"model": {"stem.0.weight": torch.zeros(3)}}, files["no_config"])  # e.g. a facebookresearch file
    return files


# (arguments with {placeholders}, text the one error line must contain)
CASES = {
    "missing_file": (["ckpt={dir}/absent.pt", "out={dir}/x.pt"], "ckpt='{dir}/absent.pt' is not a file"),
    "corrupt": (["ckpt={garbage}", "out={dir}/x.pt"], "garbage.pt' is not a loadable sparkme checkpoint"),
    "truncated": (["ckpt={truncated}", "out={dir}/x.pt"], "cut.pt' is not a loadable sparkme checkpoint"),
    "plain_state_dict": (["ckpt={plain}", "out={dir}/x.pt"], "plain.pt' is not a sparkme checkpoint"),
    "no_config": (["ckpt={no_config}", "out={dir}/x.pt"], "is not a sparkme pretraining checkpoint"),
    "unknown_format": (["ckpt={ckpt}", "format=onnx", "out={dir}/x.pt"],
                       "unknown format 'onnx'; choose one of torchvision, timm, spark, spark_withdecoder"),
    "unknown_argument": (["ckpt={ckpt}", "fromat=spark", "out={dir}/x.pt"], "unknown argument 'fromat'"),
    "missing_out": (["ckpt={ckpt}"], "missing out=..."),
    "malformed": (["ckpt"], "argument 'ckpt' is not key=value"),
    "unwritable_out": (["ckpt={ckpt}", "out={plain}/x.pt"], "cannot write out='{plain}/x.pt'"),  # under a file
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_is_one_error_line_with_exit_status_2(case, bad_files, capsys):
    names = {k: str(v) for k, v in bad_files.items()}
    args, expected = CASES[case]
    with pytest.raises(SystemExit) as exit_info:
        main([a.format(**names) for a in args])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "weights_only=False" not in err
    assert err.startswith("sparkme-export: error: ") and err.count("\n") == 1, err
    assert expected.format(**names) in err, err


def test_the_installed_command_reports_without_traceback(bad_files, tmp_path):
    result = subprocess.run([str(BIN / "sparkme-export"), f"ckpt={bad_files['garbage']}", f"out={tmp_path}/x.pt"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=300)
    output = result.stdout + result.stderr
    assert result.returncode == 2 and "Traceback" not in output, output
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("sparkme-export: error: ")]
    assert len(error_lines) == 1 and "is not a loadable sparkme checkpoint" in error_lines[0], output
    assert not (tmp_path / "x.pt").exists()


@pytest.mark.parametrize("name", ["efficientnet_b0", "densenet121", "regnety_016"])
def test_timm_export_drops_the_classifier_timm_names_for_the_family(name):
    """EfficientNet/DenseNet call it ``classifier``, RegNet ``head.fc``: the export loads strictly into the
    model without classifier either way, and keeps every other tensor (``conv_head`` included)."""
    encoder = SparseEncoder.from_dense(create_backbone(name), backend="masked")
    state = export_state_dict(encoder, name, "timm")
    dense_keys = set(encoder.to_dense().state_dict())
    classifier = {k for k in dense_keys if k not in state}
    assert classifier and all(k.startswith(("classifier.", "head.fc.")) for k in classifier), classifier
