"""The fine-tuning loop: ``finetune(cfg)`` trains a dense classifier on labelled images with SparK's recipe.

It reads like the pretraining loop and shares its core (``sparkme.engine.core``: run lock, one optimizer step,
checkpoint, step loop, SIGTERM handling): ``_build`` the run (classifier, pretrained weights, EMA, data, optimizer
with SparK's layer-wise lr decay, schedule, mixup), ``_restore`` it, ``_start`` it, ``_train`` (per step:
``_train_step``, then the periodic actions: tally, log line, evaluation at each epoch's end, checkpoint), ``_finish``
(the best weights exported, the per-class table and the confusion matrix).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig
from timm.utils import ModelEmaV3
from torch import nn
from torch.utils.data import DataLoader, Dataset

from sparkme.data.labelled import check_labelled_root, labelled_splits
from sparkme.data.sampling import ResumableSampler, SeededItems, items_per_rank
from sparkme.engine.core import (
    LoopRun,
    StepPlan,
    Tally,
    Trainer,
    checkpoint_run,
    log_when_due,
    next_batches,
    open_logger,
    plan_steps,
    restore_or_warn,
    run_job,
    tally_step,
    train,
)
from sparkme.engine.distributed import DistInfo, to_sync_batchnorm
from sparkme.engine.run_lock import RunLock
from sparkme.files import read_torch_file, save_atomic
from sparkme.finetune.checks import check_finetune_config, resolve_recipe
from sparkme.finetune.classifier import create_classifier
from sparkme.finetune.mixing import BatchMixer, build_loss, build_mixup
from sparkme.finetune.optimizer import build_optimizer
from sparkme.finetune.recipes import FinetuneRecipe
from sparkme.finetune.report import confusion_matrix, per_class_table, save_confusion_png, topk_correct
from sparkme.finetune.schedule import FinetuneSchedule
from sparkme.finetune.sync_bn import use_sync_bn
from sparkme.finetune.transforms import eval_transform, train_transform
from sparkme.models.dense_weights import load_pretrained_dense

log = logging.getLogger(__name__)
KIND = "finetune"


@dataclass
class Best:
    """The best top-1 over all evaluations, of the model or of its EMA (SparK reports the better one)."""

    top1: float = -1.0
    top5: float = 0.0
    source: str = ""          # "model" or "ema"
    step: int = 0


@dataclass(kw_only=True)
class FinetuneRun(LoopRun):
    """One fine-tuning run: besides the loop's parts (``LoopRun``), the recipe, the classes, the classifier
    (``trainer.module``) and its EMA, the data, the schedule, the mixer and the loss, and the best evaluation."""

    recipe: FinetuneRecipe
    classes: list[str]
    classifier: nn.Module
    ema: ModelEmaV3
    train_set: SeededItems
    val_set: Dataset
    schedule: FinetuneSchedule
    mixup: BatchMixer
    criterion: nn.Module
    best: Best = field(default_factory=Best)

    @property
    def model_name(self) -> str:
        return str(self.cfg.model)


@contextmanager
def _numpy_seeded(seed: int):
    """timm's Mixup draws from NumPy's global RNG: seed it per step (a resume draws the same mixes) and leave the
    global state as it was."""
    state = np.random.get_state()
    np.random.seed(seed % 2**32)
    try:
        yield
    finally:
        np.random.set_state(state)


# --- the table of contents -------------------------------------------------------------------------------------
def finetune(cfg: DictConfig, on_hold: Callable[[], None] | None = None) -> dict:
    """Fine-tune as configured; returns a summary (accuracies, best, paths). ``on_hold`` is called on rank 0 once
    the run directory is held (the CLI writes hydra's records there then)."""
    check_finetune_config(cfg)  # user errors at start-up, before anything heavy

    def body(dist_info: DistInfo, lock: RunLock | None) -> dict:
        run = _build(cfg, dist_info, lock)
        _restore(run)
        _start(run)
        return _finish(run, train(run, lambda step: _train_step(run, step, _next_batches(run, step)),
                                  PERIODIC_ACTIONS, lambda: _checkpoint(run)))

    return run_job(cfg, on_hold, body)


@dataclass
class ClassifierTraining:
    """What trains the classifier, independent of the data: the model (with ``init``'s weights), its EMA, the
    trainer (optimizer with SparK's layer-wise lr decay, scaler, DDP), the schedule, the mixer and the loss."""

    classifier: nn.Module
    ema: ModelEmaV3
    trainer: Trainer
    schedule: FinetuneSchedule
    mixup: BatchMixer
    criterion: nn.Module


def build_classifier_training(cfg: DictConfig, recipe: FinetuneRecipe, num_classes: int, plan: StepPlan,
                              dist_info: DistInfo) -> ClassifierTraining:
    """The classifier of ``cfg.model`` for ``num_classes`` and all that steps it (``sparkme-bench`` times this).
    SparK's warm-up (``recipe.warmup_epochs``) may end mid-epoch."""
    classifier = create_classifier(str(cfg.model), num_classes, recipe.drop_path, cfg.source)
    if cfg.init:
        report = load_pretrained_dense(classifier, str(cfg.model), cfg.init)
        if dist_info.is_main:
            log.info("init=%s: %s", cfg.init, report)
    memory_format = torch.channels_last if cfg.trainer.channels_last else torch.contiguous_format
    classifier = classifier.to(dist_info.device, memory_format=memory_format)
    ema = ModelEmaV3(classifier, decay=recipe.ema_decay)  # before SyncBN, as SparK makes it
    if use_sync_bn(cfg.trainer.sync_bn, dist_info.world_size, classifier):
        classifier = to_sync_batchnorm(classifier)
    lr = recipe.peak_lr(plan.global_batch)
    optimizer = build_optimizer(classifier, str(cfg.model), recipe, lr)
    trainer = Trainer(classifier, optimizer, dist_info, amp=cfg.trainer.amp, accum=int(cfg.trainer.accum_steps),
                      clip_grad=None, skip_nonfinite=bool(cfg.trainer.skip_nonfinite))
    schedule = FinetuneSchedule(optimizer, lr, recipe.warmup_epochs * plan.steps_per_epoch, plan.total_steps)
    return ClassifierTraining(classifier, ema, trainer, schedule, build_mixup(recipe, num_classes),
                              build_loss(recipe))


def finetune_plan(cfg: DictConfig, train_images: int, world_size: int, recipe: FinetuneRecipe) -> StepPlan:
    """SparK's epoch: its samplers' count of images (``items_per_rank``: repeated augmentation keeps a multiple of
    256) in batches of ``trainer.batch_size``, the partial last batch kept (``main.py`` takes ``iters_train`` from a
    loader without ``drop_last``). With ``trainer.accum_steps`` > 1 (SparK has none) only whole steps."""
    per_rank = items_per_rank(train_images, world_size, recipe.repeated_aug)
    return plan_steps(cfg.trainer, train_images, world_size, recipe.epochs, per_rank=per_rank,
                      keep_partial_batch=True)


def _build(cfg: DictConfig, dist_info: DistInfo, lock: RunLock | None = None) -> FinetuneRun:
    """Everything at step 0: data, then the classifier (with ``init``'s weights), EMA, optimizer, schedule."""
    if cfg.trainer.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    torch.manual_seed(cfg.seed * 1000 + dist_info.rank)
    recipe = resolve_recipe(cfg)
    layout = check_labelled_root(cfg.data.root, cfg.data.val_fraction)
    train_set, val_set, classes = labelled_splits(layout, train_transform(cfg.image_size),
                                                  eval_transform(cfg.image_size), cfg.seed)
    plan = finetune_plan(cfg, len(train_set), dist_info.world_size, recipe)
    parts = build_classifier_training(cfg, recipe, len(classes), plan, dist_info)
    return FinetuneRun(cfg=cfg, dist=dist_info, run_dir=Path(cfg.run_dir), trainer=parts.trainer,
                       tally=Tally(plan.global_batch), total_steps=plan.total_steps,
                       steps_per_epoch=plan.steps_per_epoch, lock=lock, recipe=recipe, classes=classes,
                       classifier=parts.classifier, ema=parts.ema, train_set=SeededItems(train_set, cfg.seed),
                       val_set=val_set, schedule=parts.schedule, mixup=parts.mixup, criterion=parts.criterion)


def _restore(run: FinetuneRun) -> None:
    """Continue from a checkpoint: the classifier, optimizer, scaler, step, RNG, log window, EMA and best so far."""
    restored = restore_or_warn(run, KIND, run.model_name)
    if restored is None:
        return
    # The EMA is saved as the bare model's state dict and loaded into the bare model (not into timm's wrapper,
    # whose keys carry a ``module.`` prefix): the mismatch that stops SparK's fine-tunes from resuming.
    run.ema.module.load_state_dict(restored.extra["ema"])
    run.best = Best(**restored.extra["best"])


def _start(run: FinetuneRun) -> None:
    """Wrap for DDP, open the log where the run starts (removing what it will write again)."""
    run.trainer.wrap_ddp()
    open_logger(run, "finetune")
    if run.dist.is_main:
        log.info("fine-tuning %s on %d classes: %d training / %d validation images, %d steps of %d images, lr %.3g",
                 run.model_name, len(run.classes), len(run.train_set), len(run.val_set), run.total_steps,
                 run.tally.images_per_step, run.schedule.peak_lr)
    run.summary = {"run_dir": str(run.run_dir), "total_steps": run.total_steps, "start_step": run.start_step,
                   "classes": len(run.classes)}


def _loader(run: FinetuneRun, epoch: int, start: int) -> DataLoader:
    cfg = run.cfg
    sampler = ResumableSampler(len(run.train_set), cfg.seed, epoch, run.dist.rank, run.dist.world_size, start,
                               repeats=run.recipe.repeated_aug)
    # An explicit generator: creating the iterator must not draw from the global RNG (drop path draws from it).
    # SparK keeps the partial last batch (an odd one gets sample 0 prepended by the mixer); with accumulation the
    # epoch keeps whole steps only (finetune_plan)
    return DataLoader(run.train_set, batch_size=cfg.trainer.batch_size, sampler=sampler,
                      drop_last=int(cfg.trainer.accum_steps) > 1,
                      num_workers=cfg.data.num_workers, pin_memory=torch.cuda.is_available(),
                      generator=torch.Generator().manual_seed(cfg.seed * 7919 + epoch))


def _next_batches(run: FinetuneRun, step: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The ``accum`` micro-batches ``(images (B, 3, H, W), labels (B,))`` of ``step``, on the device."""
    memory_format = torch.channels_last if run.cfg.trainer.channels_last else torch.contiguous_format
    for images, labels in next_batches(run, step, lambda epoch, start: _loader(run, epoch, start)):
        yield images.to(run.dist.device, memory_format=memory_format, non_blocking=True), labels.to(run.dist.device)


def _train_step(run: FinetuneRun, step: int, batches: Iterable) -> dict | None:
    """One optimizer step on mixed micro-batches, then the EMA update.

    Returns:
        loss, lr, grad_norm and epoch; None when a non-finite loss skipped the step (``trainer.skip_nonfinite``).
    """
    lr = run.schedule.step(step)
    seed, rank = run.cfg.seed, run.dist.rank

    def loss_of(model, micro: int, batch) -> torch.Tensor:
        images, labels = batch
        with _numpy_seeded(((seed * 1_000_003 + step) * 101 + micro) * 1009 + rank):
            images, targets, _ = run.mixup(images, labels)
        return run.criterion(model(images), targets)

    metrics = run.trainer.step(step, batches, loss_of, where=str(run.latest))
    if metrics is None:
        return None
    run.ema.update(run.classifier)
    return {**metrics, "lr": lr, "epoch": step // run.steps_per_epoch}


@torch.no_grad()
def evaluate(model: nn.Module, dataset: Dataset, batch_size: int, device: torch.device, num_classes: int,
             channels_last: bool = True) -> dict:
    """Top-1 / top-5 accuracy (%) and the mean cross-entropy of ``model`` (eval mode) on ``dataset``, with the
    confusion matrix ``(C, C)``."""
    was_training = model.training
    model.eval()
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=0,
                        generator=torch.Generator().manual_seed(0))
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    correct, loss, count = {1: 0, 5: 0}, 0.0, 0
    matrix = torch.zeros(num_classes, num_classes, dtype=torch.long)
    for images, labels in loader:
        logits = model(images.to(device, memory_format=memory_format)).float().cpu()
        for k, hits in topk_correct(logits, labels).items():
            correct[k] += hits
        loss += nn.functional.cross_entropy(logits, labels, reduction="sum").item()
        matrix += confusion_matrix(logits.argmax(dim=1), labels, num_classes)
        count += len(labels)
    model.train(was_training)
    return {"top1": 100 * correct[1] / count, "top5": 100 * correct[5] / count, "loss": loss / count,
            "confusion": matrix}


# --- periodic actions, after every step, in this order -----------------------------------------------------------
def _tally(run: FinetuneRun, metrics: dict | None) -> None:
    tally_step(run, metrics, best=f"{run.best.top1:.1f}")


def _log_metrics(run: FinetuneRun, metrics: dict | None) -> None:
    log_when_due(run, metrics, ("lr", "grad_norm", "img_per_s", "epoch"))


def _evaluate_when_due(run: FinetuneRun, metrics: dict | None) -> None:
    """At the end of every ``trainer.eval_every`` epochs and at the last step: the model and its EMA on the
    validation images (rank 0); the better of the two, if the best so far, is saved as ``best.pt``."""
    every = run.cfg.trainer.eval_every * run.steps_per_epoch
    if not (run.step % every == 0 or run.step == run.total_steps) or not run.dist.is_main:
        return
    args = (run.val_set, int(run.cfg.trainer.eval_batch_size), run.dist.device, len(run.classes),
            bool(run.cfg.trainer.channels_last))
    results = {"model": evaluate(run.classifier, *args), "ema": evaluate(run.ema.module, *args)}
    record = {f"{source}_{key}": value for source, result in results.items() for key, value in result.items()
              if key != "confusion"}
    for source, result in results.items():
        if result["top1"] > run.best.top1:
            run.best = Best(result["top1"], result["top5"], source, run.step)
            weights = (run.classifier if source == "model" else run.ema.module).state_dict()
            save_atomic({"model": weights, "classes": run.classes, "model_name": run.model_name,
                         "top1": result["top1"], "source": source, "step": run.step},
                        run.run_dir / "checkpoints" / "best.pt")
    record.update(best_top1=run.best.top1, epoch=(run.step - 1) // run.steps_per_epoch + 1)
    run.logger.log(record, step=run.step)
    log.info("step %d: top-1 %.2f %% (EMA %.2f %%), best %.2f %% (%s at step %d)", run.step,
             results["model"]["top1"], results["ema"]["top1"], run.best.top1, run.best.source, run.best.step)


def _checkpoint_when_due(run: FinetuneRun, metrics: dict | None) -> None:
    every = run.cfg.trainer.ckpt_every
    epoch_end = run.step % run.steps_per_epoch == 0
    if ((every and run.step % every == 0) or epoch_end) and run.step != run.total_steps:
        _checkpoint(run)


# Evaluation before the checkpoint: checkpoint k holds the best-so-far that includes the evaluation at step k, and
# the log lines up to k are on disk before it.
PERIODIC_ACTIONS = (_tally, _log_metrics, _evaluate_when_due, _checkpoint_when_due)


def _checkpoint(run: FinetuneRun) -> Path | None:
    return checkpoint_run(run, KIND, run.model_name,
                          extra={"ema": run.ema.module.state_dict(), "best": vars(run.best).copy()})


def _finish(run: FinetuneRun, stopped_by: str | None) -> dict:
    """The summary; after the last step also the last checkpoint, the best classifier exported for timm and
    torchvision, its per-class accuracy table and confusion matrix."""
    summary = run.summary
    summary.update(step=run.step, best_top1=run.best.top1, best_top5=run.best.top5, best_source=run.best.source,
                   best_step=run.best.step)
    if stopped_by is not None:
        summary["stopped_by"] = stopped_by
        if run.logger is not None:
            run.logger.close()
        return summary
    summary.update(first_losses=run.tally.first_losses, last_losses=list(run.tally.last_losses))
    _checkpoint(run)
    if run.dist.is_main:
        summary.update(_export_best(run))
        run.logger.close()
    return summary


def _export_best(run: FinetuneRun) -> dict:
    """The best weights as a plain state dict (``strict=True`` into timm's model, and torchvision's for ResNets),
    the per-class accuracy table and the confusion matrix of those weights."""
    best = read_torch_file(run.run_dir / "checkpoints" / "best.pt", "best classifier")
    out = {}
    for fmt in run.cfg.export_formats:
        path = save_atomic(best["model"], run.run_dir / "export" / f"{run.model_name}_finetuned_{fmt}.pt")
        out[f"export_{fmt}"] = str(path)
    model = run.ema.module if best["source"] == "ema" else run.classifier
    state = {k: v.clone() for k, v in model.state_dict().items()}
    model.load_state_dict(best["model"])
    result = evaluate(model, run.val_set, int(run.cfg.trainer.eval_batch_size), run.dist.device, len(run.classes),
                      bool(run.cfg.trainer.channels_last))
    model.load_state_dict(state)
    table = per_class_table(result["confusion"], run.classes)
    (run.run_dir / "per_class_accuracy.txt").write_text(table)
    (run.run_dir / "classes.json").write_text(json.dumps(run.classes))
    png = save_confusion_png(result["confusion"], run.classes, run.run_dir / "confusion_matrix.png",
                             f"{run.model_name}: top-1 {result['top1']:.2f} % ({best['source']}, step {best['step']})")
    log.info("best classifier (%s, step %d): top-1 %.2f %%\n%s", best["source"], best["step"], result["top1"], table)
    return {**out, "per_class_accuracy": str(run.run_dir / "per_class_accuracy.txt"), "confusion_matrix": str(png)}
