"""``minkowski`` backend: real MinkowskiEngine ``SparseTensor``s convolved by MinkowskiEngine's kernels.

Weights stay in the dense ``nn.Conv2d`` layout (one layout for every backend, so checkpoints move between backends
and export to dense models unchanged); ``dense_to_minkowski_kernel`` gives MinkowskiEngine's view of them at call
time, and ``MinkowskiDenseWeightConv`` (``sparse/minkowski_conv.py``) keeps the weight itself for backward, not that
view. Grouped and depthwise convolutions, and average pooling, gather through MinkowskiEngine's own kernel map
(its channelwise conv module is a Python loop over the k*k offsets, and it has no grouped conv).
"""

from __future__ import annotations

import warnings

import torch

from sparkme.sparse.base import SparseMap
from sparkme.sparse.context import MaskContext, conv_geometry
from sparkme.sparse.conv import Algorithm, ConvSpec
from sparkme.sparse.kernels import gather_avg_pool, gather_conv

try:
    with warnings.catch_warnings():
        # A CPU-only build warns on import; the registry already reports which build is installed.
        warnings.filterwarnings("ignore", message="The MinkowskiEngine was compiled with CPU_ONLY")
        import MinkowskiEngine as ME
        from MinkowskiEngineBackend._C import ConvolutionMode

        from sparkme.sparse.minkowski_conv import (  # noqa: F401 (the layout functions are this backend's API)
            MinkowskiDenseWeightConv,
            dense_to_minkowski_kernel,
            minkowski_to_dense_kernel,
        )
except ImportError as error:  # pragma: no cover - the registry reports this with an install hint
    raise ImportError(
        "the 'minkowski' backend needs MinkowskiEngine: run `python tools/install_minkowski.py` "
        f"(builds and caches a wheel for your torch) ({error})"
    ) from error


