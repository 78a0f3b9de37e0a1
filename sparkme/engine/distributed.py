"""Process-group set-up from torchrun's environment (gloo on CPU, NCCL on GPU)."""

from __future__ import annotations

import datetime
import functools
import os
from dataclasses import dataclass

import timm.layers
import torch
import torch.distributed as dist

from sparkme.errors import UsageError

DEVICE_CHOICES = ("auto", "cpu", "cuda")  # trainer.device; sparkme-bench --device also takes cuda:N


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def resolve_device(device: str | torch.device, setting: str = "trainer.device",
                   allow_index: bool = False) -> torch.device:
    """The device a setting names: ``auto`` (cuda when torch sees a GPU, else cpu), ``cpu``, ``cuda`` and, with
    ``allow_index``, ``cuda:N``.

    Raises:
        UsageError: naming ``setting``, the value and the choices, or that torch sees no such GPU.
    """
    text = str(device)
    name = ("cuda" if torch.cuda.is_available() else "cpu") if text == "auto" else text
    kind, _, index = name.partition(":")
    if kind not in DEVICE_CHOICES[1:] or (index and not (allow_index and kind == "cuda" and index.isdigit())):
        choices = "auto, cpu, cuda or cuda:N" if allow_index else "auto, cpu or cuda"
        raise UsageError(f"{setting} must be {choices}, got {text!r}")
    count = torch.cuda.device_count() if kind == "cuda" else 0
    if kind == "cuda" and int(index or 0) >= count:
        seen = f"only {count} GPU(s)" if count else "no GPU"
        raise UsageError(f"{setting}={text} but torch sees {seen}; use {setting}=cpu or auto")
    return torch.device(name)


def setup_distributed(device: str = "auto", timeout_s: int = 600) -> DistInfo:
    """Initialise the process group when launched by torchrun (``WORLD_SIZE`` > 1), pick the device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device).type
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


def align_grad_strides(module: torch.nn.Module) -> None:
    """Give each parameter's gradient the parameter's own strides where the two differ only on size-1 dimensions.

    A channels-last conv hands back a 1x1 kernel's weight gradient (ResNet ``[512, 256, 1, 1]``) or a depthwise one
    (ConvNeXt ``[320, 1, 7, 7]``) with the strides of channels-last: the same memory as the contiguous parameter, but
    DDP compares strides exactly, warns "Grad strides do not match bucket view strides" and copies through a strided
    view at every step. The hook re-labels the strides (a view: no copy, values untouched) before the gradient is
    accumulated, so it reaches DDP's bucket in the parameter's layout. Call before wrapping in DDP."""
    for param in module.parameters():
        if param.requires_grad and param.dim() > 1:
            param.register_hook(functools.partial(_as_param_strides, tuple(param.shape), param.stride()))


def _as_param_strides(shape: tuple[int, ...], strides: tuple[int, ...], grad: torch.Tensor) -> torch.Tensor | None:
    if grad.layout != torch.strided or grad.stride() == strides or tuple(grad.shape) != shape:
        return None  # None keeps the gradient as it is
    if any(have != want for have, want, size in zip(grad.stride(), strides, shape, strict=True) if size > 1):
        return None  # really another layout: autograd's layout contract copies it into the parameter's
    return grad.as_strided(shape, strides, grad.storage_offset())
