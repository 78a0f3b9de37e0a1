"""Files on disk, at the bottom of the package: atomic writes and pickle-free reads of torch files.

Every file sparkme writes (checkpoints, exports, the run lock's record, ``metrics.jsonl`` when it is cut back) goes
through ``write_atomic``: a temporary file in the same folder, flushed to disk, renamed over the target. A crash,
even ``kill -9``, mid-write leaves the previous file or the new one, never half of one. Every torch file sparkme
reads goes through ``read_torch_file``, which uses ``torch.load(weights_only=True)``: tensors and plain values only,
never pickled code.
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO

import torch

from sparkme.errors import UsageError


def write_atomic(path: str | Path, write: Callable[[IO], None], binary: bool = True, mode: int = 0o644) -> Path:
    """Create or replace ``path`` with what ``write(file)`` writes; on any error nothing partial is left.

    Args:
        path: the target; its folder is created when missing.
        write: called once with the open temporary file.
        binary: open the temporary file in binary mode (``torch.save``) or text mode (JSON, lines).
        mode: permissions of the result (``mkstemp`` makes files private; other users of a run folder may read).
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise OSError(f"cannot create folder {str(path.parent)!r}: {error.strerror}") from error
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "wb" if binary else "w") as file:
            os.fchmod(file.fileno(), mode)
            write(file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException as error:
        Path(temporary).unlink(missing_ok=True)
        if isinstance(error, OSError):
            raise OSError(f"could not write {str(path)!r}: {error.strerror or error}") from error
        raise
    return path


def save_atomic(state: dict, path: str | Path) -> Path:
    """``torch.save(state)`` to ``path`` through ``write_atomic``."""
    return write_atomic(path, lambda file: torch.save(state, file))


def read_torch_file(path: str | Path, what: str = "weights file", map_location="cpu") -> dict:
    """``torch.load(path, weights_only=True)`` of a file that must hold a dict.

    Args:
        what: how error messages name the file (``sparkme checkpoint``, ``weights file``, ...).

    Raises:
        FileNotFoundError: no such file.
        UsageError (a ValueError): a truncated or foreign file, or one holding pickled objects beyond plain data
            (never with torch's advice to unpickle a file of unknown origin).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {str(path)!r} does not exist")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:
        raise UsageError(f"{str(path)!r} is not a loadable {what}: {describe_load_failure(error)}") from error
    if not isinstance(state, dict):
        raise UsageError(f"{what} {str(path)!r} holds a {type(state).__name__}, not a dict of tensors")
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
