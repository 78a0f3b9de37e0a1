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
