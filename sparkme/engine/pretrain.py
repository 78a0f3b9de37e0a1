"""The pretraining loop: ``pretrain(cfg)`` is plain Python, callable from tests, notebooks and the hydra CLI."""

from __future__ import annotations

import contextlib
import logging
import signal
import time
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
from sparkme.engine.distributed import cleanup_distributed, setup_distributed
from sparkme.engine.logging import MetricsLogger
from sparkme.engine.schedule import SparkSchedule
from sparkme.export import export_state_dict
from sparkme.models.weights import load_init_weights
from sparkme.visualize import save_reconstruction_grid

log = logging.getLogger(__name__)
AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class StopRequest:
    """Set by SIGTERM/SIGINT (how SLURM pre-empts a job); the loop checkpoints and exits at the next step."""

    def __init__(self):
        self.signal_name: str | None = None

    def __call__(self, signum, frame):
        self.signal_name = signal.Signals(signum).name


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


def pretrain(cfg: DictConfig) -> dict:
    """Run SparK pretraining as configured; returns a summary (losses, steps, paths)."""
    check_config(cfg)  # user errors at start-up, before anything heavy
    dist_info = setup_distributed(cfg.trainer.device)
    try:
        return _pretrain(cfg, dist_info)
    finally:
        cleanup_distributed()


