"""The pretraining loop: ``pretrain(cfg)`` is plain Python, callable from tests, notebooks and the hydra CLI.

``pretrain`` reads as the table of contents: hold the run directory, ``_build`` the run, ``_restore`` it from a
checkpoint, ``_start`` it (DDP, log, fixed images), ``_train`` (per step: ``_train_step``, then the periodic actions
in a fixed order), ``_finish`` (held-out loss, last checkpoint, exports).
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
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from timm.optim import param_groups_weight_decay
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm import tqdm

from sparkme.data.sampling import ResumableSampler, SeededItems
from sparkme.data.transforms import pretrain_transform
from sparkme.engine.checkpoint import LATEST, check_compatible, load_checkpoint, save_atomic
from sparkme.engine.config_checks import check_config
from sparkme.engine.distributed import (
    DistInfo,
    broadcast_from_main,
    cleanup_distributed,
    setup_distributed,
    to_sync_batchnorm,
)
from sparkme.engine.logging import MetricsLogger
from sparkme.engine.run_lock import RunLock
from sparkme.engine.schedule import SparkSchedule
from sparkme.errors import UsageError
from sparkme.export import export_state_dict
from sparkme.models.weights import load_init_weights
from sparkme.visualize import save_reconstruction_grid

log = logging.getLogger(__name__)
AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
RECONSTRUCTIONS = "reconstructions"


class StopRequest:
    """Set by SIGTERM/SIGINT (how SLURM pre-empts a job); the loop checkpoints and exits at the next step."""

    def __init__(self):
        self.signal_name: str | None = None

    def __call__(self, signum, frame):
        self.signal_name = signal.Signals(signum).name


@dataclass
class Run:
    """Everything one pretraining run holds: built by ``_build``, restored by ``_restore``, advanced by the loop."""

    cfg: DictConfig
    dist: DistInfo
    run_dir: Path
    core: torch.nn.Module                 # the SparK model
    dataset: SeededItems
    optimizer: torch.optim.Optimizer
    schedule: SparkSchedule
    scaler: torch.amp.GradScaler
    amp_dtype: torch.dtype | None
    accum: int
    steps_per_epoch: int
    total_steps: int
    global_batch: int
    lock: RunLock | None = None           # rank 0 only
    model: torch.nn.Module | None = None  # what a step calls: ``core``, or ``core`` wrapped in DDP
    logger: MetricsLogger | None = None   # rank 0 only
    fixed_images: torch.Tensor | None = None
    fixed_masks: torch.Tensor | None = None
    start_step: int = 0
    step: int = 0                         # steps done so far
    wandb_id: str | None = None
    window: list[float] = field(default_factory=list)  # losses since the last log line; saved in checkpoints
    first_losses: list[float] = field(default_factory=list)
    last_losses: deque = field(default_factory=lambda: deque(maxlen=10))
    seen: int = 0
    started: float = field(default_factory=time.time)
    progress: tqdm | None = None
    loader: Iterator | None = None
    loader_epoch: int | None = None
    summary: dict = field(default_factory=dict)

    @property
    def latest(self) -> Path:
        return self.run_dir / "checkpoints" / LATEST


def _mask_generator(seed: int, step: int, micro: int, rank: int, device: torch.device) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(((seed * 1_000_003 + step) * 101 + micro) * 1009 + rank)


def _loader(dataset, cfg: DictConfig, epoch: int, start: int, rank: int, world: int) -> DataLoader:
    sampler = ResumableSampler(len(dataset.dataset), cfg.seed, epoch, rank, world, start)
    # An explicit generator: otherwise creating the iterator draws from the global RNG, and a resumed run (which
    # creates it at another step) would see different drop-path samples than an uninterrupted one.
    return DataLoader(dataset, batch_size=cfg.trainer.batch_size, sampler=sampler, drop_last=True,
                      num_workers=cfg.data.num_workers, persistent_workers=False,
                      pin_memory=torch.cuda.is_available(),
                      generator=torch.Generator().manual_seed(cfg.seed * 7919 + epoch))


@torch.no_grad()
def evaluate_loss(model, images: torch.Tensor, masks: torch.Tensor, batch_size: int) -> float:
    """Mean SparK loss of ``model`` (eval mode) on fixed images and masks."""
    was_training = model.training
    model.eval()
    losses = [model(images[i:i + batch_size], masks[i:i + batch_size]).item()
              for i in range(0, len(images), batch_size)]
    model.train(was_training)
    return sum(losses) / len(losses)


def _fixed_batch(cfg: DictConfig, model, device, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Images (held-out split when the data set has one) and masks that stay the same for the whole run."""
    node = cfg.data.get("holdout") or cfg.data.dataset
    dataset = SeededItems(instantiate(node, transform=pretrain_transform(cfg.image_size)), seed=cfg.seed + 1)
    images = torch.stack([dataset[(0, i % len(dataset.dataset))] for i in range(count)]).to(device)
    return images, model.sample_mask(images, _mask_generator(cfg.seed + 1, 0, 0, 0, device))


