"""The training checkpoint: its layout, written and read here only.

A checkpoint is one dict of tensors and plain values (``torch.load(weights_only=True)`` reads it back):

========================  ===========================================================================================
``kind``                  ``pretrain`` or ``finetune``: which loop wrote it
``model_name``            the backbone (``resnet50``): a checkpoint of another model is named as such when refused
``model``                 the trained module's state dict (the SparK model, or the classifier being fine-tuned)
``optimizer``, ``scaler`` their state dicts
``step``                  optimizer steps done
``rng``                   every rank's CPU RNG state (a resume continues each rank's random stream)
``config``                the run's resolved config (``sparkme-export`` rebuilds the model from it)
``wandb_id``              the wandb run continued by a resume
``log_window``            losses since the last log line (a resume logs the same means)
``extra``                 what else the loop keeps (fine-tuning: the EMA weights, the best accuracy)
========================  ===========================================================================================

Files are written atomically and read pickle-free by ``sparkme.files``.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from sparkme.errors import UsageError
from sparkme.files import read_torch_file, save_atomic

LATEST = "latest.pt"
__all__ = ["LATEST", "save_atomic", "load_checkpoint", "model_name_of", "check_compatible", "fit_checkpoint"]


def load_checkpoint(path: str | Path, map_location="cpu") -> dict:
    """Read a checkpoint written by a sparkme loop.

    Raises:
        FileNotFoundError: no such file.
        UsageError (a ValueError): the file is truncated, not a checkpoint, or holds pickled objects beyond
            plain data.
    """
    state = read_torch_file(path, "sparkme checkpoint", map_location)
    if "model" not in state:
        raise UsageError(f"{str(path)!r} is not a sparkme checkpoint: expected a dict with a 'model' entry")
    return state


def model_name_of(state: dict) -> str | None:
    """The backbone a checkpoint holds (older checkpoints name it only in their config), or None if unknown."""
    if isinstance(state.get("model_name"), str):
        return state["model_name"]
    model_cfg = (state.get("config") or {}).get("model") if isinstance(state.get("config"), dict) else None
    return model_cfg.get("model_name") if isinstance(model_cfg, dict) else None


def check_compatible(model_state: dict, expected: dict, source: str) -> None:
    """Raise ``UsageError`` naming the first mismatching keys/shapes between a checkpoint and the model."""
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


def fit_checkpoint(state: dict, model: nn.Module, model_name: str, source: str, kind: str | None = None) -> None:
    """Refuse a checkpoint that this run cannot continue: another loop's, another backbone's (named as such), or
    one whose keys or shapes differ from ``model``'s."""
    if kind is not None and state.get("kind", "pretrain") != kind:
        raise UsageError(f"{source!r} is a {state.get('kind', 'pretrain')} checkpoint; this run resumes {kind} "
                         f"checkpoints (to start from its weights use init={source})")
    saved_name = model_name_of(state)
    if saved_name is not None and saved_name != model_name:
        raise UsageError(f"{source!r} is a checkpoint of {saved_name}; this run builds {model_name} (choose "
                         f"model={saved_name} or another checkpoint)")
    check_compatible(state["model"], model.state_dict(), source)


def rng_of_rank(state: dict, rank: int) -> torch.Tensor:
    """The RNG state rank ``rank`` saved (rank 0's when the checkpoint came from fewer ranks)."""
    return state["rng"][rank] if rank < len(state["rng"]) else state["rng"][0]
