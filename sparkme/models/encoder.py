"""Sparse encoders converted from dense torchvision / timm backbones, and their export back to dense.

>>> enc = SparseEncoder.from_dense(timm.create_model("resnet50"), backend="minkowski")
>>> feats = enc(images, mask)   # 4 dense maps (B, C_i, H/s, W/s), s = 4, 8, 16, 32; zeros at masked sites
>>> dense = enc.to_dense()      # the dense model again, loading the sparse weights with strict=True

The dense model's forward is traced with ``torch.fx`` up to its four feature levels (``feature_levels``); every
operation that touches a sparse map is checked against the op table (``sparkme.convert``) at conversion. The encoder
registers the modules that graph uses under their own dotted names, so its state dict keys and shapes are exactly
the dense model's (minus the unused head): export is a ``load_state_dict(strict=True)``.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from sparkme.convert import check_graph, feature_levels, run_graph, trace_to_features
from sparkme.masking import check_image_size
from sparkme.models.families import densify_norm_of
from sparkme.sparse.base import SparseMap
from sparkme.sparse.context import MaskContext
from sparkme.sparse.registry import get_backend


class SparseEncoder(nn.Module):
    """A timm (or torchvision ResNet) backbone that runs on the visible patches only.

    Args:
        dense_model: a torchvision ResNet or a timm ConvNet with ``feature_info`` at strides 4, 8, 16, 32 whose
            operations are all in ``sparkme.convert.op_table``; it is copied, never modified.
        backend: ``"minkowski"``, ``"torch"`` or ``"masked"`` (see ``sparkme.available_backends()``).

    Raises:
        UsageError: the model lacks a feature level, or uses an operation (or a layer setting) without sparse
            semantics; the message names it and its module path.
    """

    def __init__(self, dense_model: nn.Module, backend: str = "minkowski"):
        super().__init__()
        self.backend = backend
        levels = feature_levels(dense_model)
        model = copy.deepcopy(dense_model)
        # The template is kept out of the module tree: it only supplies the head and the class on export.
        self.__dict__["_dense_template"] = copy.deepcopy(dense_model)
        traced = trace_to_features(model, [level["module"] for level in levels])
        for name, child in traced.named_children():
            self.add_module(name, child)
        for name, parameter in traced.named_parameters(recurse=False):
            self.register_parameter(name, parameter)  # e.g. a model-level scale read by a get_attr node
        for name, buffer in traced.named_buffers(recurse=False):
            self.register_buffer(name, buffer)
        graph = traced.graph
        check_graph(graph, self)
        self.__dict__["_graph"] = graph
        self.feature_info = levels
        self.densify_norm = densify_norm_of(dense_model)  # SparK's: LayerNorm for ConvNeXt, BatchNorm for the rest

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
        return list(run_graph(self.__dict__["_graph"], self, x))

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
