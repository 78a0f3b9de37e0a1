"""Peak resident memory of one call on CPU, above the process's resident memory before it.

Saved tensors (``sparkme.bench.memory``) count what autograd holds; the peak RSS also counts every temporary of the
forward and backward passes (gathered columns, scratch grids, oneDNN's buffers, MinkowskiEngine's C++ maps): what
decides whether a crop fits a machine. A background thread reads ``/proc/self/statm`` every half millisecond (torch's
kernels release the GIL, so it runs beside them); the caller trims the heap first (``release_memory``) so the start
is not inflated by blocks freed earlier. Linux only: elsewhere the value is None.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

STATM = Path("/proc/self/statm")
INTERVAL_S = 0.0005


def _resident_bytes() -> int:
    """Resident set size now (statm's second field, in pages)."""
    return int(STATM.read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_delta(call: Callable[[], object]) -> int | None:
    """Bytes by which the process's resident memory rose at its highest during ``call()`` (None off Linux)."""
    if not STATM.exists():
        call()
        return None
    start = _resident_bytes()
    peak = [start]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], _resident_bytes())
            time.sleep(INTERVAL_S)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        call()
    finally:
        done.set()
        sampler.join()
    return max(peak[0], _resident_bytes()) - start
