"""Metrics sinks: a JSONL file always, wandb when configured (offline by default: no account, no network)."""

from __future__ import annotations

import json
from pathlib import Path

import torch


class MetricsLogger:
    """Writes one JSON object per ``log`` call to ``run_dir/metrics.jsonl`` and mirrors it to wandb.

    Args:
        run_dir: the run folder.
        wandb_mode: ``offline`` (default), ``online`` or ``disabled``; None disables wandb.
        config: plain dict stored with the wandb run.
    """

    def __init__(self, run_dir: Path, wandb_mode: str | None = None, project: str = "sparkme",
                 run_name: str | None = None, config: dict | None = None, resume_id: str | None = None):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.wandb = None
        if wandb_mode not in (None, "disabled", "offline", "online"):
            raise ValueError(f"logger.wandb.mode must be offline, online or disabled, got {wandb_mode!r}")
        if wandb_mode in ("offline", "online"):
            import wandb

            self.wandb = wandb.init(project=project, name=run_name, dir=str(run_dir), mode=wandb_mode,
                                    config=config, id=resume_id, resume="allow" if resume_id else None)

    @property
    def run_id(self) -> str | None:
        return None if self.wandb is None else self.wandb.id

    def log(self, metrics: dict, step: int) -> None:
        record = {"step": step, **{k: (v.item() if isinstance(v, torch.Tensor) else v) for k, v in metrics.items()}}
        with self.path.open("a") as file:
            file.write(json.dumps(record) + "\n")
        if self.wandb is not None:
            self.wandb.log(record, step=step)

    def log_image(self, key: str, path: Path, step: int, caption: str = "") -> None:
        if self.wandb is not None:
            import wandb

            self.wandb.log({key: wandb.Image(str(path), caption=caption)}, step=step)

    def close(self) -> None:
        if self.wandb is not None:
            self.wandb.finish()
