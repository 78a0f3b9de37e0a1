"""The fine-tuning step of ``sparkme-finetune`` against a plain timm training step of the same model, side by side.

The plain step is what timm's own ``train.py`` does per iteration: channels-last model, timm's optimizer (the
recipe's, with its settings, one parameter group per weight-decay setting), timm's ``Mixup``, the recipe's loss, the
``ModelEmaV3`` update, autocast when AMP is chosen. sparkme's step is the loop's own ``_train_step``: SparK's
layer-wise lr decay groups, the per-iteration schedule, the seeded mixer, the agreed non-finite check, the EMA.
Both train on the same random images and labels, alternating, so the machine's noise falls on both alike.
"""

from __future__ import annotations

import statistics
from pathlib import Path

import timm
import torch
from hydra import compose, initialize_config_dir
from timm.data import Mixup
from timm.optim import create_optimizer_v2
from timm.utils import ModelEmaV3

from sparkme.bench.timing import timed
from sparkme.engine.core import AMP_DTYPES, StepPlan, Tally
from sparkme.engine.distributed import DistInfo

CONFIG_DIR = Path(__file__).resolve().parent.parent / "conf" / "finetune"


def _plain_timm_step(model_name: str, recipe, num_classes: int, lr: float, amp: str | None, device: torch.device):
    """One iteration of a plain timm training loop, as a closure over its own model, optimizer, mixup and EMA."""
    from sparkme.finetune.mixing import build_loss
    from sparkme.finetune.optimizer import optimizer_settings

    model = timm.create_model(model_name, num_classes=num_classes, drop_path_rate=recipe.drop_path or None)
    model = model.to(device, memory_format=torch.channels_last)
    # the same optimizer and settings, without SparK's layer-wise groups
    optimizer = create_optimizer_v2(model, opt=recipe.optimizer, lr=lr, weight_decay=recipe.weight_decay,
                                    **optimizer_settings(recipe))
    mixup = Mixup(mixup_alpha=recipe.mixup, cutmix_alpha=recipe.cutmix, label_smoothing=recipe.label_smoothing,
                  num_classes=num_classes)
    criterion, ema = build_loss(recipe), ModelEmaV3(model, decay=recipe.ema_decay)
    dtype = AMP_DTYPES.get(amp)

    def step(images: torch.Tensor, labels: torch.Tensor) -> None:
        images, targets = mixup(images, labels)
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            loss = criterion(model(images), targets)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        ema.update(model)
        loss.item()  # timm's loop reads the loss for its log too

    return step


def compare_finetune_step(model_name: str, batch_size: int = 32, image_size: int = 224, repeats: int = 5,
                          warmup: int = 2, amp: str | None = None, device: str = "cpu",
                          num_classes: int = 1000) -> dict:
    """Median seconds of sparkme's fine-tuning step and of the plain timm step, and their ratio (> 1: sparkme is
    faster)."""
    from sparkme.finetune import loop
    from sparkme.finetune.checks import resolve_recipe

    torch_device = torch.device(device)
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[
            f"model={model_name}", f"image_size={image_size}", f"trainer.batch_size={batch_size}",
            "data.root=unused", f"trainer.amp={amp or 'null'}", "run_dir=unused"])
    recipe = resolve_recipe(cfg)
    plan = StepPlan(steps_per_epoch=10_000, total_steps=10_000, global_batch=batch_size)
    parts = loop.build_classifier_training(cfg, recipe, num_classes, plan, DistInfo(device=torch_device))
    run = loop.FinetuneRun(cfg=cfg, dist=DistInfo(device=torch_device), run_dir=Path("unused"), trainer=parts.trainer,
                           tally=Tally(batch_size), total_steps=plan.total_steps, steps_per_epoch=plan.steps_per_epoch,
                           recipe=recipe, classes=[str(i) for i in range(num_classes)], classifier=parts.classifier,
                           ema=parts.ema, train_set=None, val_set=None, schedule=parts.schedule, mixup=parts.mixup,
                           criterion=parts.criterion)
    plain = _plain_timm_step(model_name, recipe, num_classes, recipe.base_lr * batch_size / 256, amp, torch_device)
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(batch_size, 3, image_size, image_size, generator=generator).to(
        torch_device, memory_format=torch.channels_last)
    labels = torch.randint(0, num_classes, (batch_size,), generator=generator).to(torch_device)
    seconds = {"sparkme": [], "timm": []}
    for index in range(warmup + repeats):
        sparkme_s, _ = timed(lambda i=index: loop._train_step(run, i, [(images.clone(), labels)]), torch_device)
        timm_s, _ = timed(lambda: plain(images.clone(), labels), torch_device)
        if index >= warmup:
            seconds["sparkme"].append(sparkme_s)
            seconds["timm"].append(timm_s)
    sparkme_median, timm_median = (statistics.median(seconds[name]) for name in ("sparkme", "timm"))
    return {"model": model_name, "batch_size": batch_size, "image_size": image_size, "amp": amp,
            "sparkme_s": sparkme_median, "timm_s": timm_median, "ratio": timm_median / sparkme_median,
            "spread_sparkme_s": (min(seconds["sparkme"]), max(seconds["sparkme"])),
            "spread_timm_s": (min(seconds["timm"]), max(seconds["timm"]))}
