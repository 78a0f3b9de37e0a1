"""Atomic, pickle-free checkpoints.

A checkpoint is written to a temporary file in the same folder, flushed to disk, then renamed over the target:
a crash (even ``kill -9``) mid-write leaves the previous checkpoint intact. Loading always uses
``torch.load(weights_only=True)``, which refuses arbitrary pickled code.
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path

import torch

from sparkme.errors import UsageError

LATEST = "latest.pt"


def save_atomic(state: dict, path: str | Path) -> Path:
    """Write ``state`` to ``path`` atomically; on any error nothing partial is left behind."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise OSError(f"cannot create checkpoint folder {str(path.parent)!r}: {error.strerror}") from error
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as file:
            torch.save(state, file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException as error:
        Path(temporary).unlink(missing_ok=True)
        if isinstance(error, OSError):
            raise OSError(f"could not write checkpoint {str(path)!r}: {error.strerror or error}") from error
        raise
    return path


def load_checkpoint(path: str | Path, map_location="cpu") -> dict:
    """Load a checkpoint written by ``save_atomic`` (tensors and plain Python values only).

    Raises:
        FileNotFoundError: no such file.
        UsageError (a ValueError): the file is truncated, not a checkpoint, or holds pickled objects beyond
            plain data.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:
        reason = describe_load_failure(error)
        raise UsageError(f"{str(path)!r} is not a loadable sparkme checkpoint: {reason}") from error
    if not isinstance(state, dict) or "model" not in state:
        raise UsageError(f"{str(path)!r} is not a sparkme checkpoint: expected a dict with a 'model' entry")
    return state


def describe_load_failure(error: Exception) -> str:
    """Why ``torch.load(weights_only=True)`` failed, in one line, without torch's advice to load the file
    unsafely (a file of unknown origin must never be unpickled)."""
    text = str(error)
    refused = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
    if refused:
        return (f"it holds pickled Python objects ({refused.group(1)}) beyond tensors and plain values, which "
                "sparkme refuses to load (weights_only=True); only load files written by sparkme or re-save the "
                "weights as a plain state dict")
    if "Weights only load failed" in text:  # bytes the safe unpickler does not accept: garbage or pickled code
        return ("the file is corrupt, truncated, not a torch checkpoint, or holds pickled code that "
                "weights_only=True refuses (sparkme never unpickles code)")
    first = text.strip().splitlines()[0] if text.strip() else type(error).__name__
    return f"the file is truncated or not a torch checkpoint ({first})"


def check_compatible(model_state: dict, expected: dict, source: str) -> None:
    """Raise ValueError naming the first mismatching keys/shapes between a checkpoint and the model."""
    missing = [k for k in expected if k not in model_state]
    unexpected = [k for k in model_state if k not in expected]
    shapes = [f"{k}: checkpoint {tuple(model_state[k].shape)} vs model {tuple(v.shape)}"
              for k, v in expected.items() if k in model_state and tuple(model_state[k].shape) != tuple(v.shape)]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing keys {missing[:3]}")
        if unexpected:
            parts.append(f"unexpected keys {unexpected[:3]}")
        if shapes:
            parts.append(f"shape mismatches {shapes[:3]}")
        raise UsageError(f"checkpoint {source!r} does not fit this model (another model or config?): "
                         + "; ".join(parts))
