"""Load weights into a SparK model from any checkpoint layout users hold: sparkme's own checkpoints, SparK's
released files (encoder only or with the decoder), timm / torchvision backbones.

>>> model = sparkme.build_spark("resnet50", backend="torch")
>>> report = model.load_weights("res50_withdecoder_1kpretrained_spark_style.pth")   # or load_weights(model, path)
>>> report.layout, len(report.loaded), report.kept, report.ignored

Files are read with ``torch.load(weights_only=True)`` only. Every key of the file is either loaded or listed in
``report.ignored`` with the reason; a layout this module does not know, a missing key or a shape mismatch raises
one ``UsageError`` naming the keys.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from sparkme.errors import UsageError
from sparkme.files import read_torch_file
from sparkme.models.spark_layouts import (
    SPARK_ENCODER_PREFIX,
    backbone_family,
    encoder_from_official,
    fit_pointwise_convs,
    spark_to_sparkme,
)

log = logging.getLogger(__name__)

SPARKME_PREFIXES = ("encoder.", "densify.", "decoder.")
# Wrappers around a state dict: SparK's meta information ("module"), sparkme / facebookresearch ("model"), others.
WRAPPER_KEYS = ("module", "model", "state_dict")
FIT_HINT = "another backbone, or model.decoder_width differs from the file's: SparK's files use 768"
LAYOUTS = {
    "sparkme": "sparkme checkpoint (encoder.*, densify.*, decoder.*)",
    "spark": "SparK with decoder (*_withdecoder_1kpretrained_spark_style.pth: sparse_encoder.sp_cnn.*, ...)",
    "convnext_official": "SparK / facebookresearch ConvNeXt encoder (*_1kpretrained_official_style.pth)",
    "encoder": "timm / torchvision encoder keys (*_1kpretrained_timm_style.pth, sparkme-export format=timm)",
}


@dataclass
class WeightsReport:
    """What ``load_weights`` did: the detected ``layout`` (a key of ``LAYOUTS``), the model keys it ``loaded``,
    the model keys ``kept`` at their initialisation (the densify layers and decoder when the file holds an encoder
    only), and the file keys it ``ignored``, each with its reason."""

    layout: str
    loaded: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)
    ignored: dict[str, str] = field(default_factory=dict)


def read_weights_file(path: str | Path) -> dict:
    """``torch.load(path, weights_only=True)`` on the CPU, with one-line ``UsageError``s for a missing, truncated or
    foreign file (never torch's advice to unpickle a file of unknown origin)."""
    if not Path(path).is_file():
        raise UsageError(f"weights file {str(path)!r} does not exist")
    return read_torch_file(path, "weights file")


def unwrap(state: dict) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors of a (possibly wrapped) state dict, and the other entries with why they are not loaded."""
    ignored = {}
    for key in WRAPPER_KEYS:
        if isinstance(state.get(key), dict):
            ignored.update({k: "checkpoint metadata (not weights)" for k in state if k != key})
            state = state[key]
            break
    tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    ignored.update({k: "not a tensor (configuration)" for k in state if k not in tensors})
    return tensors, ignored


def detect_layout(state: dict[str, torch.Tensor], encoder_keys: set[str]) -> str:
    """One of ``LAYOUTS`` from the key names; ``UsageError`` when none fits."""
    keys = list(state)
    if any(k.startswith(SPARK_ENCODER_PREFIX) for k in keys):
        return "spark"
    if any(k.startswith(SPARKME_PREFIXES) for k in keys):
        return "sparkme"
    if any(k.startswith("downsample_layers.") for k in keys):
        return "convnext_official"
    if encoder_keys & set(keys):
        return "encoder"
    raise UsageError(f"unknown checkpoint layout (first keys {keys[:3]}); accepted: " + "; ".join(LAYOUTS.values()))


def map_to_model(state: dict[str, torch.Tensor], layout: str,
                 family: str | None) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """File keys -> sparkme model keys for ``layout``, and the file keys left out with their reasons."""
    if layout == "sparkme":
        return dict(state), {}
    if layout == "spark":
        return spark_to_sparkme(state, family)
    encoder, ignored = encoder_from_official(state, family, official=layout == "convnext_official")
    return {f"encoder.{k}": v for k, v in encoder.items()}, ignored


def check_fit(mapped: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], required: set[str],
              source: str = "the weights", hint: str = FIT_HINT) -> None:
    """``UsageError`` naming unexpected keys, missing ``required`` keys and shape mismatches (at most 4 each);
    ``hint`` says what may be wrong."""
    problems = []
    unexpected = [k for k in mapped if k not in expected]
    missing = sorted(required - set(mapped))
    shapes = [f"{k}: file {tuple(v.shape)} vs model {tuple(expected[k].shape)}" for k, v in mapped.items()
              if k in expected and tuple(v.shape) != tuple(expected[k].shape)]
    for name, items in (("unknown to this model", unexpected), ("missing", missing), ("shape mismatch", shapes)):
        if items:
            problems.append(f"{len(items)} {name}: {items[:4]}")
    if problems:
        raise UsageError(f"{source} do not fit this model ({hint})? " + "; ".join(problems))


def load_weights(model: nn.Module, source: str | Path | dict) -> WeightsReport:
    """Load weights only (no optimizer, no step) into a sparkme ``SparK`` from a file path or a loaded dict.

    A whole-model layout (sparkme's or SparK's with decoder) must provide every model key; an encoder-only file
    must provide every encoder key and leaves the densify layers and decoder at their initialisation.

    Raises:
        UsageError: unreadable file, unknown layout, missing / unknown keys, shape mismatches.
    """
    raw = source if isinstance(source, dict) else read_weights_file(source)
    state, ignored = unwrap(raw)
    expected = model.state_dict()
    encoder_keys = {k[len("encoder."):] for k in expected if k.startswith("encoder.")}
    layout = detect_layout(state, encoder_keys)
    mapped, skipped = map_to_model(state, layout, backbone_family(encoder_keys))
    mapped = fit_pointwise_convs(mapped, expected)
    ignored.update(skipped)
    whole = layout in ("sparkme", "spark")
    origin = "the weights" if isinstance(source, dict) else f"the weights of {str(source)!r}"
    check_fit(mapped, expected, set(expected) if whole else {f"encoder.{k}" for k in encoder_keys},
              f"{origin} ({LAYOUTS[layout]})")
    model.load_state_dict(mapped, strict=whole)
    return WeightsReport(layout, loaded=sorted(mapped), kept=sorted(set(expected) - set(mapped)), ignored=ignored)


def load_init_weights(model: nn.Module, path: str | Path) -> WeightsReport:
    """``init=PATH`` of the pretraining CLI: ``load_weights`` and a log line saying what was loaded."""
    report = load_weights(model, path)
    log.info("init=%s: %s; loaded %d tensors, kept %d at initialisation, ignored %d entries%s", path,
             LAYOUTS[report.layout], len(report.loaded), len(report.kept), len(report.ignored),
             f" ({', '.join(sorted(report.ignored)[:8])})" if report.ignored else "")
    return report
