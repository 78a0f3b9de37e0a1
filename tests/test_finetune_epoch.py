"""The fine-tune's epoch, CutMix box and SyncBatchNorm against SparK's ``downstream_imagenet``, restated.

SparK's rules (``data.py``, ``main.py``, ``mixup.py``, ``arg.py``, ``util.py``):

- ``create_classification_dataset``: without repeated augmentation the sampler is torch's
  ``DistributedSampler(shuffle=True, drop_last=True)``, with it timm's ``RepeatAugSampler(num_repeats=rep_aug)``;
  the ``DataLoader`` has no ``drop_last`` (the partial last batch is trained on), and ``main.py`` takes
  ``iters_train = len(loader_train)`` for the epoch and the lr / wd schedule.
- ``BatchMixup.__call__``: an odd batch gets sample 0 prepended before mixing (mixing on or off).
- ``rand_bbox``: ``cut = int(side * sqrt(1 - lam))``, centre uniform in ``[0, side)``, the box
  ``[clip(c - cut // 2), clip(c + cut // 2))``; lambda corrected to the box's area.
- ``arg.py``: ``sbn = True``; ``create_model_opt`` converts to SyncBatchNorm after making the EMA.

The samplers are torch's and timm's own classes, counted here as SparK's loader counts them.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import timm
import torch
from hydra import compose, initialize_config_dir
from timm.data.distributed_sampler import RepeatAugSampler
from torch.utils.data import DataLoader, DistributedSampler

from sparkme.data.sampling import ResumableSampler, SeededItems, items_per_rank
from sparkme.engine.distributed import DistInfo
from sparkme.errors import UsageError
from sparkme.finetune import loop
from sparkme.finetune.cli import FINETUNE_CONFIG_DIR
from sparkme.finetune.mixing import build_mixup, spark_cutmix_box
from sparkme.finetune.recipes import recipe_for
from sparkme.finetune.sync_bn import use_sync_bn


class Indices(torch.utils.data.Dataset):
    """Item i is ``(i, 0)``: the loader's batches show which images an epoch holds."""

    def __init__(self, length: int):
        self.length = length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int):
        return index, 0


def spark_epoch(images: int, batch: int, world: int, rep_aug: int) -> tuple[int, int]:
    """``(iters_train, samples per rank)`` of SparK's training loader on rank 0."""
    dataset = Indices(images)
    if rep_aug:
        sampler = RepeatAugSampler(dataset, num_replicas=world, rank=0, shuffle=True, num_repeats=rep_aug)
    else:
        sampler = DistributedSampler(dataset, num_replicas=world, rank=0, shuffle=True, drop_last=True)
    loader = DataLoader(dataset, batch_size=batch, sampler=sampler)
    return len(loader), sum(len(indices) for indices, _ in loader)


