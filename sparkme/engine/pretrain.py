"""The pretraining loop: ``pretrain(cfg)`` is plain Python, callable from tests, notebooks and the hydra CLI.

``pretrain`` reads as the table of contents: in the held run directory (``run_job``), ``_build`` the run,
``_restore`` it from a checkpoint, ``_start`` it (DDP, log, fixed images), ``train`` it (per step: ``_train_step``,
then ``PERIODIC_ACTIONS`` in order), ``_finish`` (held-out loss, last checkpoint, exports). What the fine-tuning loop
shares with it (run lock, one optimizer step, checkpoint, step loop, periodic logging) is in ``sparkme.engine.core``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig
from timm.optim import param_groups_weight_decay
from torch.utils.data import DataLoader

from sparkme.data.sampling import ResumableSampler, SeededItems
from sparkme.data.transforms import pretrain_transform
from sparkme.engine.config_checks import check_config
from sparkme.engine.core import (
    LoopRun,
    Tally,
    Trainer,
    checkpoint_run,
    log_when_due,
    next_batches,
    open_logger,
    plan_steps,
    restore_or_warn,
    run_job,
    same_weights_on_all_ranks,
    tally_step,
    train,
)
from sparkme.engine.distributed import DistInfo, to_sync_batchnorm
from sparkme.engine.run_lock import RunLock
from sparkme.engine.schedule import SparkSchedule
from sparkme.evaluation.monitor import KnnMonitor
from sparkme.export import export_state_dict
from sparkme.export_volumes import export_formats_of
from sparkme.files import save_atomic
from sparkme.models.families import optimizer_overrides
from sparkme.models.weights import load_init_weights
from sparkme.visualize import save_reconstruction_grid
from sparkme.volume_pictures import save_slice_grid

log = logging.getLogger(__name__)
RECONSTRUCTIONS = "reconstructions"
KIND = "pretrain"


@dataclass(kw_only=True)
class Run(LoopRun):
    """One pretraining run: besides the loop's parts (``LoopRun``), the SparK model (``trainer.module``;
    ``trainer.ddp_model`` wraps it), the data, the schedule, and the fixed held-out images and masks."""

    spark: torch.nn.Module
    dataset: SeededItems
    schedule: SparkSchedule
    fixed_images: torch.Tensor | None = None
    fixed_masks: torch.Tensor | None = None
    knn_monitor: KnnMonitor | None = None  # rank 0, with eval.root and eval.every


def _mask_generator(seed: int, step: int, micro: int, rank: int, device: torch.device) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(((seed * 1_000_003 + step) * 101 + micro) * 1009 + rank)


def _loader(dataset, cfg: DictConfig, epoch: int, start: int, rank: int, world: int) -> DataLoader:
    if hasattr(dataset.dataset, "epoch_loader"):  # streamed shards order themselves (sparkme.data.shards.layout)
        return dataset.dataset.epoch_loader(cfg.trainer.batch_size, int(cfg.trainer.accum_steps),
                                            cfg.data.num_workers, epoch, start, rank, world,
                                            torch.Generator().manual_seed(cfg.seed * 7919 + epoch))
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


# --- the table of contents -------------------------------------------------------------------------------------
def pretrain(cfg: DictConfig, on_hold: Callable[[], None] | None = None) -> dict:
    """Run SparK pretraining as configured; returns a summary (losses, steps, paths).

    ``on_hold`` is called on rank 0 once the run directory is held (the CLI writes hydra's records there then, so
    that a job refused by the lock leaves no trace in another job's directory)."""
    check_config(cfg)  # user errors at start-up, before anything heavy

    def body(dist_info: DistInfo, lock: RunLock | None) -> dict:
        run = _build(cfg, dist_info, lock)
        _restore(run)
        _start(run)
        return _finish(run, train(run, lambda step: _train_step(run, step, _next_batches(run, step)),
                                  PERIODIC_ACTIONS, lambda: _checkpoint(run)))

    return run_job(cfg, on_hold, body)


def _build(cfg: DictConfig, dist_info: DistInfo, lock: RunLock | None = None) -> Run:
    """Model, data, optimizer, schedule and scaler as configured, at step 0 (nothing read from checkpoints)."""
    device, rank, world = dist_info.device, dist_info.rank, dist_info.world_size
    if cfg.trainer.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    torch.manual_seed(cfg.seed * 1000 + rank)

    spark = instantiate(cfg.model).to(device)
    if cfg.trainer.sync_bn and world > 1:
        spark = to_sync_batchnorm(spark)
    dataset = SeededItems(instantiate(cfg.data.dataset, transform=pretrain_transform(cfg.image_size)), cfg.seed)
    plan = plan_steps(cfg.trainer, len(dataset), world, cfg.trainer.epochs)
    lr = cfg.optim.base_lr * plan.global_batch / 256
    # A partial (parameters and scaled lr are given here); plain containers keep checkpoints pickle-free.
    # ``betas: null`` in the config means the model family's (ResNet 0.95, ConvNeXt 0.999: sparkme.models.families)
    make_optimizer = instantiate(cfg.optim.optimizer, _convert_="all",
                                 **optimizer_overrides(cfg.model.model_name, cfg.optim.optimizer))
    optimizer = make_optimizer(param_groups_weight_decay(spark, cfg.sched.wd_start,
                                                         no_weight_decay_list=("mask_token",)), lr=lr)
    schedule = SparkSchedule(optimizer, plan.total_steps, int(cfg.sched.warmup_epochs * plan.steps_per_epoch),
                             min_lr=cfg.sched.min_lr_ratio * lr, wd_start=cfg.sched.wd_start, wd_end=cfg.sched.wd_end)
    trainer = Trainer(spark, optimizer, dist_info, amp=cfg.trainer.amp, accum=int(cfg.trainer.accum_steps),
                      clip_grad=cfg.trainer.clip_grad, skip_nonfinite=bool(cfg.trainer.skip_nonfinite))
    return Run(cfg=cfg, dist=dist_info, run_dir=Path(cfg.run_dir), trainer=trainer, tally=Tally(plan.global_batch),
               total_steps=plan.total_steps, steps_per_epoch=plan.steps_per_epoch, lock=lock, spark=spark,
               dataset=dataset, schedule=schedule)


def _restore(run: Run) -> None:
    """Continue from a checkpoint (``resume``: weights, optimizer, scaler, step, RNG, log window) or start from
    given weights (``init``); otherwise leave the fresh model as built."""
    if restore_or_warn(run, KIND, run.cfg.model.model_name) is None and run.cfg.init:
        load_init_weights(run.spark, run.cfg.init)


def _start(run: Run) -> None:
    """Wrap for DDP, open the log where the run starts (removing what it will write again), fix the images."""
    cfg, dist_info = run.cfg, run.dist
    run.trainer.wrap_ddp()
    if dist_info.is_main:
        _remove_reconstructions_after(run.run_dir / RECONSTRUCTIONS, run.start_step)
    open_logger(run, "pretrain")
    run.fixed_images, run.fixed_masks = _fixed_batch(cfg, run.spark, dist_info.device, int(cfg.trainer.eval_images))
    run.summary = {"run_dir": str(run.run_dir), "total_steps": run.total_steps, "start_step": run.start_step}
    if dist_info.is_main and cfg.eval.root and cfg.eval.every:
        run.knn_monitor = KnnMonitor.from_folder(str(cfg.eval.root), cfg.image_size, cfg.seed, cfg.eval.per_class,
                                                 cfg.eval.val_per_class, cfg.eval.val_fraction)
    if dist_info.is_main and run.start_step == 0:
        run.summary["holdout_loss_initial"] = evaluate_loss(run.spark, run.fixed_images, run.fixed_masks,
                                                            int(cfg.trainer.batch_size))
        run.logger.log({"holdout_loss": run.summary["holdout_loss_initial"]}, step=0)


def _remove_reconstructions_after(folder: Path, step: int) -> None:
    """Pictures after ``step`` belong to the interrupted run (the last one possibly half written); the resumed run
    makes them again."""
    for path in folder.glob("step_*.png"):
        number = path.stem.removeprefix("step_")
        if number.isdigit() and int(number) > step:
            path.unlink()


def _next_batches(run: Run, step: int) -> Iterator[torch.Tensor]:
    """The ``accum`` micro-batches of images ``(B, 3, H, W)`` of ``step``, on the device."""
    def make_loader(epoch: int, start: int) -> DataLoader:
        return _loader(run.dataset, run.cfg, epoch, start, run.dist.rank, run.dist.world_size)

    for images in next_batches(run, step, make_loader):
        yield images.to(run.dist.device, non_blocking=True)


def _train_step(run: Run, step: int, batches: Iterable[torch.Tensor]) -> dict | None:
    """One optimizer step (index ``step``, from 0) on ``accum`` micro-batches of images ``(B, 3, H, W)``, each
    with its own random mask ``(B, H/32, W/32)``.

    Returns:
        the step's loss, lr, wd, grad_norm and epoch; None when a loss was not finite (on any rank) and
        ``trainer.skip_nonfinite`` skipped the step (weights and optimizer state untouched on every rank).

    Raises:
        FloatingPointError: a non-finite loss without ``trainer.skip_nonfinite``.
    """
    seed, dist_info = run.cfg.seed, run.dist
    lr, wd = run.schedule.step(step)

    def loss_of(model, micro: int, images: torch.Tensor) -> torch.Tensor:
        mask = run.spark.sample_mask(images, _mask_generator(seed, step, micro, dist_info.rank, dist_info.device))
        return model(images, mask)

    metrics = run.trainer.step(step, batches, loss_of, where=str(run.latest))
    if metrics is None:
        return None
    return {**metrics, "lr": lr, "wd": wd, "epoch": step // run.steps_per_epoch}


# --- periodic actions, after every step, in this order -----------------------------------------------------------
def _tally(run: Run, metrics: dict | None) -> None:
    """Losses for the summary and the next log line, images seen, the progress bar."""
    tally_step(run, metrics)


def _log_metrics(run: Run, metrics: dict | None) -> None:
    """Every ``trainer.log_every`` steps and at the last: the mean loss since the previous line, lr, wd, ..."""
    log_when_due(run, metrics, ("lr", "wd", "grad_norm", "img_per_s", "epoch"))


def _save_reconstruction(run: Run, metrics: dict | None) -> None:
    """Every ``trainer.vis_every`` steps and at the last: original | masked | reconstruction of the fixed images."""
    vis_every = run.cfg.trainer.vis_every
    due = vis_every and (run.step % vis_every == 0 or run.step == run.total_steps)
    if metrics is None or run.logger is None or not due:
        return
    count = run.cfg.trainer.vis_images
    volumes = getattr(run.spark, "spatial_dims", 2) == 3  # 3D: the mid-slices, three rows per volume
    path = (save_slice_grid if volumes else save_reconstruction_grid)(
        run.spark, run.fixed_images[:count], run.fixed_masks[:count],
        run.run_dir / RECONSTRUCTIONS / f"step_{run.step:07d}.png")
    run.logger.log_image("reconstruction", path, step=run.step, caption="original | masked | reconstruction")


def _knn_when_due(run: Run, metrics: dict | None) -> None:
    """Every ``eval.every`` steps and at the last (with ``eval.root``): kNN top-1 / top-5 of the encoder on the
    monitor's fixed subset, to the log and the progress bar."""
    every = run.cfg.eval.every
    if run.knn_monitor is None or not (run.step % every == 0 or run.step == run.total_steps):
        return
    accuracy = run.knn_monitor.evaluate(run.spark.encoder)
    run.logger.log(accuracy, step=run.step)
    run.summary["knn_top1"] = accuracy["knn_top1"]
    run.progress.set_postfix_str(f"{run.progress.postfix}, knn={accuracy['knn_top1']:.1f}")


def _checkpoint_when_due(run: Run, metrics: dict | None) -> None:
    """Every ``trainer.ckpt_every`` steps (the last step's checkpoint is written by ``_finish``)."""
    every = run.cfg.trainer.ckpt_every
    if every and run.step % every == 0 and run.step != run.total_steps:
        _checkpoint(run)


# Checkpoint last: the log line and picture of step k are on disk before checkpoint k, so a resume from k keeps
# exactly the lines up to k and removes the rest, which it writes again.
PERIODIC_ACTIONS = (_tally, _log_metrics, _save_reconstruction, _knn_when_due, _checkpoint_when_due)


def _checkpoint(run: Run) -> Path | None:
    """Save everything a resume needs at ``run.step`` (rank 0 writes; every rank contributes its RNG state)."""
    keep_every = run.cfg.trainer.keep_every
    keep_as = run.latest.parent / f"step_{run.step:07d}.pt" if keep_every and run.step % keep_every == 0 else None
    return checkpoint_run(run, KIND, run.cfg.model.model_name, keep_as=keep_as)


def _finish(run: Run, stopped_by: str | None) -> dict:
    """The summary; after the last step also the held-out loss, the last checkpoint and the dense exports."""
    summary, total = run.summary, run.total_steps
    if stopped_by is not None:
        summary.update(stopped_by=stopped_by, step=run.step)
        if run.logger is not None:
            run.logger.close()
        return summary
    summary.update(step=total, first_losses=run.tally.first_losses, last_losses=list(run.tally.last_losses))
    if run.dist.world_size > 1:
        summary["weights_identical_across_ranks"] = same_weights_on_all_ranks(run.spark)
    if run.dist.is_main:
        summary["holdout_loss_final"] = evaluate_loss(run.spark, run.fixed_images, run.fixed_masks,
                                                      int(run.cfg.trainer.batch_size))
        if run.start_step < total:  # a finished run started again has logged this line already
            run.logger.log({"holdout_loss": summary["holdout_loss_final"]}, step=total)
    _checkpoint(run)  # after the last line, so that a resume from it keeps the whole log
    if run.dist.is_main:
        for fmt in export_formats_of(run.cfg):
            path = run.run_dir / "export" / f"{run.cfg.model.model_name}_{fmt}.pt"
            save_atomic(export_state_dict(run.spark.encoder, run.cfg.model.model_name, fmt), path)
            summary[f"export_{fmt}"] = str(path)
        run.logger.close()
    return summary
