"""Wall time and CUDA peak memory of one call, and the medians and spreads reported."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


def synchronize(device: torch.device) -> None:
    """Wait for queued CUDA work (nothing to do on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(step: Callable[[], object], device: torch.device) -> tuple[float, int | None]:
    """Seconds one call of ``step`` takes, and on CUDA its peak memory above what was allocated before it."""
    if device.type != "cuda":
        start = time.perf_counter()
        step()
        return time.perf_counter() - start, None
    torch.cuda.synchronize(device)  # nothing queued from before may be billed to this step
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    start_event = torch.cuda.Event(enable_timing=True)
    end_event = torch.cuda.Event(enable_timing=True)
    start_event.record()
    step()
    end_event.record()
    end_event.synchronize()
    return start_event.elapsed_time(end_event) / 1000.0, torch.cuda.max_memory_allocated(device) - before


def median_ms(seconds: list[float]) -> float:
    return 1000.0 * statistics.median(seconds)


def spread(seconds: list[float]) -> float | None:
    """(max - min) / median of the repeats: how far apart the timed runs were (None for fewer than two)."""
    return (max(seconds) - min(seconds)) / statistics.median(seconds) if len(seconds) > 1 else None
