"""Export a pretrained sparse encoder as a dense torchvision / timm state dict, or in SparK's own layouts.

    sparkme-export ckpt=runs/demo/checkpoints/latest.pt format=torchvision out=resnet18_spark.pt

``format=torchvision``: loads with ``strict=True`` into ``torchvision.models.<name>()`` (ResNets; the classifier is
the untrained original). ``format=timm``: the classifier head is excluded; loads with ``strict=True`` into
``timm.create_model(<name>, num_classes=0)``. ``format=spark``: what SparK's downstream code loads — its
``*_1kpretrained_timm_style.pth`` for ResNets (timm keys, no ``fc``), its ``*_1kpretrained_official_style.pth`` for
ConvNeXt (facebookresearch keys, no head). ``format=spark_withdecoder`` (command line only): the whole model in
SparK's ``*_withdecoder_1kpretrained_spark_style.pth`` layout (``{'module': ..., 'arch', 'input_size', ...}``), for
SparK's ``--init_weight`` and its reconstruction notebook. ``format=detectron2`` (ResNets) and ``format=mmdet``
(ConvNeXt): what SparK's detection code loads; ``format=smp``: segmentation_models_pytorch's ``tu-`` encoders
(``sparkme.export_formats``, one module per format).

``ckpt=`` is a sparkme pretraining checkpoint, or with ``model=NAME`` any weights file ``load_weights`` reads
(SparK's released ``*_1kpretrained_timm_style.pth`` / ``*_official_style.pth``, a ``format=timm`` export).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from types import MappingProxyType

import torch
import torchvision
from hydra.utils import instantiate
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from sparkme.engine.checkpoint import load_checkpoint
from sparkme.errors import UsageError, run_reporting_usage_errors
from sparkme.export_formats import ExportFormat, detectron2, mmdet, smp
from sparkme.export_volumes import MONAI_FORMAT, NNUNET_FORMAT, export_volume_state
from sparkme.models.backbones import TORCHVISION_RESNETS
from sparkme.models.encoder import SparseEncoder
from sparkme.models.families import family_of
from sparkme.models.spark import SparK, build_spark
from sparkme.models.spark_layouts import (
    backbone_family,
    convnext_official_to_timm,
    encoder_to_official,
    fit_pointwise_convs,
    sparkme_to_spark,
)
from sparkme.models.volumes import is_volume_model

COMMAND = "sparkme-export"
# The dense state dicts of ``export_state_dict`` (also pretraining's ``export_formats``); the command's whole list
# is ``EXPORT_FORMATS`` below.
FORMATS = ("torchvision", "timm", "spark")
ARGUMENTS = ("ckpt", "format", "out", "model")
# Image size recorded by format=spark_withdecoder for a file that does not say (SparK's releases are 224 px).
DEFAULT_IMAGE_SIZE = 224


def export_state_dict(encoder: SparseEncoder, model_name: str, fmt: str) -> dict[str, torch.Tensor]:
    """Dense state dict of ``encoder`` in ``fmt`` (see module docstring), verified by a strict load.

    Raises:
        UsageError: an unknown format, or one the backbone cannot take.
    """
    if is_volume_model(model_name):  # 3D encoders: nnU-Net's and MONAI's layouts (sparkme.export_volumes)
        return export_volume_state(encoder, model_name, fmt)
    if fmt not in FORMATS:
        raise UsageError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    dense = encoder.to_dense()
    state = dense.state_dict()
    if fmt == "spark":
        return _spark_encoder_state(state, model_name, dense)
    if fmt == "torchvision":
        if model_name not in TORCHVISION_RESNETS:
            raise UsageError(f"format=torchvision supports {', '.join(TORCHVISION_RESNETS)}; use format=timm "
                             f"for {model_name!r}")
        getattr(torchvision.models, model_name)().load_state_dict(state, strict=True)
        return state
    import timm

    head = _classifier_prefix(dense)
    state = {k: v for k, v in state.items() if not k.startswith(head)}
    timm.create_model(model_name, num_classes=0).load_state_dict(state, strict=True)
    return state


def _classifier_prefix(dense: torch.nn.Module) -> str:
    """State-dict prefix of the classifier that ``num_classes=0`` removes: timm names it in ``pretrained_cfg``
    (``fc``, ``head.fc``, ``classifier``); torchvision's ResNets call it ``fc``."""
    return getattr(dense, "pretrained_cfg", {}).get("classifier", "fc") + "."