def _config(overrides: list[str]):
    with initialize_config_dir(config_dir=str(FINETUNE_CONFIG_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


def sparkme_epoch(images: int, batch: int, world: int, model: str) -> tuple[int, int, int]:
    """``(steps per epoch, samples rank 0's loader yields, the last batch's size)`` of sparkme's fine-tune."""
    cfg = _config([f"model={model}", f"trainer.batch_size={batch}", "data.num_workers=0"])
    recipe = recipe_for(model)
    plan = loop.finetune_plan(cfg, images, world, recipe)
    run = SimpleNamespace(cfg=cfg, recipe=recipe, train_set=SeededItems(Indices(images), 0),
                          dist=DistInfo(rank=0, world_size=world))
    sizes = [len(indices) for indices, _ in loop._loader(run, epoch=0, start=0)]
    assert len(sizes) == plan.steps_per_epoch
    return plan.steps_per_epoch, sum(sizes), sizes[-1]


@pytest.mark.parametrize("model,rep_aug,world,expected", [
    ("resnet50", 0, 1, (10, 600)),        # the partial last batch of 24 is kept
    ("convnext_small", 3, 1, (8, 512)),   # RepeatAugSampler keeps 600 // 256 * 256 images
    ("resnet50", 0, 2, (5, 300)),
    ("convnext_small", 3, 2, (4, 256)),
])
def test_an_epoch_has_sparks_iterations_and_samples(model, rep_aug, world, expected):
    assert recipe_for(model).repeated_aug == max(rep_aug, 1)
    assert spark_epoch(600, 64, world, rep_aug) == expected
    steps, samples, last = sparkme_epoch(600, 64, world, model)
    assert (steps, samples) == expected
    assert last == expected[1] - (expected[0] - 1) * 64


@pytest.mark.parametrize("images,world", [(100, 1), (100, 3), (255, 2), (257, 1), (1000, 3), (7, 2)])
def test_repeated_augmentation_takes_the_images_timm_s_sampler_takes(images, world):
    """The same positions of the repeated permutation as timm's sampler, rank by rank (timm's without shuffling
    names positions; sparkme's permutation maps them to images)."""
    for rank in range(world):
        timm_positions = list(RepeatAugSampler(Indices(images), num_replicas=world, rank=rank, shuffle=False,
                                               num_repeats=3))
        sampler = ResumableSampler(images, seed=4, epoch=2, rank=rank, world_size=world, repeats=3)
        order = torch.randperm(images, generator=torch.Generator().manual_seed(4 * 10_007 + 2)).tolist()
        assert [index for _, index in sampler] == [order[position] for position in timm_positions]
        assert len(sampler) == items_per_rank(images, world, 3) == len(timm_positions)
        resumed = ResumableSampler(images, seed=4, epoch=2, rank=rank, world_size=world, start=5, repeats=3)
        assert list(resumed) == list(sampler)[5:]


def test_accumulation_keeps_whole_steps_only():
    cfg = _config(["model=resnet50", "trainer.batch_size=16", "trainer.accum_steps=2"])
    assert loop.finetune_plan(cfg, 600, 1, recipe_for("resnet50")).steps_per_epoch == 600 // 32


@pytest.mark.parametrize("batch", [7, 8])
def test_the_partial_last_batch_is_mixed_as_spark_mixes_it(batch):
    """A partial last batch of odd size gets sample 0 prepended (SparK's ``BatchMixup``), an even one is mixed as
    it is; mixing switched off (mixup 0) prepends too."""
    for mixup in (0.1, 0.0):
        recipe = recipe_for("resnet50")
        mixer = build_mixup(type(recipe)(**{**vars(recipe), "mixup": mixup}), 5)
        images, labels = torch.randn(batch, 3, 8, 8), torch.arange(batch) % 5
        np.random.seed(0)
        out, targets, out_labels = mixer(images.clone(), labels)
        expected_labels = torch.cat((labels[:1], labels)) if batch % 2 else labels
        assert torch.equal(out_labels, expected_labels) and len(out) == len(targets) == batch + batch % 2
        if mixup == 0.0:
            assert torch.equal(out, torch.cat((images[:1], images)) if batch % 2 else images)


def spark_box(height: int, width: int, lam: float, cy: int, cx: int) -> tuple[tuple[int, int, int, int], float]:
    """SparK's ``rand_bbox`` + ``cutmix_bbox_and_lam(correct_lam=True)`` for a given centre."""
    ratio = math.sqrt(1 - lam)
    cut_h, cut_w = int(height * ratio), int(width * ratio)
    top, bottom = min(max(cy - cut_h // 2, 0), height), min(max(cy + cut_h // 2, 0), height)
    left, right = min(max(cx - cut_w // 2, 0), width), min(max(cx + cut_w // 2, 0), width)
    return (top, bottom, left, right), 1 - (bottom - top) * (right - left) / (height * width)


def test_the_cutmix_box_is_sparks():
    rng = np.random.default_rng(0)
    odd_cuts = 0
    for seed in range(200):
        height, width = (int(v) for v in rng.integers(8, 64, size=2))
        lam = float(rng.uniform(0.01, 0.99))
        np.random.seed(seed)
        cy, cx = np.random.randint(0, height), np.random.randint(0, width)  # drawn as SparK draws them
        np.random.seed(seed)
        box, corrected = spark_cutmix_box((2, 3, height, width), lam)
        expected_box, expected_lam = spark_box(height, width, lam, cy, cx)
        assert box == expected_box and corrected == pytest.approx(expected_lam, abs=1e-12)
        odd_cuts += int(height * math.sqrt(1 - lam)) % 2
    assert odd_cuts > 50  # the cases where timm 1.0's box ((cut + 1) // 2 after the centre) is 1 px larger


def test_sync_batchnorm_is_sparks_default_for_batchnorm_models_with_several_processes():
    assert _config([]).trainer.sync_bn is None
    with torch.device("meta"):
        resnet, convnext = timm.create_model("resnet18"), timm.create_model("convnext_atto")
    assert use_sync_bn(None, 2, resnet) and use_sync_bn(True, 2, resnet)
    assert not use_sync_bn(None, 1, resnet)        # one process: nothing to share
    assert not use_sync_bn(False, 8, resnet)       # the opt-out
    assert not use_sync_bn(None, 8, convnext)      # LayerNorm only: nothing to convert
    with pytest.raises(UsageError, match="trainer.sync_bn must be null"):
        use_sync_bn("yes", 2, resnet)


@pytest.mark.slow
def test_a_resume_across_a_partial_last_batch_gives_the_uninterrupted_run(tmp_path):
    """64 images at batch 6: epochs of 10 full batches and one of 4 (an even partial batch) — stopped in the second
    epoch and resumed, the weights, EMA and log equal the run that was never stopped."""
    import json

    from test_finetune import TINY, _compose, make_labelled_folder

    from sparkme.engine.checkpoint import load_checkpoint

    data = make_labelled_folder(tmp_path / "data", per_class=(16, 2), size=32)
    args = [*TINY, f"data.root={data}", "image_size=32", "trainer.batch_size=6", "trainer.max_steps=13",
            "export_formats=[]"]
    whole = loop.finetune(_compose(args, tmp_path / "whole"))
    assert whole["total_steps"] == 13 and loop.finetune_plan(_compose(args, tmp_path), 64, 1,
                                                             recipe_for("resnet18")).steps_per_epoch == 11
    loop.finetune(_compose([*args, "trainer.stop_at_step=12"], tmp_path / "split"))
    loop.finetune(_compose([*args, "resume=auto"], tmp_path / "split"))
    final = {name: load_checkpoint(tmp_path / name / "checkpoints" / "latest.pt") for name in ("whole", "split")}
    for part in (final["whole"]["model"], final["whole"]["extra"]["ema"]):
        other = final["split"]["model"] if part is final["whole"]["model"] else final["split"]["extra"]["ema"]
        assert all(torch.equal(part[k], other[k]) for k in part)
    lines = [[{k: v for k, v in json.loads(line).items() if k != "img_per_s"}
              for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()] for name in ("whole", "split")]
    assert lines[0] == lines[1]
