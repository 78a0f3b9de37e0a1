"""The converter package (``sparkme.convert``): tracing forwards with optional arguments, the one pointwise
predicate, and the interpreter's freeing of values."""

from __future__ import annotations

import pytest
import timm
import torch
from timm.layers.activations_me import HardSwishMe, SwishMe
from timm.models.resnet import BasicBlock, ResNet
from torch import nn

from sparkme import SparseEncoder, random_mask
from sparkme.convert import SparseInterpreter, is_pointwise
from sparkme.errors import UsageError
from sparkme.sparse import sparse_from_images


class HierarchicalResNet(ResNet):
    """SparK's own ``pretrain/models/resnet.py`` gives timm's ResNet this forward for the whole process."""

    def forward(self, x, hierarchical=False):
        if hierarchical:
            x = self.maxpool(self.act1(self.bn1(self.conv1(x))))
            features = []
            for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
                x = layer(x)
                features.append(x)
            return features
        return super().forward(x)


class FeatureFlagNet(nn.Module):
    """A user's backbone whose forward returns its features on request."""

    def __init__(self):
        super().__init__()
        widths = (8, 16, 24, 32)
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 4, stride=4), nn.BatchNorm2d(8), nn.ReLU())
        self.stages = nn.ModuleList(
            nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride=1 if i == 0 else 2, padding=1), nn.BatchNorm2d(c_out),
                          nn.GELU())
            for i, (c_in, c_out) in enumerate(zip((8, *widths[:-1]), widths)))
        self.head = nn.Linear(32, 10)
        self.feature_info = [dict(module=f"stages.{i}", reduction=4 * 2 ** i, num_chs=c) for i, c in enumerate(widths)]

    def forward(self, x, return_features=False, *, scale=1.0):
        features = []
        x = self.stem(x)
        for stage in self.stages:
            x = stage(x)
            features.append(x)
        if return_features:
            return features
        return self.head(x.mean((2, 3))) * scale


def _inputs():
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(2, 3, 64, 64, generator=generator, dtype=torch.float64)
    return images, random_mask(2, 2, 2, 0.5, generator=generator)


def test_forward_with_an_optional_flag_traces_with_the_flag_at_its_default():
    plain = timm.create_model("resnet18").double()
    flagged = HierarchicalResNet(block=BasicBlock, layers=[2, 2, 2, 2]).double()
    flagged.load_state_dict(plain.state_dict())
    images, mask = _inputs()
    expected = SparseEncoder.from_dense(plain, backend="torch").train()(images, mask)
    actual = SparseEncoder.from_dense(flagged, backend="torch").train()(images, mask)
    assert [tuple(a.shape) for a in actual] == [tuple(e.shape) for e in expected]
    assert all(torch.equal(a, e) for a, e in zip(actual, expected))


def test_user_forward_with_return_features_converts_and_runs():
    model = FeatureFlagNet().double().eval()
    images, _ = _inputs()
    encoder = SparseEncoder.from_dense(model, backend="torch").eval()
    with torch.no_grad():
        actual = encoder(images, None)
        expected = model(images, return_features=True)
    assert all(torch.allclose(a, e, rtol=0, atol=1e-12) for a, e in zip(actual, expected))


def test_pointwise_is_one_predicate_for_activations_of_torch_and_timm():
    for module in (nn.ReLU(), nn.GELU(), nn.Identity(), nn.Dropout(0.1), SwishMe(), HardSwishMe(),
                   timm.layers.activations.GELUTanh()):
        assert is_pointwise(module), type(module)
    for module in (nn.PReLU(), timm.layers.activations.PReLU(), nn.Softmax(dim=1), nn.GLU(), nn.Linear(2, 2),
                   nn.Conv2d(2, 2, 1)):
        assert not is_pointwise(module), type(module)


def test_convnext_block_accepts_memory_efficient_activations_and_refuses_prelu():
    images, mask = _inputs()
    model = timm.create_model("convnext_atto").double()
    model.stages[1].blocks[0].mlp.act = SwishMe()
    reference = timm.create_model("convnext_atto").double()
    reference.load_state_dict(model.state_dict())
    reference.stages[1].blocks[0].mlp.act = nn.SiLU()
    with torch.no_grad():
        actual = SparseEncoder.from_dense(model, backend="torch").eval()(images, mask)
        expected = SparseEncoder.from_dense(reference, backend="torch").eval()(images, mask)
    assert all(torch.allclose(a, e, rtol=0, atol=1e-12) for a, e in zip(actual, expected))
    for act in (nn.PReLU(), nn.Softmax(dim=-1)):
        model.stages[1].blocks[0].mlp.act = act
        with pytest.raises(UsageError, match=rf"'stages.1.blocks.0'.*layer {type(act).__name__} has no per-site"):
            SparseEncoder.from_dense(model, backend="torch")


def test_interpreter_frees_every_intermediate_value_after_its_last_use():
    encoder = SparseEncoder.from_dense(timm.create_model("resnet18"), backend="torch").eval()
    images, mask = _inputs()
    interpreter = SparseInterpreter(encoder, encoder.__dict__["_graph"])
    with torch.no_grad():
        outputs = interpreter.run(sparse_from_images(images.float(), mask, "torch"), enable_io_processing=False)
    assert len(outputs) == 4
    assert [node.op for node in interpreter.env] == ["output"]  # only the returned tuple is still held
