"""Process-group set-up from torchrun's environment (gloo on CPU, NCCL on GPU)."""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import timm.layers
import torch
import torch.distributed as dist

DEVICE_CHOICES = ("auto", "cpu", "cuda")  # trainer.device


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_distributed(device: str = "auto", timeout_s: int = 600) -> DistInfo:
    """Initialise the process group when launched by torchrun (``WORLD_SIZE`` > 1), pick the device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device not in DEVICE_CHOICES:
        raise ValueError(f"trainer.device must be auto, cpu or cuda, got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("trainer.device=cuda but torch sees no GPU; use trainer.device=cpu")
    torch_device = torch.device("cuda", local_rank) if device == "cuda" else torch.device("cpu")
    if device == "cuda":
        torch.cuda.set_device(torch_device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device == "cuda" else "gloo", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=timeout_s))
    return DistInfo(rank, world, local_rank, torch_device)


def cleanup_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def broadcast_from_main(value, info: DistInfo):
    """``value`` as rank 0 has it, on every rank (returned unchanged in a single process)."""
    if info.world_size == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def to_sync_batchnorm(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` with every BatchNorm synchronised across processes (``trainer.sync_bn``). timm's converter keeps the
    activation of its fused ``BatchNormAct2d`` (RegNet, EfficientNet, DenseNet, CSP); torch's own would replace it
    by a plain ``SyncBatchNorm`` and silently drop the activation."""
    return timm.layers.convert_sync_batchnorm(model)