def _same_weights_on_all_ranks(model: torch.nn.Module) -> bool:
    """DDP sanity check: every rank ends with bit-identical parameters. (BatchNorm running statistics are
    per-rank buffers, re-broadcast from rank 0 at each forward, so they are not compared.)"""
    flat = torch.cat([p.detach().double().flatten().cpu() for p in model.parameters()])
    gathered = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, flat)
    return all(torch.equal(gathered[0], other) for other in gathered[1:])


# --- the table of contents -------------------------------------------------------------------------------------
def pretrain(cfg: DictConfig) -> dict:
    """Run SparK pretraining as configured; returns a summary (losses, steps, paths)."""
    check_config(cfg)  # user errors at start-up, before anything heavy
    dist_info = setup_distributed(cfg.trainer.device)
    lock = None
    try:
        lock = _hold_run_dir(Path(cfg.run_dir), dist_info)
        run = _build(cfg, dist_info, lock)
        _restore(run)
        _start(run)
        stopped_by = _train(run)
        return _finish(run, stopped_by)
    finally:
        if lock is not None:
            lock.release()
        cleanup_distributed()


def _check_writable(run_dir: Path) -> None:
    """Fail at start-up, not at the first checkpoint hours later, when the run folder cannot be written."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        handle, probe = tempfile.mkstemp(prefix=".write_probe.", dir=run_dir)  # a name of its own: jobs may race
        os.close(handle)
        os.unlink(probe)
    except OSError as error:
        raise OSError(f"run_dir {str(run_dir)!r} is not writable ({error.strerror}); choose another with "
                      "run_dir=... or hydra.run.dir=...") from error


def _hold_run_dir(run_dir: Path, dist_info: DistInfo) -> RunLock | None:
    """Rank 0 locks the run directory for the whole job (one job per directory); a refusal reaches every rank, so
    all of them exit with the same one-line error instead of waiting for rank 0 at the first collective."""
    lock, refusal = None, None
    if dist_info.is_main:
        _check_writable(run_dir)
        try:
            lock = RunLock(run_dir).acquire()
        except UsageError as error:
            refusal = str(error)
    refusal = broadcast_from_main(refusal, dist_info)
    if refusal is not None:
        raise UsageError(refusal)
    return lock


def _build(cfg: DictConfig, dist_info: DistInfo, lock: RunLock | None = None) -> Run:
    """Model, data, optimizer, schedule and scaler as configured, at step 0 (nothing read from checkpoints)."""
    device, rank, world = dist_info.device, dist_info.rank, dist_info.world_size
    if cfg.trainer.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    torch.manual_seed(cfg.seed * 1000 + rank)

    model = instantiate(cfg.model).to(device)
    if cfg.trainer.sync_bn and world > 1:
        model = to_sync_batchnorm(model)
    dataset = SeededItems(instantiate(cfg.data.dataset, transform=pretrain_transform(cfg.image_size)), cfg.seed)
    batch, accum = int(cfg.trainer.batch_size), int(cfg.trainer.accum_steps)
    steps_per_epoch = len(dataset) // world // (batch * accum)
    if steps_per_epoch < 1:
        raise ValueError(f"data set of {len(dataset)} images is smaller than one step of {world} x {batch} x {accum}")
    total_steps = int(cfg.trainer.max_steps or cfg.trainer.epochs * steps_per_epoch)
    global_batch = batch * world * accum
    lr = cfg.optim.base_lr * global_batch / 256
    # A partial (parameters and scaled lr are given here); plain containers keep checkpoints pickle-free.
    make_optimizer = instantiate(cfg.optim.optimizer, _convert_="all")
    optimizer = make_optimizer(param_groups_weight_decay(model, cfg.sched.wd_start,
                                                         no_weight_decay_list=("mask_token",)), lr=lr)
    schedule = SparkSchedule(optimizer, total_steps, int(cfg.sched.warmup_epochs * steps_per_epoch),
                             min_lr=cfg.sched.min_lr_ratio * lr, wd_start=cfg.sched.wd_start, wd_end=cfg.sched.wd_end)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.trainer.amp == "fp16")
    return Run(cfg=cfg, dist=dist_info, run_dir=Path(cfg.run_dir), core=model, model=model, dataset=dataset,
               optimizer=optimizer, schedule=schedule, scaler=scaler, amp_dtype=AMP_DTYPES.get(cfg.trainer.amp),
               accum=accum, steps_per_epoch=steps_per_epoch, total_steps=total_steps, global_batch=global_batch,
               lock=lock)


def _restore(run: Run) -> None:
    """Continue from a checkpoint (``resume``: weights, optimizer, scaler, step, RNG, log window) or start from
    given weights (``init``); otherwise leave the fresh model as built."""
    cfg, rank = run.cfg, run.dist.rank
    resume_path = run.latest if cfg.resume == "auto" and run.latest.exists() else (
        None if cfg.resume in (None, "auto") else Path(cfg.resume))
    if resume_path is not None:
        state = load_checkpoint(resume_path)
        check_compatible(state["model"], run.core.state_dict(), str(resume_path))
        run.core.load_state_dict(state["model"])
        run.optimizer.load_state_dict(state["optimizer"])
        run.scaler.load_state_dict(state["scaler"])
        run.start_step = run.step = int(state["step"])
        run.wandb_id = state.get("wandb_id")
        run.window = list(state.get("log_window", []))
        torch.set_rng_state(state["rng"][rank] if rank < len(state["rng"]) else state["rng"][0])
        if rank == 0:
            log.info("resumed from %s at step %d", resume_path, run.start_step)
        return
    if run.dist.is_main and run.latest.exists():
        log.warning("%s holds a checkpoint; this run starts from scratch and replaces it (resume=auto continues "
                    "it)", run.latest)
    if cfg.init:
        load_init_weights(run.core, cfg.init)


def _start(run: Run) -> None:
    """Wrap for DDP, open the log where the run starts (removing what it will write again), fix the images."""
    cfg, dist_info = run.cfg, run.dist
    if dist_info.world_size > 1:
        device = dist_info.device
        run.model = DistributedDataParallel(run.core, device_ids=[device.index] if device.type == "cuda" else None)
    if dist_info.is_main:
        _remove_reconstructions_after(run.run_dir / RECONSTRUCTIONS, run.start_step)
        run.logger = MetricsLogger(run.run_dir, cfg.logger.wandb_mode, cfg.logger.project, cfg.name,
                                   OmegaConf.to_container(cfg, resolve=True), resume_id=run.wandb_id,
                                   start_step=run.start_step)
    run.fixed_images, run.fixed_masks = _fixed_batch(cfg, run.core, dist_info.device, int(cfg.trainer.eval_images))
    run.summary = {"run_dir": str(run.run_dir), "total_steps": run.total_steps, "start_step": run.start_step}
    if dist_info.is_main and run.start_step == 0:
        run.summary["holdout_loss_initial"] = evaluate_loss(run.core, run.fixed_images, run.fixed_masks,
                                                            int(cfg.trainer.batch_size))
        run.logger.log({"holdout_loss": run.summary["holdout_loss_initial"]}, step=0)
    run.progress = tqdm(total=run.total_steps, initial=run.start_step, dynamic_ncols=True, desc="pretrain",
                        disable=not dist_info.is_main or not cfg.trainer.progress)


def _remove_reconstructions_after(folder: Path, step: int) -> None:
    """Pictures after ``step`` belong to the interrupted run (the last one possibly half written); the resumed run
    makes them again."""
    for path in folder.glob("step_*.png"):
        number = path.stem.removeprefix("step_")
        if number.isdigit() and int(number) > step:
            path.unlink()


def _train(run: Run) -> str | None:
    """Train from ``run.start_step`` to the end; returns what stopped it early (a signal or
    ``trainer.stop_at_step``), or None when it ran to the end."""
    stop = StopRequest()
    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    run.started = time.time()  # img_per_s counts training steps, not the start-up
    try:
        for step in range(run.start_step, run.total_steps):
            metrics = _train_step(run, step, _next_batches(run, step))
            run.step = step + 1
            for action in PERIODIC_ACTIONS:
                action(run, metrics)
            stop_at = run.cfg.trainer.stop_at_step
            if stop_at and run.step == stop_at and run.step != run.total_steps:
                stop.signal_name = "trainer.stop_at_step"
            if stop.signal_name is not None:
                path = _checkpoint(run)
                if run.dist.is_main:
                    log.warning("received %s: saved %s at step %d; continue with the same command plus "
                                "resume=auto", stop.signal_name, path, run.step)
                return stop.signal_name
        return None
    finally:
        run.progress.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _next_batches(run: Run, step: int) -> Iterator[torch.Tensor]:
    """The ``accum`` micro-batches of ``step``, read one at a time (only one is on the device at once). The data
    order depends only on the step: a new epoch, or a resume, starts a loader at its position in the epoch."""
    epoch, within = divmod(step, run.steps_per_epoch)
    if run.loader_epoch != epoch:
        start = within * int(run.cfg.trainer.batch_size) * run.accum
        run.loader = iter(_loader(run.dataset, run.cfg, epoch, start, run.dist.rank, run.dist.world_size))
        run.loader_epoch = epoch
    for _ in range(run.accum):
        yield next(run.loader).to(run.dist.device, non_blocking=True)


def _train_step(run: Run, step: int, batches: Iterable[torch.Tensor]) -> dict | None:
    """One optimizer step (index ``step``, from 0) on ``run.accum`` micro-batches of images ``(B, 3, H, W)``.

    Returns:
        the step's loss, lr, wd, grad_norm and epoch; None when the loss was not finite and
        ``trainer.skip_nonfinite`` skipped the step (weights and optimizer state untouched).

    Raises:
        FloatingPointError: a non-finite loss without ``trainer.skip_nonfinite``.
    """
    cfg, dist_info, model = run.cfg, run.dist, run.model
    lr, wd = run.schedule.step(step)
    # The forward pass updates BatchNorm running statistics even when the loss turns out NaN: a skipped step puts
    # the buffers back, or one bad batch would poison every later evaluation and the export.
    saved_buffers = [b.detach().clone() for b in run.core.buffers()] if cfg.trainer.skip_nonfinite else None
    step_loss = 0.0
    for micro, images in enumerate(batches):
        mask = run.core.sample_mask(images, _mask_generator(cfg.seed, step, micro, dist_info.rank, dist_info.device))
        last = micro == run.accum - 1
        sync = contextlib.nullcontext() if last or dist_info.world_size == 1 else model.no_sync()
        with sync, torch.autocast(dist_info.device.type, dtype=run.amp_dtype or torch.float32,
                                  enabled=run.amp_dtype is not None):
            loss = model(images, mask)
            run.scaler.scale(loss / run.accum).backward()
        step_loss += loss.item() / run.accum
    if not math.isfinite(step_loss):
        if cfg.trainer.skip_nonfinite:
            log.warning("non-finite loss %s at step %d: step skipped", step_loss, step)
            run.optimizer.zero_grad(set_to_none=True)
            with torch.no_grad():
                for buffer, saved in zip(run.core.buffers(), saved_buffers, strict=True):
                    buffer.copy_(saved)
            return None
        raise FloatingPointError(
            f"non-finite loss {step_loss} at step {step}; the last good checkpoint is {run.latest} "
            "(set trainer.skip_nonfinite=true to skip such steps, or lower optim.base_lr)")
    run.scaler.unscale_(run.optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.trainer.clip_grad or float("inf"))
    run.scaler.step(run.optimizer)
    run.scaler.update()
    run.optimizer.zero_grad(set_to_none=True)
    return {"loss": step_loss, "lr": lr, "wd": wd, "grad_norm": float(grad_norm),
            "epoch": step // run.steps_per_epoch}


# --- periodic actions, after every step, in this order -----------------------------------------------------------
def _tally(run: Run, metrics: dict | None) -> None:
    """Losses for the summary and the next log line, images seen, the progress bar."""
    if metrics is None:
        return
    loss = metrics["loss"]
    if len(run.first_losses) < 10:
        run.first_losses.append(loss)
    run.last_losses.append(loss)
    run.window.append(loss)
    run.seen += run.global_batch
    speed = run.seen / max(time.time() - run.started, 1e-9)
    metrics["img_per_s"] = speed
    run.progress.set_postfix(loss=f"{loss:.4f}", lr=f"{metrics['lr']:.2e}", img_s=f"{speed:.1f}")
    run.progress.update(1)


def _log_metrics(run: Run, metrics: dict | None) -> None:
    """Every ``trainer.log_every`` steps and at the last: the mean loss since the previous line, lr, wd, ..."""
    if metrics is None or not (run.step % run.cfg.trainer.log_every == 0 or run.step == run.total_steps):
        return
    if run.logger is not None:
        run.logger.log({"loss": sum(run.window) / len(run.window), "lr": metrics["lr"], "wd": metrics["wd"],
                        "grad_norm": metrics["grad_norm"], "img_per_s": metrics["img_per_s"],
                        "epoch": metrics["epoch"]}, step=run.step)
    run.window = []


def _save_reconstruction(run: Run, metrics: dict | None) -> None:
    """Every ``trainer.vis_every`` steps and at the last: original | masked | reconstruction of the fixed images."""
    vis_every = run.cfg.trainer.vis_every
    due = vis_every and (run.step % vis_every == 0 or run.step == run.total_steps)
    if metrics is None or run.logger is None or not due:
        return
    count = run.cfg.trainer.vis_images
    path = save_reconstruction_grid(run.core, run.fixed_images[:count], run.fixed_masks[:count],
                                    run.run_dir / RECONSTRUCTIONS / f"step_{run.step:07d}.png")
    run.logger.log_image("reconstruction", path, step=run.step, caption="original | masked | reconstruction")


def _checkpoint_when_due(run: Run, metrics: dict | None) -> None:
    """Every ``trainer.ckpt_every`` steps (the last step's checkpoint is written by ``_finish``)."""
    every = run.cfg.trainer.ckpt_every
    if every and run.step % every == 0 and run.step != run.total_steps:
        _checkpoint(run)


# Checkpoint last: the log line and picture of step k are on disk before checkpoint k, so a resume from k keeps
# exactly the lines up to k and removes the rest, which it writes again.
PERIODIC_ACTIONS = (_tally, _log_metrics, _save_reconstruction, _checkpoint_when_due)


def _checkpoint(run: Run) -> Path | None:
    """Save everything a resume needs at ``run.step`` (rank 0 writes; every rank contributes its RNG state)."""
    rng_states = [torch.get_rng_state()]
    if run.dist.world_size > 1:
        rng_states = [torch.empty_like(rng_states[0]) for _ in range(run.dist.world_size)]
        torch.distributed.all_gather_object(rng_states, torch.get_rng_state())
    if not run.dist.is_main:
        return None
    if run.lock is not None:
        run.lock.check()  # another job took the directory over: its checkpoints are not ours to overwrite
    if run.logger is not None:
        run.logger.sync()
    state = {"model": run.core.state_dict(), "optimizer": run.optimizer.state_dict(),
             "scaler": run.scaler.state_dict(), "step": run.step, "rng": rng_states,
             "config": OmegaConf.to_container(run.cfg, resolve=True),
             "wandb_id": run.logger.run_id if run.logger is not None else None, "log_window": list(run.window)}
    path = save_atomic(state, run.latest)
    keep_every = run.cfg.trainer.keep_every
    if keep_every and run.step % keep_every == 0:
        save_atomic(state, run.latest.parent / f"step_{run.step:07d}.pt")
    return path


def _finish(run: Run, stopped_by: str | None) -> dict:
    """The summary; after the last step also the held-out loss, the last checkpoint and the dense exports."""
    summary = run.summary
    if stopped_by is not None:
        summary.update(stopped_by=stopped_by, step=run.step)
        if run.logger is not None:
            run.logger.close()
        return summary
    summary.update(step=run.total_steps, first_losses=run.first_losses, last_losses=list(run.last_losses))
    if run.dist.world_size > 1:
        summary["weights_identical_across_ranks"] = _same_weights_on_all_ranks(run.core)
    if run.dist.is_main:
        summary["holdout_loss_final"] = evaluate_loss(run.core, run.fixed_images, run.fixed_masks,
                                                      int(run.cfg.trainer.batch_size))
        if run.start_step < run.total_steps:  # a finished run started again has logged this line already
            run.logger.log({"holdout_loss": summary["holdout_loss_final"]}, step=run.total_steps)
    _checkpoint(run)  # after the last line, so that a resume from it keeps the whole log
    if run.dist.is_main:
        for fmt in run.cfg.export_formats:
            path = run.run_dir / "export" / f"{run.cfg.model.model_name}_{fmt}.pt"
            save_atomic(export_state_dict(run.core.encoder, run.cfg.model.model_name, fmt), path)
            summary[f"export_{fmt}"] = str(path)
        run.logger.close()
    return summary
