"""Export a pretrained sparse encoder as a dense torchvision / timm state dict.

    sparkme-export ckpt=runs/demo/checkpoints/latest.pt format=torchvision out=resnet18_spark.pt

``format=torchvision``: loads with ``strict=True`` into ``torchvision.models.<name>()`` (ResNets; the classifier is
the untrained original). ``format=timm``: the classifier head is excluded; loads with ``strict=True`` into
``timm.create_model(<name>, num_classes=0)``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torchvision
from hydra.utils import instantiate
from omegaconf import OmegaConf

from sparkme.engine.checkpoint import load_checkpoint, save_atomic
from sparkme.models.backbones import TORCHVISION_RESNETS
from sparkme.models.encoder import SparseEncoder

FORMATS = ("torchvision", "timm")
HEAD_PREFIXES = ("fc.", "head.fc.")


def export_state_dict(encoder: SparseEncoder, model_name: str, fmt: str) -> dict[str, torch.Tensor]:
    """Dense state dict of ``encoder`` in ``fmt`` (see module docstring), verified by a strict load."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    state = encoder.to_dense().state_dict()
    if fmt == "torchvision":
        if model_name not in TORCHVISION_RESNETS:
            raise ValueError(f"format=torchvision supports {', '.join(TORCHVISION_RESNETS)}; use format=timm "
                             f"for {model_name!r}")
        getattr(torchvision.models, model_name)().load_state_dict(state, strict=True)
        return state
    import timm

    state = {k: v for k, v in state.items() if not k.startswith(HEAD_PREFIXES)}
    timm.create_model(model_name, num_classes=0).load_state_dict(state, strict=True)
    return state


def encoder_from_checkpoint(path: str | Path) -> tuple[SparseEncoder, str]:
    """Rebuild the SparK model recorded in a pretraining checkpoint (on the ``torch`` backend: nothing compiled
    is needed to export) and return its encoder and backbone name."""
    state = load_checkpoint(path)
    cfg = OmegaConf.create(state["config"])
    model_cfg = OmegaConf.to_container(cfg.model, resolve=False)
    model_cfg.update(backend="torch", mask_ratio=0.6)
    model = instantiate(OmegaConf.create(model_cfg))
    model.load_state_dict(state["model"], strict=True)
    return model.encoder, model_cfg["model_name"]


def main(argv: list[str] | None = None) -> int:
    args = OmegaConf.from_dotlist(sys.argv[1:] if argv is None else argv)
    for key in ("ckpt", "out"):
        if key not in args:
            print(f"sparkme-export: missing {key}=...; usage: sparkme-export ckpt=PATH format=torchvision|timm "
                  "out=PATH", file=sys.stderr)
            return 2
    fmt = args.get("format", "timm")
    encoder, name = encoder_from_checkpoint(args.ckpt)
    save_atomic(export_state_dict(encoder, name, fmt), args.out)
    print(f"exported {name} ({fmt} format) to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