def _spark_encoder_state(state: dict[str, torch.Tensor], model_name: str,
                         dense: torch.nn.Module) -> dict[str, torch.Tensor]:
    """SparK's downstream layout, checked by mapping it back and loading it strictly into the dense model (whose
    own classifier head fills the keys SparK's files leave out)."""
    family = backbone_family(state)
    if family is None:
        raise UsageError(f"format=spark is SparK's layout for ResNets and ConvNeXt; use format=timm for {model_name!r}")
    out = encoder_to_official(state, family)
    back = fit_pointwise_convs(convnext_official_to_timm(out)[0], state) if family == "convnext" else dict(out)
    heads = {k: v for k, v in state.items() if k not in back}
    dense.load_state_dict({**back, **heads}, strict=True)
    return out


def model_from_checkpoint(path: str | Path, check: Callable[[str], None] | None = None) -> tuple[SparK, str, int]:
    """Rebuild the SparK model recorded in a pretraining checkpoint (on the ``torch`` backend: nothing compiled
    is needed to export); returns it, its backbone name and its image size.

    Args:
        check: called with the backbone name before the model is rebuilt (a format's refusal).

    Raises:
        UsageError: a missing or unreadable file, or one that is not a sparkme pretraining checkpoint.
    """
    if not Path(path).is_file():
        raise UsageError(f"ckpt={str(path)!r} is not a file; give a sparkme checkpoint such as "
                         "runs/<name>/checkpoints/latest.pt")
    state = load_checkpoint(path)
    if not isinstance(state.get("config"), dict) or "model" not in state["config"]:
        raise UsageError(f"{str(path)!r} is not a sparkme pretraining checkpoint: it has no 'config' entry with the "
                         "model (for SparK's released files or another weights file, add model=NAME, e.g. "
                         "model=resnet50)")
    cfg = OmegaConf.create(state["config"])
    model_cfg = OmegaConf.to_container(cfg.model, resolve=False)
    model_cfg.update(backend="torch", mask_ratio=0.6)
    if check is not None:
        check(str(model_cfg.get("model_name")))
    try:
        model = instantiate(OmegaConf.create(model_cfg))
        model.load_state_dict(state["model"], strict=True)
    except (OmegaConfBaseException, RuntimeError) as error:
        raise UsageError(f"{str(path)!r} is not a usable sparkme checkpoint: its model does not rebuild "
                         f"({str(error).strip().splitlines()[0]})") from error
    return model, model_cfg["model_name"], int(cfg.get("image_size", 224))


def model_from_weights(path: str | Path, model_name: str, check: Callable[[str], None] | None = None,
                       whole: bool = False) -> tuple[SparK, str, int]:
    """A ``model_name`` SparK model (``torch`` backend) holding the weights of any file ``load_weights`` reads:
    SparK's released files, a ``format=timm`` / ``format=spark`` export; returns it, the name and the image size.

    Args:
        check: called with ``model_name`` before the model is built (a format's refusal).
        whole: the format writes the decoder too, so the file must hold it.

    Raises:
        UsageError: an unknown model, a file that does not fit it, an encoder-only file when ``whole``.
    """
    family_of(model_name)
    if check is not None:
        check(model_name)
    model = build_spark(model_name, backend="torch")
    report = model.load_weights(path)
    if whole and report.kept:
        raise UsageError(f"{str(path)!r} holds the encoder only ({len(report.kept)} decoder tensors missing); "
                         "this format writes the decoder too: give a file with it")
    model.weights_report = report  # what the file held: format=mmdet writes the densify norms only if it had them
    return model, model_name, DEFAULT_IMAGE_SIZE


