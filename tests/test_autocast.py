"""``trainer.amp=bf16``: a SparK training step under CPU bf16 autocast runs on every backend (the custom sparse
autograd kernels return float32 gradients for float32 weights) and stays close to the float32 step."""

from __future__ import annotations

import copy

import pytest
import torch

from conftest import ALL_BACKENDS
from sparkme import build_spark, random_mask


@pytest.mark.parametrize("backend", ALL_BACKENDS)
# resnet26: bottlenecks, whose 1x1 convs (pointwise, autocast to bf16) feed 3x3 sparse convs with float32 weights
@pytest.mark.parametrize("model_name", ["resnet18", "resnet26", "convnextv2_atto"])
def test_a_bf16_autocast_step_gives_float32_gradients_close_to_the_float32_step(model_name, backend):
    torch.manual_seed(0)
    model = build_spark(model_name, backend=backend, decoder_width=32)
    images = torch.randn(2, 3, 64, 64)
    mask = random_mask(2, 2, 2, 0.5, generator=torch.Generator().manual_seed(0))
    reference = copy.deepcopy(model)
    reference_loss = reference(images, mask)
    reference_loss.backward()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(images, mask)
    loss.backward()
    for name, param in model.named_parameters():
        assert param.grad is not None and param.grad.dtype == torch.float32, name
    grads = torch.cat([p.grad.flatten() for p in model.parameters()])
    expected = torch.cat([p.grad.flatten() for p in reference.parameters()])
    assert torch.isfinite(grads).all()
    # bf16 keeps 8 mantissa bits and train-mode BN over a batch of 2 amplifies that: the loss agrees to about 1 %,
    # the gradient points the same way (a sign error or a dropped term would not)
    assert abs(loss.item() - reference_loss.item()) <= 0.02 * abs(reference_loss.item())
    assert torch.nn.functional.cosine_similarity(grads, expected, dim=0).item() > 0.9
