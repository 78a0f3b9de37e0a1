"""Pretrained weights into a dense timm / torchvision classifier (fine-tuning, probing), from any file that
pretraining's ``init=`` accepts.

>>> model = timm.create_model("resnet50", num_classes=10)
>>> report = load_pretrained_dense(model, "resnet50", "runs/spark_resnet50/checkpoints/latest.pt")
>>> print(report)      # layout, how many tensors loaded, which head keys are new

The layouts and their key mapping are ``sparkme.models.weights`` / ``spark_layouts``' (sparkme checkpoints and
exports, SparK's released files, timm / torchvision state dicts, fine-tuning checkpoints): the file is mapped onto
sparkme's ``encoder.*`` keys as for pretraining, then the ``encoder.`` prefix is dropped, since the encoder's keys
are the dense model's own. The encoder is the dense model up to its last feature level (``dense_encoder``); every
key after it (the head: ResNet ``fc.*``, ConvNeXt ``head.norm.*`` and ``head.fc.*``) may be missing and stays at its
initialisation. Any other missing key, any key the model lacks, any shape mismatch is one ``UsageError``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from torch import fx, nn

from sparkme.convert import feature_levels, trace_to_features
from sparkme.engine.checkpoint import model_name_of
from sparkme.errors import UsageError
from sparkme.models.spark_layouts import backbone_family, fit_pointwise_convs
from sparkme.models.weights import LAYOUTS, check_fit, detect_layout, map_to_model, read_weights_file, unwrap

DENSE_FIT_HINT = "a file of another backbone, or of another variant of it"


@dataclass
class DenseWeightsReport:
    """What ``load_pretrained_dense`` did.

    Attributes:
        layout: the detected layout (a key of ``sparkme.models.weights.LAYOUTS``).
        loaded: model keys loaded from the file.
        new: model keys the file does not hold, kept at their initialisation (the head only).
        ignored: file keys not loaded, each with its reason (SparK's decoder, a classifier head, metadata).
    """

    layout: str
    loaded: list[str] = field(default_factory=list)
    new: list[str] = field(default_factory=list)
    ignored: dict[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        heads = sorted({key.rsplit(".", 1)[0] for key in self.new})
        return (f"{LAYOUTS.get(self.layout, self.layout)}; loaded {len(self.loaded)} tensors, new at initialisation: "
                f"{', '.join(heads) or 'none'} (never pretrained by SparK); ignored {len(self.ignored)} file entries")


def dense_encoder(model: nn.Module) -> fx.GraphModule:
    """The part of a dense model that SparK pretrains: its graph up to the last feature level (stride 32).

    Returns:
        a ``GraphModule`` sharing ``model``'s parameters, ``(B, 3, H, W) -> tuple of 4 maps (B, C_i, H/s, W/s)``
        for s = 4, 8, 16, 32; its state-dict keys are those of the model minus the head.
    """
    levels = feature_levels(model)
    return trace_to_features(model, [level["module"] for level in levels])


def _file_model_name(raw: dict) -> str | None:
    """The backbone a file names: a sparkme checkpoint's ``model_name`` (or config), SparK's / the export's
    ``arch``; None when the file does not say."""
    if isinstance(raw.get("model"), dict):
        return model_name_of(raw)
    return raw["arch"] if isinstance(raw.get("arch"), str) else None


def load_pretrained_dense(model: nn.Module, model_name: str, source: str | Path | dict) -> DenseWeightsReport:
    """Load the pretrained encoder of ``source`` into the dense ``model`` (``timm.create_model(model_name, ...)`` or a
    torchvision ResNet); only the head after the last feature level may be missing from the file.

    Files are read with ``torch.load(weights_only=True)`` only. A model on the ``meta`` device is checked without
    copying (start-up checks).

    Raises:
        UsageError: an unreadable file, a checkpoint of another model (named), an unknown layout, missing encoder
            keys, keys the model lacks, shape mismatches (one line naming the keys).
    """
    raw = source if isinstance(source, dict) else read_weights_file(source)
    origin = "the weights" if isinstance(source, dict) else f"the weights of {str(source)!r}"
    named = _file_model_name(raw)
    if named is not None and named != model_name:
        raise UsageError(f"{origin} are of {named}; this run builds {model_name} (choose model={named} or another "
                         "file)")
    state, ignored = unwrap(raw)
    expected = model.state_dict()
    encoder_keys = set(dense_encoder(model).state_dict())
    head = set(expected) - encoder_keys
    layout = detect_layout(state, encoder_keys)
    mapped, skipped = map_to_model(state, layout, backbone_family(encoder_keys))
    ignored.update(skipped)
    weights = {}
    for key, value in mapped.items():
        if key.startswith("encoder."):
            weights[key[len("encoder."):]] = value
        else:
            ignored[key] = "SparK's densify layers / decoder: used in pretraining only"
    # A whole classifier's file (timm / torchvision, a fine-tune) carries a head for its own classes: not loaded.
    for key in [k for k in weights if k in head and (k not in expected or weights[k].shape != expected[k].shape)]:
        ignored[key] = "classifier head of another number of classes"
        del weights[key]
    weights = fit_pointwise_convs(weights, expected)
    check_fit(weights, expected, encoder_keys, f"{origin} ({LAYOUTS[layout]})", DENSE_FIT_HINT)
    if not any(tensor.is_meta for tensor in expected.values()):  # a meta model (start-up check) holds no values
        model.load_state_dict(weights, strict=False)
    return DenseWeightsReport(layout, loaded=sorted(weights), new=sorted(set(expected) - set(weights)),
                              ignored=ignored)


def random_init_report(model: nn.Module) -> DenseWeightsReport:
    """The report of a model left at random initialisation (``init=null``, the baseline)."""
    return DenseWeightsReport("random initialisation", new=sorted(model.state_dict()))


__all__ = ["DenseWeightsReport", "dense_encoder", "load_pretrained_dense", "random_init_report"]
