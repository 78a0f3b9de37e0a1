"""The training core shared by pretraining and fine-tuning: a non-finite step is skipped by every rank or by none."""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from sparkme.engine.core import Tally, Trainer
from sparkme.engine.distributed import DistInfo


def _tiny_model() -> nn.Module:
    torch.manual_seed(0)  # the same initial weights on every rank
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 1))


def _two_steps(rank: int, world: int, init_file: str, results: dict) -> None:
    """Step 0: rank 1's batch holds a NaN. Step 1: every batch is finite."""
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        model = _tiny_model()
        trainer = Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), DistInfo(rank, world, rank),
                          skip_nonfinite=True)
        trainer.wrap_ddp()
        initial = {k: v.clone() for k, v in model.state_dict().items()}
        generator = torch.Generator().manual_seed(rank)
        batches = [torch.randn(6, 4, generator=generator) for _ in range(2)]
        if rank == 1:
            batches[0][2, 1] = float("nan")
        loss_of = lambda ddp_model, micro, x: ddp_model(x).pow(2).mean()  # noqa: E731
        skipped = trainer.step(0, [batches[0]], loss_of)
        after_skip = {k: v.clone() for k, v in model.state_dict().items()}
        stepped = trainer.step(1, [batches[1]], loss_of)
        results[rank] = {
            "skipped": skipped is None,
            "untouched": all(torch.equal(initial[k], after_skip[k]) for k in initial),
            "stepped": stepped is not None and math.isfinite(stepped["loss"]),
            "weights": [p.detach().clone() for p in model.parameters()],
        }
    finally:
        dist.destroy_process_group()


def test_a_non_finite_loss_on_one_rank_is_skipped_by_every_rank(tmp_path):
    results = mp.Manager().dict()
    mp.spawn(_two_steps, args=(2, str(tmp_path / "rendezvous"), results), nprocs=2, join=True)
    for rank in (0, 1):
        assert results[rank]["skipped"], f"rank {rank} took the step whose gradients were NaN"
        assert results[rank]["untouched"], f"rank {rank}'s weights or BatchNorm buffers changed on a skipped step"
        assert results[rank]["stepped"]
    assert all(torch.equal(a, b) for a, b in zip(results[0]["weights"], results[1]["weights"], strict=True))
    assert all(torch.isfinite(p).all() for p in results[0]["weights"])


def test_without_skip_a_non_finite_loss_stops_with_the_checkpoint_named():
    model = _tiny_model()
    trainer = Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), DistInfo())
    with pytest.raises(FloatingPointError, match="non-finite loss nan at step 3; the last good checkpoint is x.pt"):
        trainer.step(3, [torch.full((4, 4), float("nan"))], lambda m, i, x: m(x).mean(), where="x.pt")


def test_accumulation_averages_the_micro_batch_losses():
    model = _tiny_model()
    trainer = Trainer(model, torch.optim.SGD(model.parameters(), lr=0.0), DistInfo(), accum=2)
    batches = [torch.ones(4, 4), 3 * torch.ones(4, 4)]
    losses = [nn.Sequential(*model)(x).pow(2).mean().item() for x in batches]
    metrics = trainer.step(0, batches, lambda m, i, x: m(x).pow(2).mean())
    assert metrics["loss"] == pytest.approx(sum(losses) / 2, rel=1e-6)


def test_tally_window_restarts_after_each_log_line():
    tally = Tally(images_per_step=8)
    for loss in (1.0, 2.0, 3.0):
        tally.add(loss)
    assert tally.window_mean() == 2.0 and tally.window == [] and tally.seen == 24
