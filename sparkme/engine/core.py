"""What every sparkme training loop shares: the run directory held, one optimizer step, the checkpoint, the step loop.

Pretraining (``sparkme.engine.pretrain``) and fine-tuning (``sparkme.finetune.loop``) each build their own model,
data and metrics, and hand them to the same parts:

- ``hold_run_dir``: rank 0 locks the run directory for the whole job; a refusal reaches every rank.
- ``Trainer``: the module being trained, its DDP wrapper, optimizer and AMP scaler; ``Trainer.step`` runs one
  optimizer step over micro-batches (accumulation, autocast, a non-finite loss skipped by *every* rank or by none,
  gradient clipping) and ``state_dict`` / ``load_state_dict`` are its part of the checkpoint.
- ``Tally``: the running losses and speed of a loop (its log window travels in the checkpoint).
- ``save_checkpoint`` / ``restore_checkpoint``: the checkpoint's layout (``sparkme.engine.checkpoint``) written and
  read in one place, every rank's RNG state included.
- ``LoopRun`` and the loop's parts over it: ``run_job`` (processes and lock around a loop), ``restore_or_warn``,
  ``open_logger``, ``next_batches``, ``train`` (the step loop with its periodic actions and stop requests:
  SIGTERM/SIGINT, ``stop_at_step``), ``tally_step`` / ``log_when_due`` / ``checkpoint_run`` (periodic actions).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import signal
import tempfile
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from sparkme.engine.checkpoint import LATEST, fit_checkpoint, load_checkpoint, rng_of_rank, save_atomic
from sparkme.engine.distributed import (
    DistInfo,
    align_grad_strides,
    broadcast_from_main,
    cleanup_distributed,
    setup_distributed,
)
from sparkme.engine.logging import MetricsLogger
from sparkme.engine.lost_rank import raise_if_rank_lost
from sparkme.engine.run_lock import RunLock
from sparkme.errors import UsageError

log = logging.getLogger(__name__)
AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class StopRequest:
    """Set by SIGTERM/SIGINT (how SLURM pre-empts a job); the loop checkpoints and exits at the next step."""

    def __init__(self):
        self.signal_name: str | None = None

    def __call__(self, signum, frame):
        self.signal_name = signal.Signals(signum).name


# --- the run directory ---------------------------------------------------------------------------------------------
def check_writable(run_dir: Path) -> None:
    """Fail at start-up, not at the first checkpoint hours later, when the run folder cannot be written."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        handle, probe = tempfile.mkstemp(prefix=".write_probe.", dir=run_dir)  # a name of its own: jobs may race
        os.close(handle)
        os.unlink(probe)
    except OSError as error:
        raise OSError(f"run_dir {str(run_dir)!r} is not writable ({error.strerror}); choose another with "
                      "run_dir=... or hydra.run.dir=...") from error


def hold_run_dir(run_dir: Path, dist_info: DistInfo) -> RunLock | None:
    """Rank 0 locks the run directory for the whole job (one job per directory); a refusal reaches every rank, so
    all of them exit with the same one-line error instead of waiting for rank 0 at the first collective."""
    lock, refusal = None, None
    if dist_info.is_main:
        check_writable(run_dir)
        try:
            lock = RunLock(run_dir).acquire()
        except UsageError as error:
            refusal = str(error)
    refusal = broadcast_from_main(refusal, dist_info)
    if refusal is not None:
        raise UsageError(refusal)
    return lock


def latest_checkpoint(run_dir: Path) -> Path:
    return run_dir / "checkpoints" / LATEST


def resume_path(resume: str | None, run_dir: Path) -> Path | None:
    """The checkpoint ``resume=`` names: ``auto`` is the run's own latest one when it exists (a fresh start
    otherwise), a path is itself, None is none."""
    if resume == "auto":
        latest = latest_checkpoint(run_dir)
        return latest if latest.exists() else None
    return None if resume is None else Path(resume)


# --- one optimizer step --------------------------------------------------------------------------------------------
LossOf = Callable[[nn.Module, int, object], torch.Tensor]


