"""Test helpers shared by the end-to-end runs: a run's metrics.jsonl, waiting for a step, weights moved off init."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import torch
from torch import nn


def metrics_records(run_dir: Path) -> list[dict]:
    """metrics.jsonl without the one wall-clock field (``img_per_s``), which no two runs share; a line still being
    written is left out, and a run that has not logged yet gives []."""
    try:
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    except FileNotFoundError:
        return []
    return [{k: v for k, v in json.loads(line).items() if k != "img_per_s"} for line in lines if line.endswith("}")]


def wait_for_step(run_dir: Path, step: int, process: subprocess.Popen, timeout: float = 600) -> None:
    """Return as soon as metrics.jsonl has the training line of ``step`` (polled often: the run keeps training)."""
    deadline = time.time() + timeout
    while not any(r.get("step") == step and "loss" in r for r in metrics_records(run_dir)):
        assert process.poll() is None, f"the run ended before step {step}: {process.communicate()[1][-3000:]}"
        assert time.time() < deadline, f"step {step} did not appear"
        time.sleep(0.02)


def trained_like(model: nn.Module, seed: int) -> nn.Module:
    """Weights and BatchNorm statistics moved away from their initialisation (seeded), as after pretraining."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for value in model.state_dict().values():
            if value.is_floating_point():
                value.add_(0.01 * torch.randn(value.shape, generator=g))
    return model
