"""Start-up checks of a pretraining config: every user error is found here, before a model is built or data read."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from sparkme.errors import UsageError


def check_config(cfg: DictConfig) -> None:
    """Raise ``UsageError`` naming the first bad value of ``cfg`` and what is accepted."""
    if int(cfg.trainer.batch_size) < 1:
        raise UsageError(f"trainer.batch_size must be >= 1, got {cfg.trainer.batch_size}")
    if int(cfg.trainer.accum_steps) < 1:
        raise UsageError(f"trainer.accum_steps must be >= 1, got {cfg.trainer.accum_steps}")
    if cfg.trainer.amp not in (None, "bf16", "fp16"):
        raise UsageError(f"trainer.amp must be null, bf16 or fp16, got {cfg.trainer.amp!r}")
    if cfg.resume not in (None, "auto") and not Path(cfg.resume).is_file():
        raise UsageError(f"resume={cfg.resume!r}: use resume=auto or the path of an existing checkpoint")
