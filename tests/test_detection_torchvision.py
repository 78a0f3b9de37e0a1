"""The torchvision recipes of docs/detection.md: a sparkme-exported ResNet-50 (``format=torchvision``) loads strictly
into ``maskrcnn_resnet50_fpn``'s and ``deeplabv3_resnet50``'s backbone (the classifier ``fc`` dropped), holds exactly
the pretrained weights before the first step, and both train a few steps on a small generated set of shapes with
boxes and masks (64-96 px images, resized to at most 64 px, CPU)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torchvision
from run_records import trained_like
from torch import nn

from sparkme.export import main
from sparkme.models import build_spark

NUM_CLASSES = 3  # background, rectangle, disc


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> tuple[Path, dict[str, torch.Tensor]]:
    """A ResNet-50 pretraining checkpoint exported with format=torchvision; returns the file and the encoder's
    weights in the checkpoint."""
    root = tmp_path_factory.mktemp("resnet50")
    model = trained_like(build_spark("resnet50", backend="torch", decoder_width=32), seed=5)
    config = {"image_size": 64, "model": {"_target_": "sparkme.models.build_spark", "model_name": "resnet50",
                                          "source": "timm", "drop_path_rate": 0.0, "decoder_width": 32,
                                          "backend": "torch", "mask_ratio": 0.6}}
    torch.save({"model": model.state_dict(), "config": config, "step": 3}, root / "latest.pt")
    out = root / "resnet50_tv.pt"
    assert main([f"ckpt={root / 'latest.pt'}", "format=torchvision", f"out={out}"]) == 0
    encoder = {k[len("encoder."):]: v for k, v in model.state_dict().items() if k.startswith("encoder.")}
    return out, encoder


def shapes_dataset(count: int, seed: int) -> list[tuple[torch.Tensor, dict[str, torch.Tensor]]]:
    """Images (3, H, W) in [0, 1], H and W in 64..96, each with one or two filled rectangles (label 1) or discs
    (label 2) on noise; targets as torchvision's detection models take them: boxes (n, 4) x1 y1 x2 y2, labels (n,),
    masks (n, H, W) uint8."""
    g = torch.Generator().manual_seed(seed)
    data = []
    for _ in range(count):
        h, w = (int(torch.randint(64, 97, (1,), generator=g)) for _ in range(2))
        image = 0.2 * torch.rand(3, h, w, generator=g)
        masks, labels = [], []
        for _ in range(int(torch.randint(1, 3, (1,), generator=g))):
            size = int(torch.randint(16, 32, (1,), generator=g))
            top, left = int(torch.randint(0, h - size, (1,), generator=g)), int(torch.randint(0, w - size, (1,),
                                                                                              generator=g))
            ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
            label = int(torch.randint(1, NUM_CLASSES, (1,), generator=g))
            inside = (ys >= top) & (ys < top + size) & (xs >= left) & (xs < left + size)
            if label == 2:
                centre = (top + size / 2, left + size / 2)
                inside = (ys - centre[0]) ** 2 + (xs - centre[1]) ** 2 <= (size / 2) ** 2
            image[:, inside] = torch.rand(3, 1, generator=g)
            masks.append(inside.to(torch.uint8))
            labels.append(label)
        mask = torch.stack(masks)
        boxes = torch.stack([torchvision.ops.masks_to_boxes(m[None])[0] for m in mask])
        boxes[:, 2:] += 1  # masks_to_boxes gives the last pixel; a box's x2, y2 lie past it
        data.append((image, {"boxes": boxes, "labels": torch.tensor(labels), "masks": mask}))
    return data


def without_fc(path: Path) -> dict[str, torch.Tensor]:
    state = torch.load(path, weights_only=True)
    return {k: v for k, v in state.items() if not k.startswith("fc.")}


def assert_holds(module: nn.Module, expected: dict[str, torch.Tensor]) -> None:
    state = module.state_dict()
    assert set(state) == set(expected)
    assert all(torch.equal(state[k], v) for k, v in expected.items()), [k for k, v in expected.items()
                                                                         if not torch.equal(state[k], v)][:4]


@pytest.mark.slow
def test_mask_rcnn_takes_the_exported_resnet_and_trains(exported):
    path, encoder = exported
    torch.manual_seed(0)
    model = torchvision.models.detection.maskrcnn_resnet50_fpn(
        weights=None, weights_backbone=None, num_classes=NUM_CLASSES, min_size=48, max_size=64,
        rpn_pre_nms_top_n_train=100, rpn_post_nms_top_n_train=50, box_batch_size_per_image=32)
    model.backbone.body.load_state_dict(without_fc(path), strict=True)
    assert_holds(model.backbone.body, {k: v for k, v in encoder.items() if not k.startswith("fc.")})
    data = shapes_dataset(4, seed=1)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.005, momentum=0.9)
    model.train()
    before = model.backbone.body.layer4[0].conv1.weight.detach().clone()
    for step in range(2):
        images, targets = zip(*data[2 * step:2 * step + 2])
        losses = model(list(images), list(targets))
        assert {"loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness", "loss_rpn_box_reg"} == set(losses)
        loss = sum(losses.values())
        assert torch.isfinite(loss)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert not torch.equal(model.backbone.body.layer4[0].conv1.weight, before)  # the encoder is fine-tuned too


@pytest.mark.slow
def test_deeplabv3_takes_the_exported_resnet_and_trains(exported):
    path, encoder = exported
    torch.manual_seed(0)
    model = torchvision.models.segmentation.deeplabv3_resnet50(weights=None, weights_backbone=None,
                                                               num_classes=NUM_CLASSES)
    model.backbone.load_state_dict(without_fc(path), strict=True)
    assert_holds(model.backbone, {k: v for k, v in encoder.items() if not k.startswith("fc.")})
    data = shapes_dataset(4, seed=2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    model.train()
    for step in range(2):
        images, labels = [], []
        for image, target in data[2 * step:2 * step + 2]:
            semantic = (target["masks"] * target["labels"][:, None, None]).amax(0).long()  # (H, W) class per pixel
            images.append(torch.nn.functional.interpolate(image[None], size=(64, 64))[0])
            labels.append(torch.nn.functional.interpolate(semantic[None, None].float(), size=(64, 64))[0, 0].long())
        logits = model(torch.stack(images))["out"]
        assert logits.shape == (2, NUM_CLASSES, 64, 64)
        loss = torch.nn.functional.cross_entropy(logits, torch.stack(labels))
        assert torch.isfinite(loss)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def test_the_exported_file_does_not_fit_a_backbone_without_dropping_fc(exported):
    """The recipe's one step that matters: torchvision's detection backbone has no classifier."""
    path, _ = exported
    model = torchvision.models.segmentation.deeplabv3_resnet50(weights=None, weights_backbone=None, num_classes=2)
    with pytest.raises(RuntimeError, match="Unexpected key"):
        model.backbone.load_state_dict(torch.load(path, weights_only=True), strict=True)