def _check_writable(run_dir: Path) -> None:
    """Fail at start-up, not at the first checkpoint hours later, when the run folder cannot be written."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / ".write_probe"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as error:
        raise OSError(f"run_dir {str(run_dir)!r} is not writable ({error.strerror}); choose another with "
                      "run_dir=... or hydra.run.dir=...") from error


def _pretrain(cfg: DictConfig, dist_info) -> dict:
    device, rank, world = dist_info.device, dist_info.rank, dist_info.world_size
    run_dir = Path(cfg.run_dir)
    if dist_info.is_main:
        _check_writable(run_dir)
    ckpt_dir = run_dir / "checkpoints"
    if cfg.trainer.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    torch.manual_seed(cfg.seed * 1000 + rank)

    model = instantiate(cfg.model).to(device)
    if cfg.trainer.sync_bn and world > 1:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
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
    amp_dtype = AMP_DTYPES.get(cfg.trainer.amp)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.trainer.amp == "fp16")

    start_step, wandb_id = 0, None
    latest = ckpt_dir / LATEST
    resume_path = latest if cfg.resume == "auto" and latest.exists() else (None if cfg.resume in (None, "auto")
                                                                           else Path(cfg.resume))
    if resume_path is not None:
        state = load_checkpoint(resume_path)
        check_compatible(state["model"], model.state_dict(), str(resume_path))
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        start_step, wandb_id = int(state["step"]), state.get("wandb_id")
        torch.set_rng_state(state["rng"][rank] if rank < len(state["rng"]) else state["rng"][0])
        if rank == 0:
            log.info("resumed from %s at step %d", resume_path, start_step)
    elif cfg.init:
        load_init_weights(model, cfg.init)

    core = model
    if world > 1:
        model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    logger = None
    if dist_info.is_main:
        logger = MetricsLogger(run_dir, cfg.logger.wandb_mode, cfg.logger.project, cfg.name,
                               OmegaConf.to_container(cfg, resolve=True), resume_id=wandb_id)
    fixed_images, fixed_masks = _fixed_batch(cfg, core, device, int(cfg.trainer.eval_images))
    summary = {"run_dir": str(run_dir), "total_steps": total_steps, "start_step": start_step}
    if dist_info.is_main and start_step == 0:
        summary["holdout_loss_initial"] = evaluate_loss(core, fixed_images, fixed_masks, batch)
        logger.log({"holdout_loss": summary["holdout_loss_initial"]}, step=0)

    def checkpoint(step: int) -> Path | None:
        rng_states = [torch.get_rng_state()]
        if world > 1:
            rng_states = [torch.empty_like(rng_states[0]) for _ in range(world)]
            torch.distributed.all_gather_object(rng_states, torch.get_rng_state())
        if not dist_info.is_main:
            return None
        state = {"model": core.state_dict(), "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
                 "step": step, "rng": rng_states, "config": OmegaConf.to_container(cfg, resolve=True),
                 "wandb_id": logger.run_id}
        path = save_atomic(state, latest)
        if cfg.trainer.keep_every and step % cfg.trainer.keep_every == 0:
            save_atomic(state, ckpt_dir / f"step_{step:07d}.pt")
        return path

    stop = StopRequest()
    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    losses, window, started, seen = [], [], time.time(), 0
    progress = tqdm(total=total_steps, initial=start_step, disable=not dist_info.is_main or not cfg.trainer.progress,
                    dynamic_ncols=True, desc="pretrain")
    loader_iter, loader_epoch = None, None
    try:
        for step in range(start_step, total_steps):
            epoch, within = divmod(step, steps_per_epoch)
            if loader_epoch != epoch:
                loader_iter = iter(_loader(dataset, cfg, epoch, within * batch * accum, rank, world))
                loader_epoch = epoch
            current_lr, current_wd = schedule.step(step)
            step_loss = 0.0
            for micro in range(accum):
                images = next(loader_iter).to(device, non_blocking=True)
                mask = core.sample_mask(images, _mask_generator(cfg.seed, step, micro, rank, device))
                sync = contextlib.nullcontext() if micro == accum - 1 or world == 1 else model.no_sync()
                with sync, torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
                    loss = model(images, mask)
                    scaler.scale(loss / accum).backward()
                step_loss += loss.item() / accum
            if not torch.isfinite(torch.tensor(step_loss)):
                if cfg.trainer.skip_nonfinite:
                    log.warning("non-finite loss %s at step %d: step skipped", step_loss, step)
                    optimizer.zero_grad(set_to_none=True)
                    continue
                raise FloatingPointError(
                    f"non-finite loss {step_loss} at step {step}; the last good checkpoint is {latest} "
                    "(set trainer.skip_nonfinite=true to skip such steps, or lower optim.base_lr)")
            scaler.unscale_(optimizer)
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.trainer.clip_grad or float("inf"))
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            losses.append(step_loss)
            window.append(step_loss)
            seen += global_batch
            done = step + 1
            if dist_info.is_main:
                speed = seen / max(time.time() - started, 1e-9)
                progress.set_postfix(loss=f"{step_loss:.4f}", lr=f"{current_lr:.2e}", img_s=f"{speed:.1f}")
                progress.update(1)
                if done % cfg.trainer.log_every == 0 or done == total_steps:
                    logger.log({"loss": sum(window) / len(window), "lr": current_lr, "wd": current_wd,
                                "grad_norm": float(grad_norm), "img_per_s": speed, "epoch": epoch}, step=done)
                    window = []
                if cfg.trainer.vis_every and (done % cfg.trainer.vis_every == 0 or done == total_steps):
                    path = save_reconstruction_grid(core, fixed_images[:cfg.trainer.vis_images],
                                                    fixed_masks[:cfg.trainer.vis_images],
                                                    run_dir / "reconstructions" / f"step_{done:07d}.png")
                    logger.log_image("reconstruction", path, step=done, caption="original | masked | reconstruction")
            if cfg.trainer.ckpt_every and done % cfg.trainer.ckpt_every == 0 and done != total_steps:
                checkpoint(done)
            if cfg.trainer.stop_at_step and done == cfg.trainer.stop_at_step and done != total_steps:
                stop.signal_name = "trainer.stop_at_step"
            if stop.signal_name is not None:
                path = checkpoint(done)
                if dist_info.is_main:
                    log.warning("received %s: saved %s at step %d; continue with the same command plus "
                                "resume=auto", stop.signal_name, path, done)
                summary.update(stopped_by=stop.signal_name, step=done)
                return summary
        final_step = total_steps
        checkpoint(final_step)
    finally:
        progress.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    summary.update(step=final_step, first_losses=losses[:10], last_losses=losses[-10:])
    if world > 1:
        summary["weights_identical_across_ranks"] = _same_weights_on_all_ranks(core)
    if dist_info.is_main:
        summary["holdout_loss_final"] = evaluate_loss(core, fixed_images, fixed_masks, batch)
        logger.log({"holdout_loss": summary["holdout_loss_final"]}, step=final_step)
        export_dir = run_dir / "export"
        for fmt in cfg.export_formats:
            path = export_dir / f"{cfg.model.model_name}_{fmt}.pt"
            save_atomic(export_state_dict(core.encoder, cfg.model.model_name, fmt), path)
            summary[f"export_{fmt}"] = str(path)
        logger.close()
    return summary