@dataclass
class Trainer:
    """The module being trained and what steps it: optimizer, AMP scaler, DDP wrapper.

    Attributes:
        module: the trained model itself (its ``state_dict`` is the checkpoint's ``model``).
        ddp_model: ``module`` wrapped by DDP after ``wrap_ddp`` with several processes; ``module`` otherwise.
    """

    module: nn.Module
    optimizer: torch.optim.Optimizer
    dist: DistInfo
    amp: str | None = None               # None | bf16 | fp16
    accum: int = 1
    clip_grad: float | None = None
    skip_nonfinite: bool = False
    ddp_model: nn.Module | None = None
    scaler: torch.amp.GradScaler = field(init=False)

    def __post_init__(self):
        self.scaler = torch.amp.GradScaler(self.dist.device.type, enabled=self.amp == "fp16")
        self.ddp_model = self.ddp_model or self.module

    @property
    def amp_dtype(self) -> torch.dtype | None:
        return AMP_DTYPES.get(self.amp)

    def wrap_ddp(self) -> None:
        """Wrap ``module`` in DDP when several processes train it (no-op in one process)."""
        if self.dist.world_size > 1:
            device = self.dist.device
            align_grad_strides(self.module)  # else DDP warns "Grad strides do not match bucket view strides"
            self.ddp_model = DistributedDataParallel(self.module,
                                                     device_ids=[device.index] if device.type == "cuda" else None)

    def step(self, step: int, batches: Iterable, loss_of: LossOf, where: str = "") -> dict | None:
        """One optimizer step on ``accum`` micro-batches.

        Args:
            step: the step's index (from 0), for messages.
            batches: the ``accum`` micro-batches, read one at a time.
            loss_of: ``loss_of(ddp_model, micro_index, batch)`` -> the scalar loss of one micro-batch (called under
                autocast and, but for the last micro-batch, DDP's ``no_sync``).
            where: the latest checkpoint's path, named when a non-finite loss stops the run.

        Returns:
            ``{"loss", "grad_norm"}``, or None when a loss was not finite on some rank and ``skip_nonfinite`` skipped
            the step on every rank (weights, optimizer state and BatchNorm buffers untouched).

        Raises:
            FloatingPointError: a non-finite loss (on any rank) without ``skip_nonfinite``.
        """
        # The forward pass updates BatchNorm running statistics even when the loss turns out NaN: a skipped step
        # puts the buffers back, or one bad batch would poison every later evaluation and the export.
        saved_buffers = [b.detach().clone() for b in self.module.buffers()] if self.skip_nonfinite else None
        step_loss = 0.0
        device_type = self.dist.device.type
        for micro, batch in enumerate(batches):
            last = micro == self.accum - 1
            sync = contextlib.nullcontext() if last or self.dist.world_size == 1 else self.ddp_model.no_sync()
            with sync, torch.autocast(device_type, dtype=self.amp_dtype or torch.float32,
                                      enabled=self.amp_dtype is not None):
                loss = loss_of(self.ddp_model, micro, batch)
                self.scaler.scale(loss / self.accum).backward()
            step_loss += loss.item() / self.accum
        if not self._finite_on_every_rank(step_loss):
            if self.skip_nonfinite:
                here = "" if not math.isfinite(step_loss) else " on another rank"
                log.warning("non-finite loss %s%s at step %d: step skipped on every rank", step_loss, here, step)
                self.optimizer.zero_grad(set_to_none=True)
                with torch.no_grad():
                    for buffer, saved in zip(self.module.buffers(), saved_buffers, strict=True):
                        buffer.copy_(saved)
                return None
            raise FloatingPointError(
                f"non-finite loss {step_loss} at step {step}; the last good checkpoint is {where or 'the latest'} "
                "(set trainer.skip_nonfinite=true to skip such steps, or lower the learning rate)")
        self.scaler.unscale_(self.optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.ddp_model.parameters(), self.clip_grad or float("inf"))
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        return {"loss": step_loss, "grad_norm": float(grad_norm)}

    def _finite_on_every_rank(self, loss: float) -> bool:
        """Whether the loss was finite on every rank. DDP's all-reduce has already mixed a NaN gradient of one rank
        into every rank's, so the ranks must agree: each skipping alone would leave the replicas apart."""
        finite = math.isfinite(loss)
        if self.dist.world_size == 1:
            return finite
        flag = torch.tensor([1.0 if finite else 0.0], device=self.dist.device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
        return bool(flag.item() == 1.0)

    def state_dict(self) -> dict:
        return {"model": self.module.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scaler": self.scaler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])


# --- the running tally ---------------------------------------------------------------------------------------------
@dataclass
class Tally:
    """Losses and throughput of a loop: the first and last ten (for the summary), the window since the last log
    line (saved in checkpoints, so a resumed run logs the same means) and images seen since ``started``."""

    images_per_step: int
    window: list[float] = field(default_factory=list)
    first_losses: list[float] = field(default_factory=list)
    last_losses: deque = field(default_factory=lambda: deque(maxlen=10))
    seen: int = 0
    started: float = field(default_factory=time.time)

    def add(self, loss: float) -> float:
        """Count one step's loss; returns images per second since ``started``."""
        if len(self.first_losses) < 10:
            self.first_losses.append(loss)
        self.last_losses.append(loss)
        self.window.append(loss)
        self.seen += self.images_per_step
        return self.seen / max(time.time() - self.started, 1e-9)

    def window_mean(self) -> float:
        """The mean loss since the last log line; the window starts again."""
        mean = sum(self.window) / len(self.window)
        self.window = []
        return mean


# --- the checkpoint ------------------------------------------------------------------------------------------------
def save_checkpoint(path: Path, trainer: Trainer, step: int, cfg: DictConfig, kind: str, model_name: str,
                    wandb_id: str | None = None, log_window: Sequence[float] = (), extra: dict | None = None,
                    keep_as: Path | None = None, before_write: Callable[[], None] | None = None) -> Path | None:
    """Save all a resume needs at ``step``. A collective: every rank calls it and contributes its RNG state;
    rank 0 calls ``before_write`` (checks, log flushes), then writes ``path`` (and a copy at ``keep_as``).
    Returns the path on rank 0, None elsewhere."""
    rng_states = [torch.get_rng_state()]
    if trainer.dist.world_size > 1:
        rng_states = [torch.empty_like(rng_states[0]) for _ in range(trainer.dist.world_size)]
        torch.distributed.all_gather_object(rng_states, torch.get_rng_state())
    if not trainer.dist.is_main:
        return None
    if before_write is not None:
        before_write()
    state = {"kind": kind, "model_name": model_name, **trainer.state_dict(), "step": step, "rng": rng_states,
             "config": OmegaConf.to_container(cfg, resolve=True), "wandb_id": wandb_id,
             "log_window": list(log_window), "extra": extra or {}}
    save_atomic(state, path)
    if keep_as is not None:
        save_atomic(state, keep_as)
    return path


@dataclass(frozen=True)
class Restored:
    """What a checkpoint gives back to the loop beside the trainer's state."""

    path: Path
    step: int
    wandb_id: str | None
    log_window: list[float]
    extra: dict


def restore_checkpoint(path: Path, trainer: Trainer, kind: str, model_name: str) -> Restored:
    """Load ``path`` into ``trainer`` and this rank's RNG; refuses a checkpoint of another loop or model."""
    state = load_checkpoint(path)
    fit_checkpoint(state, trainer.module, model_name, str(path), kind=kind)
    trainer.load_state_dict(state)
    torch.set_rng_state(rng_of_rank(state, trainer.dist.rank))
    if trainer.dist.is_main:
        log.info("resumed from %s at step %d", path, int(state["step"]))
    return Restored(path, int(state["step"]), state.get("wandb_id"), list(state.get("log_window", [])),
                    dict(state.get("extra") or {}))


# --- a loop's run and the step loop ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class StepPlan:
    """The numbers a run derives from its config and data: steps per epoch, steps in all, images per step."""

    steps_per_epoch: int
    total_steps: int
    global_batch: int


def plan_steps(trainer: DictConfig, dataset_size: int, world: int, epochs: int, per_rank: int | None = None,
               keep_partial_batch: bool = False) -> StepPlan:
    """Steps of ``trainer.batch_size x world x trainer.accum_steps`` images per epoch (every rank makes the same
    number), for ``epochs`` epochs unless ``trainer.max_steps`` is set.

    Args:
        per_rank: the items each rank's sampler yields per epoch (default ``dataset_size // world``).
        keep_partial_batch: an epoch ends with its partial last batch, as a ``DataLoader`` without ``drop_last``
            gives it (SparK's fine-tuning); only without accumulation, otherwise only whole steps are kept.
    """
    batch, accum = int(trainer.batch_size), int(trainer.accum_steps)
    per_rank = dataset_size // world if per_rank is None else per_rank
    if keep_partial_batch and accum == 1:
        steps_per_epoch = math.ceil(per_rank / batch)
    else:
        steps_per_epoch = per_rank // (batch * accum)
    if steps_per_epoch < 1:
        raise UsageError(f"{dataset_size} images are fewer than one step of {world} process(es) x batch {batch} x "
                         f"{accum} accumulation step(s); lower trainer.batch_size")
    return StepPlan(steps_per_epoch, int(trainer.max_steps or epochs * steps_per_epoch), batch * world * accum)


@dataclass(kw_only=True)
class LoopRun:
    """What every loop's run holds besides its own model and data: the config, the processes, the run directory
    and its lock, the ``trainer``, the ``tally``, the sinks ``_start`` opens, and where the loop stands."""

    cfg: DictConfig
    dist: DistInfo
    run_dir: Path
    trainer: Trainer
    tally: Tally
    total_steps: int
    steps_per_epoch: int
    lock: RunLock | None = None           # rank 0 only
    logger: MetricsLogger | None = None   # rank 0 only
    progress: tqdm | None = None
    start_step: int = 0
    step: int = 0                         # steps done so far
    wandb_id: str | None = None
    loader: Iterator | None = None
    loader_epoch: int | None = None
    summary: dict = field(default_factory=dict)

    @property
    def latest(self) -> Path:
        return latest_checkpoint(self.run_dir)


def run_job(cfg: DictConfig, on_hold: Callable[[], None] | None,
            body: Callable[[DistInfo, RunLock | None], dict]) -> dict:
    """Set up the processes, hold the run directory (rank 0 then calls ``on_hold``), run ``body(dist, lock)``;
    the lock and the process group are released however it ends."""
    dist_info = setup_distributed(cfg.trainer.device, int(cfg.trainer.dist_timeout_s))
    lock = None
    try:
        lock = hold_run_dir(Path(cfg.run_dir), dist_info)
        if on_hold is not None and dist_info.is_main:
            on_hold()
        return body(dist_info, lock)
    except Exception as error:  # a peer that died or hung: one line naming the checkpoint that survives
        raise_if_rank_lost(error, dist_info, latest_checkpoint(Path(cfg.run_dir)), int(cfg.trainer.dist_timeout_s))
        raise
    finally:
        if lock is not None:
            lock.release()
        cleanup_distributed()


def restore_or_warn(run: LoopRun, kind: str, model_name: str) -> Restored | None:
    """Continue from ``resume=`` (trainer state, step, RNG, log window, wandb run) and return what the loop keeps
    besides; None for a fresh start, with a warning when it will replace the run's own checkpoint."""
    path = resume_path(run.cfg.resume, run.run_dir)
    if path is None:
        if run.dist.is_main and run.latest.exists():
            log.warning("%s holds a checkpoint; this run starts from scratch and replaces it (resume=auto "
                        "continues it)", run.latest)
        return None
    restored = restore_checkpoint(path, run.trainer, kind, model_name)
    run.start_step = run.step = restored.step
    run.wandb_id = restored.wandb_id
    run.tally.window = restored.log_window
    return restored


def open_logger(run: LoopRun, desc: str) -> None:
    """The metrics log where the run starts (lines it will write again removed), wandb as configured, and the
    progress bar (rank 0)."""
    cfg = run.cfg
    if run.dist.is_main:
        run.logger = MetricsLogger(run.run_dir, cfg.logger.wandb_mode, cfg.logger.project, cfg.name,
                                   OmegaConf.to_container(cfg, resolve=True), resume_id=run.wandb_id,
                                   start_step=run.start_step)
    run.progress = tqdm(total=run.total_steps, initial=run.start_step, dynamic_ncols=True, desc=desc,
                        disable=not run.dist.is_main or not cfg.trainer.progress)


def next_batches(run: LoopRun, step: int, make_loader: Callable[[int, int], Iterable]) -> Iterator:
    """The ``accum`` micro-batches of ``step``, read one at a time (only one is on the device at once). The data
    order depends only on the step: a new epoch, or a resume, starts ``make_loader(epoch, start)`` at its position
    in the epoch."""
    epoch, within = divmod(step, run.steps_per_epoch)
    if run.loader_epoch != epoch:
        run.loader = iter(make_loader(epoch, within * int(run.cfg.trainer.batch_size) * run.trainer.accum))
        run.loader_epoch = epoch
    for _ in range(run.trainer.accum):
        yield next(run.loader)


def train(run: LoopRun, train_step: Callable[[int], dict | None], actions: Sequence[Callable[[LoopRun, dict | None],
          None]], checkpoint: Callable[[], Path | None]) -> str | None:
    """Train from ``run.start_step`` to the end: ``train_step(step)``, then every action in order; returns what
    stopped it early (a signal or ``trainer.stop_at_step``), or None when it ran to the end."""
    run.tally.started = time.time()  # img_per_s counts training steps, not the start-up

    def advance(steps_done: int, metrics: dict | None) -> None:
        run.step = steps_done
        for action in actions:
            action(run, metrics)

    try:
        return run_steps(run.start_step, run.total_steps, train_step, [advance], checkpoint,
                         run.cfg.trainer.stop_at_step, run.dist.is_main)
    finally:
        run.progress.close()


def tally_step(run: LoopRun, metrics: dict | None, **shown: str) -> None:
    """Periodic action: count the step's loss and images, show them (and ``shown``) on the progress bar."""
    if metrics is None:
        return
    metrics["img_per_s"] = speed = run.tally.add(metrics["loss"])
    run.progress.set_postfix(loss=f"{metrics['loss']:.4f}", lr=f"{metrics['lr']:.2e}", img_s=f"{speed:.1f}", **shown)
    run.progress.update(1)


def log_when_due(run: LoopRun, metrics: dict | None, keys: Sequence[str]) -> None:
    """Periodic action: every ``trainer.log_every`` steps and at the last, the mean loss since the previous line and
    the step's ``keys``."""
    if metrics is None or not (run.step % run.cfg.trainer.log_every == 0 or run.step == run.total_steps):
        return
    loss = run.tally.window_mean()
    if run.logger is not None:
        run.logger.log({"loss": loss, **{key: metrics[key] for key in keys}}, step=run.step)


def checkpoint_run(run: LoopRun, kind: str, model_name: str, extra: dict | None = None,
                   keep_as: Path | None = None) -> Path | None:
    """Save the run at ``run.step`` (a collective); rank 0 first checks it still holds the directory and flushes
    the metrics log, so that the lines up to this step survive with it."""
    def before_write() -> None:
        if run.lock is not None:
            run.lock.check()  # another job took the directory over: its checkpoints are not ours to overwrite
        if run.logger is not None:
            run.logger.sync()

    return save_checkpoint(run.latest, run.trainer, run.step, run.cfg, kind, model_name,
                           wandb_id=run.logger.run_id if run.logger is not None else None,
                           log_window=run.tally.window, extra=extra, keep_as=keep_as, before_write=before_write)


def run_steps(start: int, total: int, do_step: Callable[[int], dict | None],
              actions: Sequence[Callable[[int, dict | None], None]], checkpoint: Callable[[], Path | None],
              stop_at_step: int | None = None, is_main: bool = True) -> str | None:
    """Run steps ``start .. total-1``: ``do_step(step)``, then each action with the number of steps done and the
    step's metrics (None for a skipped step). On SIGTERM/SIGINT or at ``stop_at_step`` it checkpoints and returns
    what stopped it; None when it ran to the end."""
    stop = StopRequest()
    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        for step in range(start, total):
            metrics = do_step(step)
            for action in actions:
                action(step + 1, metrics)
            if stop_at_step and step + 1 == stop_at_step and step + 1 != total:
                stop.signal_name = "trainer.stop_at_step"
            if stop.signal_name is not None:
                path = checkpoint()
                if is_main:
                    log.warning("received %s: saved %s at step %d; continue with the same command plus "
                                "resume=auto", stop.signal_name, path, step + 1)
                return stop.signal_name
        return None
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def same_weights_on_all_ranks(model: nn.Module) -> bool:
    """DDP sanity check: every rank ends with bit-identical parameters. (BatchNorm running statistics are
    per-rank buffers, re-broadcast from rank 0 at each forward, so they are not compared.)"""
    flat = torch.cat([p.detach().double().flatten().cpu() for p in model.parameters()])
    gathered = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, flat)
    return all(torch.equal(gathered[0], other) for other in gathered[1:])
