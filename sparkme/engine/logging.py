"""Metrics sinks: a JSONL file always, wandb when configured (offline by default: no account, no network).

A run that starts at step k (0 for a fresh start) first removes what it will write again: the lines of
``metrics.jsonl`` after step k (all of them when k = 0) and, in wandb, the history after k (``resume_from``, wandb's
"rewind"). The log of a resumed run therefore reads like the log of a run that was never interrupted.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch

from sparkme.files import write_atomic

log = logging.getLogger(__name__)
METRICS_NAME = "metrics.jsonl"
WANDB_MODES = ("offline", "online", "disabled")  # logger.wandb_mode


def _kept(line: str, start_step: int) -> bool:
    """Whether a line written before a restart at ``start_step`` stays: complete lines up to that step, except on
    a fresh start, which writes every line (step 0's held-out loss included) again."""
    try:
        step = json.loads(line)["step"]
    except (ValueError, TypeError, KeyError):
        return False  # half a line: the process died while writing it, after its last checkpoint
    return start_step > 0 and step <= start_step


def truncate_metrics(path: Path, start_step: int) -> int:
    """Keep only the lines of ``path`` that a run restarting at ``start_step`` will not write again; returns how
    many lines were removed. Atomic (temporary file + rename): a crash leaves the old file or the new one."""
    if not path.exists():
        return 0
    lines = path.read_text().splitlines(keepends=True)
    kept = [line if line.endswith("\n") else line + "\n" for line in lines if _kept(line, start_step)]
    if len(kept) == len(lines):
        return 0
    write_atomic(path, lambda file: file.writelines(kept), binary=False)
    return len(lines) - len(kept)


class MetricsLogger:
    """Writes one JSON object per ``log`` call to ``run_dir/metrics.jsonl`` and mirrors it to wandb.

    Args:
        run_dir: the run folder.
        wandb_mode: ``offline`` (default), ``online`` or ``disabled``; None disables wandb.
        project, run_name: the wandb project and run name.
        config: plain dict stored with the wandb run.
        resume_id: the wandb run to continue from ``start_step`` (its id is in the checkpoint); None: a new run.
        start_step: the step this run starts at: lines after it are removed first (see the module docstring).
    """

    def __init__(self, run_dir: Path, wandb_mode: str | None = None, project: str = "sparkme",
                 run_name: str | None = None, config: dict | None = None, resume_id: str | None = None,
                 start_step: int = 0):
        self.path = Path(run_dir) / METRICS_NAME
        self.path.parent.mkdir(parents=True, exist_ok=True)
        removed = truncate_metrics(self.path, start_step)
        if removed:
            log.info("%s: removed %d line(s) after step %d, which this run writes again", self.path, removed,
                     start_step)
        self.wandb = None
        if wandb_mode is not None and wandb_mode not in WANDB_MODES:
            raise ValueError(f"logger.wandb.mode must be offline, online or disabled, got {wandb_mode!r}")
        if wandb_mode in ("offline", "online"):
            import wandb

            # resume_from rewinds the run to the checkpoint's step, so the steps after it are not logged twice
            # (plain resume="allow" would make the server reject every step up to the one it last saw).
            rewind = f"{resume_id}?_step={start_step}" if resume_id and start_step > 0 else None
            self.wandb = wandb.init(project=project, name=run_name, dir=str(run_dir), mode=wandb_mode,
                                    config=config, resume_from=rewind)

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

    def sync(self) -> None:
        """Force the metrics file to disk (before a checkpoint: the lines up to its step must survive a crash)."""
        if self.path.exists():
            with self.path.open("a") as file:
                os.fsync(file.fileno())

    def close(self) -> None:
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None