class MinkowskiMap(SparseMap):
    """A ``MinkowskiEngine.SparseTensor`` (coordinates ``(batch, y, x)`` or ``(batch, z, y, x)`` in pixels,
    multiples of the stride; ``D`` = the context's spatial dims)."""

    backend_name = "minkowski"

    def __init__(self, context: MaskContext, stride: int, tensor: ME.SparseTensor):
        super().__init__(context, stride)
        self.tensor = tensor

    @classmethod
    def from_images(cls, images: torch.Tensor, context: MaskContext) -> MinkowskiMap:
        # Built from the mask's own coordinates: ME.to_sparse would also drop visible pixels whose value is 0.
        mask = context.dense_mask(1)
        features = images.movedim(1, -1)[mask]
        coordinates = context.coords(1).int()
        # MinkowskiEngine's coordinate manager calls omp_set_num_threads(its thread count), which is also torch's
        # OpenMP pool: by default min(cpu_count, 20), silently undoing the caller's torch.set_num_threads. Giving it
        # torch's own count leaves the caller's setting in place.
        manager = ME.CoordinateManager(
            D=context.spatial_dims, num_threads=torch.get_num_threads(),
            coordinate_map_type=ME.CoordinateMapType.CUDA if coordinates.is_cuda else ME.CoordinateMapType.CPU,
        )
        tensor = ME.SparseTensor(features, coordinates=coordinates, tensor_stride=1, device=images.device,
                                 coordinate_manager=manager)
        return cls(context, 1, tensor)

    def with_features(self, features: torch.Tensor) -> MinkowskiMap:
        tensor = ME.SparseTensor(
            features, coordinate_map_key=self.tensor.coordinate_map_key,
            coordinate_manager=self.tensor.coordinate_manager,
        )
        return MinkowskiMap(self.context, self.stride, tensor)

    @property
    def features(self) -> torch.Tensor:
        return self.tensor.F

    def visible_rows(self, features: torch.Tensor) -> torch.Tensor:
        return features

    def from_visible_rows(self, rows: torch.Tensor) -> MinkowskiMap:
        return self.with_features(rows)

    def _batch_index(self) -> torch.Tensor:
        key = self.tensor.coordinate_map_key
        return self.context.cached(("me_batch", str(key)), lambda: self.tensor.C[:, 0].long())

    def grid_sites(self) -> tuple[torch.Tensor, tuple[int, ...]]:
        """Each row's flat grid index in MinkowskiEngine's own row order (its coordinates are in pixels, multiples
        of the stride), and the grid."""

        def make():
            pixels = self.tensor.C.long()
            coords = torch.cat([pixels[:, :1], pixels[:, 1:] // self.stride], dim=1)
            return self.context.flat_index(coords, self.stride)

        sites = self.context.cached(("me_flat", str(self.tensor.coordinate_map_key)), make)
        return sites, self.context.grid_shape(self.stride)

    def per_sample_sum(self, features: torch.Tensor) -> torch.Tensor:
        out = features.new_zeros(self.context.batch_size, features.shape[1])
        return out.index_add(0, self._batch_index(), features)

    def per_sample_broadcast(self, values: torch.Tensor) -> torch.Tensor:
        return values[self._batch_index()]

    def row_samples(self) -> torch.Tensor:
        return self._batch_index()

    def _kernel_generator(self, kernel_size: int, stride: int) -> ME.KernelGenerator:
        return self.context.cached(
            ("me_kernel", kernel_size, stride),
            lambda: ME.KernelGenerator(kernel_size=kernel_size, stride=stride, dimension=self.spatial_dims),
        )

    def _wrap(self, features: torch.Tensor, key, stride: int) -> MinkowskiMap:
        tensor = ME.SparseTensor(features, coordinate_map_key=key, coordinate_manager=self.tensor.coordinate_manager)
        return MinkowskiMap(self.context, self.stride * stride, tensor)

    def gather_conv(self, weight: torch.Tensor, bias: torch.Tensor | None, spec: ConvSpec) -> MinkowskiMap:
        if spec.algorithm is not Algorithm.GATHER_GEMM:
            return self._gathered(weight, bias, spec)
        # groups == 1: MinkowskiEngine's own kernel
        generator = self._kernel_generator(spec.kernel, spec.stride)
        out_key = ME.CoordinateMapKey(self.tensor.coordinate_map_key.get_coordinate_size())
        features = self.tensor.F
        # MinkowskiEngine's kernels take one dtype, float32 or float64: under bf16/fp16 autocast the features of a
        # preceding pointwise layer are half precision while the weight is float32, so both run in float32 and the
        # result comes back in the features' dtype, as an autocast conv would give it.
        dtype = torch.promote_types(features.dtype, weight.dtype)
        dtype = torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype
        out = MinkowskiDenseWeightConv.apply(
            features.to(dtype), weight.to(dtype), generator, ConvolutionMode.DEFAULT,
            self.tensor.coordinate_map_key, out_key, self.tensor.coordinate_manager,
        ).to(features.dtype if features.dtype in (torch.bfloat16, torch.float16) else dtype)
        if bias is not None:
            out = out + bias
        return self._wrap(out, out_key, spec.stride)

    def _strided_table(self, kernel: int, stride: int):
        """Output key at ``stride`` times this map's and the ``(N_out, k*k)`` table into this map's rows."""
        manager, in_key = self.tensor.coordinate_manager, self.tensor.coordinate_map_key
        out_key = manager.stride(in_key, [stride] * self.spatial_dims)
        table = self.context.cached(("me_nbr", str(in_key), str(out_key), kernel),
                                    lambda: self._neighbours(in_key, out_key, kernel, stride))
        return out_key, table

    def _gathered(self, weight: torch.Tensor, bias: torch.Tensor | None, spec: ConvSpec) -> MinkowskiMap:
        """A grouped (or depthwise) conv as a gather through ME's kernel map and per-group GEMMs."""
        in_key = self.tensor.coordinate_map_key
        if spec.stride > 1:
            out_key, table = self._strided_table(spec.kernel, spec.stride)
            return self._wrap(gather_conv(self.tensor.F, table, weight, bias, spec), out_key, spec.stride)
        # MinkowskiEngine stores rows in hash order; 49 random-access gathers per layer are cache-hostile, so the
        # rows are put in (batch, y, x) order once (one gather in, one out) and the taps then read nearby rows.
        order, inverse, table = self.context.cached(("me_dw", str(in_key), spec.kernel),
                                                    lambda: self._sorted_neighbours(in_key, spec.kernel))
        out = gather_conv(self.tensor.F[order], table, weight, bias, spec)
        return self.with_features(out[inverse])

    def _sorted_neighbours(self, key, kernel: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Row order sorting the sites by (batch, y, x) (or (batch, z, y, x)), its inverse, and the stride-1 table in
        that order."""
        coords = self.tensor.C.long()
        flat = coords[:, 0]
        for axis, side in enumerate(self.context.image_size, start=1):
            flat = flat * side + coords[:, axis]
        order = flat.argsort()
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(order.numel(), device=order.device)
        table = self._neighbours(key, key, kernel, 1)[order]
        missing = table == order.numel()
        table = torch.where(missing, table, inverse[table.clamp(max=order.numel() - 1)])
        return order, inverse, table

    def _neighbours(self, in_key, out_key, kernel: int, stride: int) -> torch.Tensor:
        """``(N_out, k**D)`` rows read per tap (row-major ``ky*k + kx`` order), ``N_in`` where missing, from ME's
        kernel map."""
        manager = self.tensor.coordinate_manager
        generator = self._kernel_generator(kernel, stride)
        region_type, region_offset, _ = generator.get_kernel(self.tensor.tensor_stride, False)
        kernel_map = manager.kernel_map(in_key, out_key, stride, kernel, 1, region_type=region_type,
                                        region_offset=region_offset)
        n_in, n_out = manager.size(in_key), manager.size(out_key)
        device = self.tensor.F.device
        dims = self.spatial_dims
        table = torch.full((n_out, kernel ** dims), n_in, dtype=torch.long, device=device)
        for offset, in_out in kernel_map.items():
            # ME: the first spatial coordinate varies fastest; ours: row-major (the last axis fastest)
            tap, rest = 0, offset
            for axis in range(dims):
                tap += (rest % kernel) * kernel ** (dims - 1 - axis)
                rest //= kernel
            table[in_out[1].long().to(device), tap] = in_out[0].long().to(device)
        return table

    def max_pool(self, kernel_size: int, stride: int, padding: int) -> MinkowskiMap:
        conv_geometry(kernel_size, stride, padding)
        pool = ME.MinkowskiMaxPooling(kernel_size=kernel_size, stride=stride, dimension=self.spatial_dims)
        out = pool(self.tensor)
        return MinkowskiMap(self.context, self.stride * stride, out)

    def avg_pool(self, kernel_size: int, stride: int, padding: int) -> MinkowskiMap:
        conv_geometry(kernel_size, stride, padding)
        if stride == 1:
            key = self.tensor.coordinate_map_key
            order, inverse, table = self.context.cached(("me_dw", str(key), kernel_size),
                                                        lambda: self._sorted_neighbours(key, kernel_size))
            return self.with_features(gather_avg_pool(self.tensor.F[order], table)[inverse])
        out_key, table = self._strided_table(kernel_size, stride)
        return self._wrap(gather_avg_pool(self.tensor.F, table), out_key, stride)

    def to_dense(self, fill: torch.Tensor | None = None) -> torch.Tensor:
        batch = self.context.batch_size
        shape = torch.Size([batch, self.tensor.F.shape[1], *self.context.grid_size(self.stride)])
        dense, _, _ = self.tensor.dense(shape=shape, min_coordinate=torch.IntTensor([0] * self.spatial_dims))
        return self._fill_masked(dense, fill)
