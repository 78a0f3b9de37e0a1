"""The segmentation_models_pytorch recipes of docs/detection.md: a U-Net whose encoder is the SparK-pretrained one,
loaded strictly, holding exactly the exported weights before the first step, trained a few steps on generated shapes.
ResNets go through smp's own ResNet encoder (``format=torchvision`` as it is); any timm model through smp's ``tu-``
encoder (``format=smp``): ConvNeXt here, and a ResNet the same way."""

from __future__ import annotations

from pathlib import Path

import pytest
import segmentation_models_pytorch as smp
import torch
from torch import nn

from sparkme.export import main
from sparkme.models import build_spark

NUM_CLASSES = 3


def pretraining_checkpoint(root: Path, name: str, seed: int) -> tuple[Path, dict[str, torch.Tensor]]:
    """A sparkme checkpoint of ``name`` with weights away from their initialisation; and its dense encoder state."""
    model = build_spark(name, backend="torch", decoder_width=32)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for value in model.state_dict().values():
            if value.is_floating_point():
                value.add_(0.01 * torch.randn(value.shape, generator=g))
    config = {"image_size": 64, "model": {"_target_": "sparkme.models.build_spark", "model_name": name,
                                          "source": "timm", "drop_path_rate": 0.0, "decoder_width": 32,
                                          "backend": "torch", "mask_ratio": 0.6}}
    path = root / f"{name}.pt"
    torch.save({"model": model.state_dict(), "config": config, "step": 3}, path)
    return path, model.encoder.to_dense().state_dict()


def export(ckpt: Path, fmt: str, out: Path) -> dict[str, torch.Tensor]:
    assert main([f"ckpt={ckpt}", f"format={fmt}", f"out={out}"]) == 0
    return torch.load(out, weights_only=True)


def shapes_batch(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Two 64x64 images of noise with a filled square (class 1) and a disc (class 2); labels (2, 64, 64)."""
    g = torch.Generator().manual_seed(seed)
    images, labels = 0.2 * torch.rand(2, 3, 64, 64, generator=g), torch.zeros(2, 64, 64, dtype=torch.long)
    ys, xs = torch.meshgrid(torch.arange(64), torch.arange(64), indexing="ij")
    for i in range(2):
        top, left = (int(v) for v in torch.randint(0, 32, (2,), generator=g))
        square = (ys >= top) & (ys < top + 24) & (xs >= left) & (xs < left + 24)
        disc = (ys - 48) ** 2 + (xs - 16 - 24 * i) ** 2 <= 100
        for region, label in ((square, 1), (disc, 2)):
            images[i][:, region] = torch.rand(3, 1, generator=g)
            labels[i][region] = label
    return images, labels


def train_two_steps(model: nn.Module) -> None:
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model.train()
    for step in range(2):
        images, labels = shapes_batch(step)
        logits = model(images)
        assert logits.shape == (2, NUM_CLASSES, 64, 64)
        loss = nn.functional.cross_entropy(logits, labels)
        assert torch.isfinite(loss)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def smp_name(key: str, state: dict[str, torch.Tensor]) -> str | None:
    """smp's name of a dense timm key: under ``model.``, as it is or with its first two parts joined by '_' (timm's
    features network flattens a top-level Sequential); None when smp's encoder has no such tensor."""
    return next((c for c in (f"model.{key}", "model." + key.replace(".", "_", 1)) if c in state), None)


def assert_encoder_holds(encoder: nn.Module, expected: dict[str, torch.Tensor]) -> None:
    state = encoder.state_dict()
    assert set(state) == set(expected) and all(torch.equal(state[k], v) for k, v in expected.items())


@pytest.mark.slow
def test_unet_with_smps_resnet_encoder_takes_the_torchvision_export(tmp_path):
    ckpt, dense = pretraining_checkpoint(tmp_path, "resnet18", seed=6)
    state = export(ckpt, "torchvision", tmp_path / "resnet18_tv.pt")
    torch.manual_seed(0)
    model = smp.Unet(encoder_name="resnet18", encoder_weights=None, classes=NUM_CLASSES)
    model.encoder.load_state_dict(state, strict=True)  # smp's ResNet encoder drops fc.* itself
    assert_encoder_holds(model.encoder, {k: v for k, v in dense.items() if not k.startswith("fc.")})
    train_two_steps(model)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["convnext_atto", "resnet18"])
def test_unet_with_a_timm_encoder_takes_the_smp_export(name, tmp_path):
    ckpt, dense = pretraining_checkpoint(tmp_path, name, seed=7)
    state = export(ckpt, "smp", tmp_path / f"{name}_smp.pt")
    torch.manual_seed(0)
    model = smp.Unet(encoder_name=f"tu-{name}", encoder_weights=None, classes=NUM_CLASSES)
    model.encoder.load_state_dict(state, strict=True)
    # Every encoder tensor is the pretrained one under smp's name; only the classifier head is left out.
    names = {k: smp_name(k, state) for k in dense}
    assert all(torch.equal(state[new], dense[k]) for k, new in names.items() if new is not None)
    assert all(k.startswith(("head.", "fc.")) for k, new in names.items() if new is None)
    assert_encoder_holds(model.encoder, state)
    train_two_steps(model)


def test_smp_export_names_convnexts_as_timms_features_network(tmp_path):
    """The names smp's tu- encoder gives a ConvNeXt, written out: the stem's and stages' Sequential children are
    joined with '_' by timm's features network."""
    ckpt, dense = pretraining_checkpoint(tmp_path, "convnext_atto", seed=8)
    state = export(ckpt, "smp", tmp_path / "atto_smp.pt")
    assert torch.equal(state["model.stem_0.weight"], dense["stem.0.weight"])
    assert torch.equal(state["model.stages_2.blocks.3.conv_dw.weight"], dense["stages.2.blocks.3.conv_dw.weight"])
    assert torch.equal(state["model.stages_1.downsample.1.bias"], dense["stages.1.downsample.1.bias"])
    assert not any(k.startswith("model.head") for k in state)
