"""SparK's schedules: linear warm-up then cosine learning rate (timm's scheduler) and a cosine weight-decay ramp."""

from __future__ import annotations

import math

import torch
from timm.scheduler import CosineLRScheduler


class SparkSchedule:
    """Per-iteration lr (timm ``CosineLRScheduler``, warm-up from ``warmup_lr``) and weight decay cosine-ramped
    from ``wd_start`` to ``wd_end`` over training. Stateless: everything follows from the step, so resuming needs
    only the step."""

    def __init__(self, optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int,
                 min_lr: float = 0.0, warmup_lr: float = 0.0, wd_start: float = 0.04, wd_end: float = 0.2):
        if total_steps < 1 or warmup_steps < 0:
            raise ValueError(f"total_steps must be >= 1 and warmup_steps >= 0, got {total_steps}, {warmup_steps}")
        self.optimizer = optimizer
        self.total_steps = total_steps
        self.wd_start, self.wd_end = wd_start, wd_end
        self.lr = CosineLRScheduler(optimizer, t_initial=total_steps, lr_min=min_lr, warmup_t=warmup_steps,
                                    warmup_lr_init=warmup_lr, warmup_prefix=True, t_in_epochs=False)

    def weight_decay(self, step: int) -> float:
        progress = min(step / self.total_steps, 1.0)
        return self.wd_end + 0.5 * (self.wd_start - self.wd_end) * (1 + math.cos(math.pi * progress))

    def step(self, step: int) -> tuple[float, float]:
        """Set lr and weight decay for iteration ``step``; returns (lr, wd)."""
        self.lr.step_update(step)
        wd = self.weight_decay(step)
        for group in self.optimizer.param_groups:
            if group.get("weight_decay", 0.0) > 0.0 or group.get("decayed", False):
                group["decayed"] = True  # groups excluded from decay (biases, norms, mask tokens) stay at 0
                group["weight_decay"] = wd
        return self.optimizer.param_groups[0]["lr"], wd
