"""Sparse encoders converted from dense torchvision / timm backbones, and their export back to dense.

>>> enc = SparseEncoder.from_dense(torchvision.models.resnet50(), backend="minkowski")
>>> feats = enc(images, mask)   # 4 dense maps (B, C_i, H/s, W/s), s = 4, 8, 16, 32; zeros at masked sites
>>> dense = enc.to_dense()      # a torchvision ResNet again, loading the sparse weights with strict=True

The encoder registers the dense model's own modules under their own names (minus the classifier head), so its
state dict keys and shapes are exactly the dense model's: export is a ``load_state_dict(strict=True)``.
"""

from __future__ import annotations

import copy

import timm.models.convnext as timm_convnext
import timm.models.resnet as timm_resnet
import torch
import torchvision.models.resnet as tv_resnet
from torch import nn

from sparkme.masking import check_image_size
from sparkme.models.sparse_apply import apply_module, check_supported
from sparkme.sparse.base import SparseMap
from sparkme.sparse.context import MaskContext
from sparkme.sparse.registry import get_backend

# family name -> (dense classes, stem child names, stage child names, normalisation SparK densifies with)
FAMILIES: dict[str, tuple[tuple[type, ...], tuple[str, ...], tuple[str, ...], str]] = {
    "resnet": ((tv_resnet.ResNet, timm_resnet.ResNet), ("conv1", "bn1", "relu", "act1", "maxpool"),
               ("layer1", "layer2", "layer3", "layer4"), "bn"),
    "convnext": ((timm_convnext.ConvNeXt,), ("stem",), ("stages",), "ln"),
}


def _family_of(model: nn.Module) -> str:
    for family, (classes, *_rest) in FAMILIES.items():
        if isinstance(model, classes):
            return family
    supported = ", ".join(f"{c.__module__}.{c.__name__}" for classes, *_ in FAMILIES.values() for c in classes)
    raise TypeError(f"unsupported backbone {type(model).__module__}.{type(model).__name__}; supported: {supported}")


def _last_conv_channels(module: nn.Module) -> int:
    return [m for m in module.modules() if isinstance(m, nn.Conv2d)][-1].out_channels


class SparseEncoder(nn.Module):
    """A ResNet or ConvNeXt backbone that runs on the visible patches only.

    Args:
        dense_model: a torchvision/timm ResNet or a timm ConvNeXt (V1 or V2); it is copied, never modified.
        backend: ``"minkowski"``, ``"torch"`` or ``"masked"`` (see ``sparkme.available_backends()``).
    """

    def __init__(self, dense_model: nn.Module, backend: str = "minkowski"):
        super().__init__()
        self.family = _family_of(dense_model)
        self.backend = backend
        _, stem_names, stage_names, self.densify_norm = FAMILIES[self.family]
        model = copy.deepcopy(dense_model)
        # The template is kept out of the module tree: it only supplies the head and the class on export.
        self.__dict__["_dense_template"] = copy.deepcopy(dense_model)
        self.stem_names = [n for n in stem_names if getattr(model, n, None) is not None]
        for name in self.stem_names:
            self.add_module(name, getattr(model, name))
        if self.family == "convnext":
            self.stages = model.stages
            self.norm_pre = model.norm_pre
            self.stage_modules = list(self.stages)
        else:
            for name in stage_names:
                self.add_module(name, getattr(model, name))
            self.stage_modules = [getattr(self, n) for n in stage_names]
        if len(self.stage_modules) != 4:
            raise TypeError(f"expected 4 stages, found {len(self.stage_modules)}")
        for name, child in self.named_children():
            check_supported(child, prefix=name)
        self.feature_info = [
            dict(num_chs=_last_conv_channels(stage), reduction=2 ** (i + 2), module=f"stage{i}")
            for i, stage in enumerate(self.stage_modules)
        ]

    @classmethod
    def from_dense(cls, dense_model: nn.Module, backend: str = "minkowski") -> SparseEncoder:
        """Sparse twin of ``dense_model`` with its weights and BatchNorm buffers."""
        return cls(dense_model, backend=backend)

    @property
    def backend(self) -> str:
        return self._backend

    @backend.setter
    def backend(self, name: str) -> None:
        self._map_class = get_backend(name)
        self._backend = name

    def forward_sparse(self, images: torch.Tensor, mask: torch.Tensor | None = None) -> list[SparseMap]:
        """Encode the visible patches.

        Args:
            images: ``(B, 3, H, W)`` float, H and W multiples of 32.
            mask: ``(B, H//32, W//32)`` bool, True = visible; None means every patch is visible.

        Returns:
            4 ``SparseMap``s at strides 4, 8, 16, 32.
        """
        if images.dim() != 4:
            raise ValueError(f"images must be (B, C, H, W), got shape {tuple(images.shape)}")
        h, w = check_image_size(images.shape[2], images.shape[3])
        if mask is None:
            mask = torch.ones(images.shape[0], h, w, dtype=torch.bool, device=images.device)
        if mask.shape[0] != images.shape[0]:
            raise ValueError(f"mask batch {mask.shape[0]} does not match images batch {images.shape[0]}")
        x = self._map_class.from_images(images, MaskContext(mask, images.shape[2:]))
        for name in self.stem_names:
            x = apply_module(getattr(self, name), x)
        features = []
        for stage in self.stage_modules:
            x = apply_module(stage, x)
            features.append(x)
        return features

    def forward(self, images: torch.Tensor, mask: torch.Tensor | None = None) -> list[torch.Tensor]:
        """Returns 4 dense tensors ``(B, C_i, H/s, W/s)`` for s = 4, 8, 16, 32, exactly zero at masked sites."""
        return [f.to_dense() for f in self.forward_sparse(images, mask)]

    def to_dense(self) -> nn.Module:
        """A new module of the dense model's class holding this encoder's weights (its head is the original)."""
        model = copy.deepcopy(self.__dict__["_dense_template"])
        state = model.state_dict()
        unknown = sorted(set(self.state_dict()) - set(state))
        if unknown:
            raise RuntimeError(f"encoder keys missing from the dense model: {unknown[:5]}")
        state.update(self.state_dict())
        model.load_state_dict(state, strict=True)
        return model
