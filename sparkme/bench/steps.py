"""What is timed: the encoder's forward + backward, and the whole SparK training step as in pretraining.

One SparK model (and one optimizer) serves every variant of a model: the encoder's backend and the dense half's
speed-ups are attributes switched before each step, so every variant runs on the very same weights and memory.
"""

from __future__ import annotations

import dataclasses
import time

import torch
from timm.optim import param_groups_weight_decay

from sparkme.bench.timing import synchronize
from sparkme.engine.fused_lamb import FusedLamb
from sparkme.models.families import PRETRAIN_RECIPE, pretrain_betas
from sparkme.models.spark import SparK, build_spark
from sparkme.models.volumes import is_volume_model

REFERENCE_STEP = "reference"  # masked backend, plain dense half: SparK's own step
DECODER_WIDTH = 768  # the paper's
VOLUME_DECODER_WIDTH = 256  # conf/model/volumes/*.yaml's


@dataclasses.dataclass(frozen=True)
class Variant:
    """One timed configuration of the model.

    Attributes:
        name: the backend name, or ``REFERENCE_STEP``.
        backend: the encoder's sparse backend.
        dense_layout: ``SparK.dense_layout`` (memory format of densify and the decoder).
        dense_autocast: ``SparK.dense_autocast`` (None: the default float32 maths).
        fused_optimizer: ``FusedLamb.fused`` (False: timm's own LAMB step).
    """

    name: str
    backend: str
    dense_layout: str = "auto"
    dense_autocast: torch.dtype | None = None
    fused_optimizer: bool = True

    def apply(self, model: SparK, optimizer: torch.optim.Optimizer | None = None) -> None:
        model.encoder.backend = self.backend
        model.dense_layout = self.dense_layout
        model.dense_autocast = self.dense_autocast
        if isinstance(optimizer, FusedLamb):
            optimizer.fused = self.fused_optimizer


def variants(backends: list[str], dense_layout: str = "auto", bf16: bool = False) -> list[Variant]:
    """Every backend with the speed-ups, then the reference step (``masked`` with none of them: contiguous dense
    half, timm's LAMB step)."""
    dtype = torch.bfloat16 if bf16 else None
    return ([Variant(b, b, dense_layout, dtype) for b in backends]
            + [Variant(REFERENCE_STEP, "masked", "contiguous", fused_optimizer=False)])


def build_model(model_name: str, device: torch.device, decoder_width: int = DECODER_WIDTH) -> SparK:
    """SparK around a fresh ``model_name`` (its family's drop-path rate), by default with the paper's decoder (3-D
    models: one input channel)."""
    return build_spark(model_name, "masked", decoder_width=decoder_width).to(device).train()


def default_decoder_width(model_name: str) -> int:
    """The paper's 768 for images; 256 for volumes (their full-resolution decoder levels are cubes)."""
    return VOLUME_DECODER_WIDTH if is_volume_model(model_name) else DECODER_WIDTH


def make_optimizer(model: SparK, model_name: str, batch: int) -> torch.optim.Optimizer:
    """LAMB as in pretraining (``families.PRETRAIN_RECIPE``, the family's betas, the global-norm clip done outside
    it, no decay on mask tokens): ``FusedLamb`` (timm's LAMB with a compiled update; ``fused = False`` is timm's
    step)."""
    groups = param_groups_weight_decay(model, PRETRAIN_RECIPE.weight_decay, no_weight_decay_list=("mask_token",))
    return FusedLamb(groups, lr=PRETRAIN_RECIPE.base_lr * batch / 256, betas=pretrain_betas(model_name),
                     max_grad_norm=None)


def encoder_step(model: SparK, images: torch.Tensor, mask: torch.Tensor) -> None:
    """Encoder forward + backward, loss = sum of the means of its 4 dense feature maps."""
    features = model.encoder(images, mask)
    sum(f.mean() for f in features).backward()
    model.zero_grad(set_to_none=True)


def train_step(model: SparK, optimizer: torch.optim.Optimizer, images: torch.Tensor, mask: torch.Tensor) -> float:
    """One pretraining step (forward, backward, clip at 5, LAMB, zero grads); returns the optimizer's seconds."""
    loss = model(images, mask)
    loss.backward()
    synchronize(images.device)
    start = time.perf_counter()
    torch.nn.utils.clip_grad_norm_(model.parameters(), PRETRAIN_RECIPE.clip_grad)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    synchronize(images.device)
    return time.perf_counter() - start
