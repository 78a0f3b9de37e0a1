"""Sparse encoders converted from dense torchvision / timm backbones, and their export back to dense.

>>> enc = SparseEncoder.from_dense(timm.create_model("resnet50"), backend="minkowski")
>>> feats = enc(images, mask)   # 4 dense maps (B, C_i, H/s, W/s), s = 4, 8, 16, 32; zeros at masked sites
>>> dense = enc.to_dense()      # the dense model again, loading the sparse weights with strict=True

The dense model's forward is traced with ``torch.fx`` up to its four feature levels (``feature_levels``); every
operation that touches a sparse map is checked against the op table (``sparkme.convert``) at conversion. The encoder
registers the modules that graph uses under their own dotted names, so its state dict keys and shapes are exactly
the dense model's (minus the unused head): export is a ``load_state_dict(strict=True)``.

Volumes use the same class: a 3-D encoder (``sparkme.models.volumes``) is converted with its own feature levels and
patch size (its total stride), and runs on ``(B, C, D, H, W)`` volumes with ``(B, D/p, H/p, W/p)`` masks.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from sparkme.convert import check_graph, feature_levels, run_graph, trace_to_features
from sparkme.masking import PATCH_SIZE, check_grid_size
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
        levels: the feature levels ``[dict(module=, reduction=, num_chs=)]`` (default: timm's ``feature_info`` at
            strides 4, 8, 16, 32; 3-D encoders pass ``volumes.volume_feature_levels``).
        densify_norm: SparK's densify norm, ``bn``, ``ln`` or ``in`` (default: the 2-D family's).
        patch_size: the total stride of the encoder: one mask cell is one site of its deepest map.
        spatial_dims: 2 (images ``(B, C, H, W)``) or 3 (volumes ``(B, C, D, H, W)``).

    Raises:
        UsageError: the model lacks a feature level, or uses an operation (or a layer setting) without sparse
            semantics; the message names it and its module path.
    """

    def __init__(self, dense_model: nn.Module, backend: str = "minkowski", levels: list[dict] | None = None,
                 densify_norm: str | None = None, patch_size: int = PATCH_SIZE, spatial_dims: int = 2):
        super().__init__()
        self.backend = backend
        self.patch_size = patch_size
        self.spatial_dims = spatial_dims
        levels = feature_levels(dense_model) if levels is None else levels
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
        # SparK's: LayerNorm for ConvNeXt, BatchNorm for the rest (3-D encoders name theirs)
        self.densify_norm = densify_norm_of(dense_model) if densify_norm is None else densify_norm

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
            images: ``(B, 3, H, W)`` float, H and W multiples of 32 (volumes: ``(B, C, D, H, W)``, each side a
                multiple of ``patch_size``).
            mask: ``(B, H//32, W//32)`` (``(B, D//p, H//p, W//p)``) bool, True = visible; None means every patch
                is visible.

        Returns:
            4 ``SparseMap``s at strides 4, 8, 16, 32 (the encoder's feature levels).
        """
        if images.dim() != 2 + self.spatial_dims:
            layout = "(B, C, H, W)" if self.spatial_dims == 2 else "(B, C, D, H, W)"
            raise ValueError(f"images must be {layout}, got shape {tuple(images.shape)}")
        grid = check_grid_size(tuple(images.shape[2:]), self.patch_size)
        if mask is None:
            mask = torch.ones(images.shape[0], *grid, dtype=torch.bool, device=images.device)
        if mask.shape[0] != images.shape[0]:
            raise ValueError(f"mask batch {mask.shape[0]} does not match images batch {images.shape[0]}")
        x = self._map_class.from_images(images, MaskContext(mask, images.shape[2:], self.patch_size))
        return list(run_graph(self.__dict__["_graph"], self, x))

    def forward(self, images: torch.Tensor, mask: torch.Tensor | None = None) -> list[torch.Tensor]:
        """Returns 4 dense tensors ``(B, C_i, H/s, W/s)`` (``(B, C_i, D/s, H/s, W/s)``) for the feature levels'
        strides s, exactly zero at masked sites."""
        return [f.to_dense() for f in self.forward_sparse(images, mask)]

    def to_dense(self) -> nn.Module:
        """A new module of the dense model's class holding this encoder's weights (its head is the original).

        A tensor the dense model registers under two names (dynamic-network-architectures' ``conv`` and
        ``all_modules.0``) is filled under both, from whichever name the traced graph used."""
        model = copy.deepcopy(self.__dict__["_dense_template"])
        state = model.state_dict()
        unknown = sorted(set(self.state_dict()) - set(state))
        if unknown:
            raise RuntimeError(f"encoder keys missing from the dense model: {unknown[:5]}")
        aliases: dict[int, list[str]] = {}
        for key, tensor in model.state_dict(keep_vars=True).items():
            aliases.setdefault(id(tensor), []).append(key)
        template = model.state_dict(keep_vars=True)
        for key, value in self.state_dict().items():
            for alias in aliases[id(template[key])]:
                state[alias] = value
        model.load_state_dict(state, strict=True)
        return model
