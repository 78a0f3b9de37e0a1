"""What one ``format=`` of ``sparkme-export`` is: how to make the object it writes from a pretrained model, how to
write it, and which backbones it refuses (checked at start-up, before the model is rebuilt)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sparkme.files import save_atomic

if TYPE_CHECKING:
    from sparkme.models.spark import SparK


def accept_any(model_name: str) -> None:
    """The check of a format every backbone can take."""


@dataclass(frozen=True)
class ExportFormat:
    """One ``format=`` of ``sparkme-export``.

    Attributes:
        name: the value of ``format=``.
        make: ``(model, backbone name, pretraining image size) -> what is written`` (a state dict or a wrapper
            around one), from the whole pretrained ``SparK`` model.
        check: raises ``UsageError`` for a backbone name the format cannot take (one line, before heavy work).
        save: writes what ``make`` returned to a path, atomically; ``torch.save`` unless the framework reads
            another container.
    """

    name: str
    make: Callable[[SparK, str, int], Any]
    check: Callable[[str], None] = accept_any
    save: Callable[[Any, str | Path], Path] = save_atomic
