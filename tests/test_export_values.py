"""Export writes the trained values: every exported tensor equals the checkpoint's encoder tensor (a strict load only
proves keys and shapes, which ``export_state_dict`` checks itself)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
import torchvision
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import open_dict

from sparkme.cli import CONFIG_DIR
from sparkme.engine.checkpoint import load_checkpoint
from sparkme.engine.pretrain import pretrain
from sparkme.export import main

REPO = Path(__file__).resolve().parent.parent
HEAD = "fc."  # resnet18's classifier, in timm and torchvision alike


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> tuple[Path, dict, dict]:
    """A 3-step resnet18 run (torch backend, 64x64) exporting both formats: (run dir, summary, checkpoint)."""
    run_dir = tmp_path_factory.mktemp("trained")
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=["debug=fast", "backend=torch", "trainer.device=cpu",
                                                       "export_formats=[timm,torchvision]"])
    with open_dict(cfg):
        cfg.run_dir = str(run_dir)
    summary = pretrain(cfg)
    state = load_checkpoint(run_dir / "checkpoints" / "latest.pt")
    # The weights the run started from (pretrain seeds with seed * 1000 before building the model).
    torch.manual_seed(cfg.seed * 1000)
    initial = instantiate(cfg.model).state_dict()
    return run_dir, summary, {"checkpoint": state, "initial": initial}


def _encoder_tensors(state: dict) -> dict[str, torch.Tensor]:
    return {k[len("encoder."):]: v for k, v in state["model"].items() if k.startswith("encoder.")}


def _assert_equals_checkpoint(exported: dict, checkpoint: dict, with_head: bool) -> None:
    encoder = _encoder_tensors(checkpoint)
    body = {k: v for k, v in exported.items() if not k.startswith(HEAD)}
    assert body.keys() == encoder.keys()
    assert any(k.startswith(HEAD) for k in exported) == with_head
    for key, value in body.items():
        assert value.dtype == encoder[key].dtype and torch.equal(value, encoder[key]), key


def test_the_training_run_changed_weights_and_running_statistics(trained_run):
    """Without this the value checks below could pass on an untrained export."""
    _, summary, states = trained_run
    trained = states["checkpoint"]["model"]
    assert summary["step"] == 3
    changed = [k for k, v in states["initial"].items() if k.startswith("encoder.") and v.is_floating_point()
               and not torch.equal(v, trained[k])]
    assert "encoder.conv1.weight" in changed and "encoder.layer4.1.bn2.running_var" in changed
    running_vars = [v for k, v in trained.items() if k.startswith("encoder.") and k.endswith("running_var")]
    assert running_vars and not any(torch.all(v == 1) for v in running_vars)


def test_exports_written_by_the_run_equal_the_checkpoint_encoder(trained_run):
    _, summary, states = trained_run
    timm_state = torch.load(summary["export_timm"], weights_only=True)
    _assert_equals_checkpoint(timm_state, states["checkpoint"], with_head=False)
    timm.create_model("resnet18", num_classes=0).load_state_dict(timm_state, strict=True)
    torchvision_state = torch.load(summary["export_torchvision"], weights_only=True)
    _assert_equals_checkpoint(torchvision_state, states["checkpoint"], with_head=True)


def test_export_cli_on_a_trained_checkpoint_writes_its_values(trained_run, tmp_path):
    run_dir, _, states = trained_run
    ckpt = run_dir / "checkpoints" / "latest.pt"
    out = tmp_path / "resnet18_tv.pt"
    result = subprocess.run([sys.executable, "-m", "sparkme.export", f"ckpt={ckpt}", "format=torchvision",
                             f"out={out}"], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    exported = torch.load(out, weights_only=True)
    torchvision.models.resnet18().load_state_dict(exported, strict=True)
    _assert_equals_checkpoint(exported, states["checkpoint"], with_head=True)

    timm_out = tmp_path / "resnet18_timm.pt"
    assert main([f"ckpt={ckpt}", "format=timm", f"out={timm_out}"]) == 0
    _assert_equals_checkpoint(torch.load(timm_out, weights_only=True), states["checkpoint"], with_head=False)
