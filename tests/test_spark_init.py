"""A fresh sparkme SparK starts where official SparK starts: the same initialisation rule for every layer SparK
initialises (read from keyu-tian/SparK: ``LightDecoder.initialize``, ``SparK.__init__``, its ConvNeXt and timm's
ResNet), and hence a loss of about 1 at step 0."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import sparkme

MASK_TOKEN_STD = 0.02 * math.sqrt(1 - 2 * math.exp(-0.5) / math.sqrt(2 * math.pi) / math.erf(1 / math.sqrt(2)))


def fan_in(weight: torch.Tensor) -> int:
    return weight.shape[1] * weight[0][0].numel()


def fan_out(weight: torch.Tensor) -> int:
    # torch's convention, also for ConvTranspose2d (weight (C_in, C_out, k, k)): dim 0 times the kernel size.
    return weight.shape[0] * weight[0][0].numel()


def spark_rule(name: str, module: nn.Module, param: str, tensor: torch.Tensor) -> tuple[str, float]:
    """SparK's initialisation of one parameter: ``("std", value)`` or ``("const", value)``."""
    if isinstance(module, (nn.BatchNorm2d, nn.LayerNorm)) or type(module).__name__ == "LayerNorm2d":
        return "const", 1.0 if param == "weight" else 0.0
    if name.startswith("decoder."):
        if param == "bias":
            return "const", 0.0
        if isinstance(module, nn.ConvTranspose2d):
            return "std", math.sqrt(2.0 / fan_out(tensor))  # kaiming normal, fan-out, ReLU
        return "std", 0.02  # LightDecoder.initialize: every Conv2d, the 1x1 projection included
    if name.startswith("densify."):
        # SparK never re-initialises its densify projections: PyTorch's default U(-1/sqrt(fan_in), 1/sqrt(fan_in))
        # for weight and bias alike, whose std is 1/sqrt(3 fan_in).
        weight = module.weight
        return "std", 1.0 / math.sqrt(3 * fan_in(weight))
    raise AssertionError(f"no rule for {name}.{param}")


def check_std(name: str, tensor: torch.Tensor, expected: float) -> None:
    # 10 % as the issue asks, widened to 4 standard errors of a sample std for the few tiny layers (the 3 x 24
    # weights of a 768-wide decoder's projection) where 10 % is within sampling noise.
    tolerance = max(0.10, 4 / math.sqrt(2 * tensor.numel()))
    std = tensor.double().std().item()
    assert abs(std / expected - 1) <= tolerance, f"{name}: std {std:.5g}, SparK's rule {expected:.5g}"


@pytest.fixture(scope="module", params=["resnet50", "convnext_small"])
def fresh(request):
    torch.manual_seed(0)
    return request.param, sparkme.build_spark(request.param, backend="masked")


def test_decoder_and_densify_parameters_follow_spark_rule(fresh):
    _, model = fresh
    checked = 0
    for name, module in model.named_modules():
        if not name.startswith(("decoder.", "densify.")) or isinstance(module, (nn.Sequential, nn.ModuleList)):
            continue
        for param, tensor in module.named_parameters(recurse=False):
            if param == "mask_token":
                continue
            kind, value = spark_rule(name, module, param, tensor)
            if kind == "const":
                assert torch.all(tensor == value), f"{name}.{param} should all be {value}"
            else:
                check_std(f"{name}.{param}", tensor, value)
            checked += 1
    assert checked >= 30


def test_mask_tokens_are_truncated_normal_within_two_hundredths(fresh):
    _, model = fresh
    tokens = torch.cat([d.mask_token.detach() for d in model.densify])
    assert tokens.abs().max() <= 0.02
    check_std("mask tokens", tokens, MASK_TOKEN_STD)


def test_encoder_initialisation_matches_spark_backbones(fresh):
    name, model = fresh
    for key, tensor in model.encoder.state_dict().items():
        if name.startswith("convnext"):
            # SparK's ConvNeXt (facebookresearch): trunc-normal 0.02 convs and linears, zero biases, layer scale 1e-6.
            if key.endswith("gamma"):
                assert torch.all(tensor == 1e-6), key
            elif key.endswith("bias"):
                assert torch.all(tensor == 0), key
            elif tensor.dim() in (2, 4):
                check_std(key, tensor, 0.02)
        elif tensor.dim() == 4:  # SparK's ResNets are timm's: kaiming normal, fan-out, ReLU
            check_std(key, tensor, math.sqrt(2.0 / fan_out(tensor)))


@torch.no_grad()
def test_loss_at_initialisation_is_about_one(fresh):
    """A near-zero prediction of a per-patch-normalised target: SparK's own initial loss (train mode, 224^2)."""
    name, model = fresh
    model.train()
    images = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    mask = sparkme.random_mask(2, 7, 7, ratio=0.6, generator=torch.Generator().manual_seed(2))
    loss = model(images, mask).item()
    assert 0.9 <= loss <= 1.1, f"{name}: initial loss {loss:.3f}"