def encoder_from_checkpoint(path: str | Path) -> tuple[SparseEncoder, str]:
    """The encoder and backbone name of the model recorded in a pretraining checkpoint."""
    model, name, _ = model_from_checkpoint(path)
    return model.encoder, name


def spark_withdecoder_state(model: SparK, model_name: str, image_size: int) -> dict:
    """The whole model as SparK's ``*_withdecoder_1kpretrained_spark_style.pth`` (SparK's meta-information wrapper
    around its module's state dict)."""
    state = model.state_dict()
    family = backbone_family(k[len("encoder."):] for k in state if k.startswith("encoder."))
    if family is None:
        raise UsageError(f"format=spark_withdecoder is SparK's layout for ResNets and ConvNeXt, not {model_name!r}")
    return {"module": sparkme_to_spark(state, family, input_size=image_size), "arch": model_name,
            "input_size": image_size, "is_pretrain": True}


def _dense(fmt: str) -> ExportFormat:
    """A format whose file is ``export_state_dict``'s dense state dict."""
    return ExportFormat(fmt, lambda model, name, image_size: export_state_dict(model.encoder, name, fmt))


# Every format= of the command, in the order the usage line lists them: a new format is one line here.
EXPORT_FORMATS = MappingProxyType({fmt.name: fmt for fmt in (
    _dense("torchvision"),
    _dense("timm"),
    _dense("spark"),
    ExportFormat("spark_withdecoder", spark_withdecoder_state),
    NNUNET_FORMAT,
    MONAI_FORMAT,
    detectron2.FORMAT,
    mmdet.FORMAT,
    smp.FORMAT,
)})
CLI_FORMATS = tuple(EXPORT_FORMATS)
USAGE = f"usage: {COMMAND} ckpt=PATH out=PATH [format={'|'.join(CLI_FORMATS)}] [model=NAME]"


def parse_arguments(argv: list[str]) -> dict[str, str]:
    """``key=value`` arguments -> a dict with ``ckpt``, ``out``, ``format`` (default ``timm``) and, when given,
    ``model``.

    Raises:
        UsageError: a malformed or unknown argument, a missing one, an unknown format.
    """
    for arg in argv:
        if "=" not in arg:
            raise UsageError(f"argument {arg!r} is not key=value; {USAGE}")
    try:
        args = OmegaConf.to_container(OmegaConf.from_dotlist(list(argv)))
    except OmegaConfBaseException as error:
        raise UsageError(f"cannot parse arguments {list(argv)}: {str(error).splitlines()[0]}; {USAGE}") from error
    unknown = sorted(set(args) - set(ARGUMENTS))
    if unknown:
        raise UsageError(f"unknown argument {unknown[0]!r}; accepted: ckpt=, out=, format=, model=; {USAGE}")
    for key in ("ckpt", "out"):
        if args.get(key) in (None, ""):
            raise UsageError(f"missing {key}=...; {USAGE}")
    args.setdefault("format", "timm")
    if args["format"] not in CLI_FORMATS:
        raise UsageError(f"unknown format {args['format']!r}; choose one of {', '.join(CLI_FORMATS)}")
    return {k: str(v) for k, v in args.items()}


def export(argv: list[str]) -> Path:
    """The command: read the checkpoint, convert, write ``out`` atomically; returns the written path."""
    args = parse_arguments(argv)
    fmt = EXPORT_FORMATS[args["format"]]
    if "model" in args:
        model, name, image_size = model_from_weights(args["ckpt"], args["model"], fmt.check,
                                                     whole=fmt.name == "spark_withdecoder")
    else:
        model, name, image_size = model_from_checkpoint(args["ckpt"], fmt.check)
    contents = fmt.make(model, name, image_size)
    try:
        path = fmt.save(contents, args["out"])
    except OSError as error:
        raise UsageError(f"cannot write out={args['out']!r}: {error}; give a path in a writable folder") from error
    print(f"exported {name} ({args['format']} format) to {path}")
    return path


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``sparkme-export``: bad input ends as one ``sparkme-export: error: ...`` line, status 2."""
    run_reporting_usage_errors(COMMAND, lambda: export(sys.argv[1:] if argv is None else argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
