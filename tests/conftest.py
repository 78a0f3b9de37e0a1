"""Shared test helpers. MinkowskiEngine is a core dependency: its tests are never skipped."""

from __future__ import annotations

import os

import pytest
import torch

from sparkme.sparse import BACKEND_NAMES, available_backends

# tools/gpu_check.sh sets SPARKME_TEST_DEVICE=cuda to run the equivalence tests on a GPU.
DEVICE = torch.device(os.environ.get("SPARKME_TEST_DEVICE", "cpu"))


def pytest_report_header(config):
    return [f"sparse backends: {available_backends()}", f"test device: {DEVICE}"]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max |expected| (0 when both are all zero)."""
    scale = expected.abs().max().item()
    diff = (actual - expected).abs().max().item()
    return diff / scale if scale > 0 else diff


SPARSE_BACKENDS = [name for name in BACKEND_NAMES if name != "masked"]
ALL_BACKENDS = list(BACKEND_NAMES)


def randomise_affine(model: torch.nn.Module) -> torch.nn.Module:
    """Non-trivial norm affines, running stats, layer scales and GRN weights, so every parameter matters."""
    generator = torch.Generator().manual_seed(1)
    for module in model.modules():
        for name in ("weight", "bias", "running_mean", "gamma"):
            tensor = getattr(module, name, None)
            if isinstance(tensor, torch.Tensor) and tensor.dim() == 1:
                with torch.no_grad():
                    tensor.copy_(torch.randn(tensor.shape, generator=generator) * 0.2 + (name == "weight"))
        if getattr(module, "running_var", None) is not None:
            module.running_var.uniform_(0.5, 1.5, generator=generator)
    return model
