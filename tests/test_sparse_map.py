import pytest
import torch
import torch.nn.functional as F

from conftest import ALL_BACKENDS, DEVICE, relative_error
from sparkme.masking import mask_at_stride, random_mask
from sparkme.sparse import sparse_from_images
from sparkme.sparse.minkowski_backend import ME, dense_to_minkowski_kernel, minkowski_to_dense_kernel


def _inputs(batch=2, height=96, width=128, channels=3, ratio=0.6, seed=0):
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(batch, channels, height, width, generator=generator)
    mask = random_mask(batch, height // 32, width // 32, ratio, generator=generator)
    return images, mask


def test_minkowski_keeps_the_callers_thread_count():
    """MinkowskiEngine's coordinate manager calls omp_set_num_threads (torch's pool too): by default with the CPU
    count, which silently undid torch.set_num_threads (sparkme-bench --threads 1 ran on every core)."""
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        images, mask = _inputs()
        sparse = sparse_from_images(images, mask, "minkowski")
        sparse.conv2d(torch.nn.Conv2d(3, 4, 3, padding=1))
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_dense_sparse_dense_round_trip_is_exact(backend):
    images, mask = _inputs()
    images[0, :, :32, :32] = 0.0  # visible zero pixels must survive (ME.to_sparse would drop them)
    mask[0, 0, 0] = True
    sparse = sparse_from_images(images, mask, backend)
    pixel_mask = mask_at_stride(mask, 1)[:, None]
    assert torch.equal(sparse.to_dense(), images * pixel_mask)
    fill = torch.tensor([1.5, -2.0, 3.0])
    filled = sparse.to_dense(fill)
    assert torch.equal(filled, torch.where(pixel_mask, images, fill.view(1, 3, 1, 1)))
    assert sparse.visible_rows(sparse.features).shape == (int(pixel_mask.sum()), 3)


def test_minkowski_input_is_a_real_sparse_tensor_of_all_visible_pixels():
    images, mask = _inputs()
    sparse = sparse_from_images(images, mask, "minkowski")
    assert isinstance(sparse.tensor, ME.SparseTensor)
    coords = sparse.tensor.C.long()
    expected = mask_at_stride(mask, 1).nonzero()
    assert coords.shape == expected.shape
    assert set(map(tuple, coords.tolist())) == set(map(tuple, expected.tolist()))


@pytest.mark.parametrize("kernel,stride", [(1, 1), (3, 1), (7, 1), (3, 2), (7, 2), (2, 2), (4, 4)])
def test_minkowski_convolution_equals_dense_conv_of_masked_image(kernel, stride):
    """Proves the kernel layout the converter relies on: ``minkowski_to_dense_kernel`` maps a real
    ``MinkowskiConvolution`` to the ``conv2d`` weight giving the same outputs at every visible site."""
    images, mask = _inputs(channels=5)
    conv = ME.MinkowskiConvolution(5, 6, kernel_size=kernel, stride=stride, bias=False, dimension=2)
    torch.nn.init.normal_(conv.kernel)
    sparse = sparse_from_images(images, mask, "minkowski")
    out = conv(sparse.tensor)
    out_mask = mask_at_stride(mask, stride)
    height, width = out_mask.shape[1:]
    dense_out, _, _ = out.dense(shape=torch.Size([2, 6, height, width]), min_coordinate=torch.IntTensor([0, 0]))

    me_kernel = conv.kernel if conv.kernel.dim() == 3 else conv.kernel[None]  # ME stores 1x1 kernels as 2-D
    weight = minkowski_to_dense_kernel(me_kernel.detach(), kernel)
    assert torch.equal(dense_to_minkowski_kernel(weight), me_kernel.detach())
    padding = kernel // 2 if kernel % 2 else 0
    reference = F.conv2d(images * mask_at_stride(mask, 1)[:, None], weight, stride=stride, padding=padding)

    visible = out_mask[:, None].expand_as(reference)
    assert relative_error(dense_out[visible], reference[visible]) <= 1e-4
    # Output sites are exactly the visible set down-sampled by the stride (the mask upsampled to that stride).
    out_coords = out.C.long()
    out_coords[:, 1:] //= stride
    assert set(map(tuple, out_coords.tolist())) == set(map(tuple, out_mask.nonzero().tolist()))


@pytest.mark.parametrize("dtype,tolerance", [(torch.float64, 1e-10), (torch.float32, 1e-4)])
@pytest.mark.parametrize("kernel,stride", [(3, 1), (2, 2)])
def test_minkowski_convolution_gradients_equal_dense_conv(kernel, stride, dtype, tolerance):
    """MinkowskiEngine's own kernels (the CPU build's gemm runs on ATen; CUDA with SPARKME_TEST_DEVICE=cuda) give
    conv2d's output, input gradient and weight gradient at visible sites: all three gemm forms, float and double."""
    images, mask = _inputs(channels=4)
    images = images.to(DEVICE, dtype).requires_grad_()
    mask = mask.to(DEVICE)
    pixel_mask = mask_at_stride(mask, 1)
    out_mask = mask_at_stride(mask, stride)[:, None]
    conv = ME.MinkowskiConvolution(4, 5, kernel_size=kernel, stride=stride, bias=False, dimension=2)
    conv = conv.to(DEVICE, dtype)
    torch.nn.init.normal_(conv.kernel)
    # The reference runs in float64 from the same values (on a GPU, float32 conv2d may use TF32).
    images64 = images.detach().double().requires_grad_()
    weight64 = minkowski_to_dense_kernel(conv.kernel.detach(), kernel).double().requires_grad_()
    padding = kernel // 2 if kernel % 2 else 0
    reference = F.conv2d(images64 * pixel_mask[:, None], weight64, stride=stride, padding=padding)
    upstream = torch.randn(reference.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    upstream = upstream.to(DEVICE)
    (reference * upstream * out_mask).sum().backward()

    features = images.permute(0, 2, 3, 1)[pixel_mask]  # (N visible pixels, 4), rows in (b, y, x) order
    coordinates = pixel_mask.nonzero().int().contiguous()  # (N, 3): batch, y, x
    out = conv(ME.SparseTensor(features, coordinates=coordinates))
    dense_out, _, _ = out.dense(shape=torch.Size(reference.shape), min_coordinate=torch.IntTensor([0, 0]))
    (dense_out * upstream.to(dtype) * out_mask).sum().backward()

    visible = out_mask.expand_as(reference)
    assert relative_error(dense_out[visible].detach().double(), reference[visible].detach()) <= tolerance
    assert relative_error(images.grad.double(), images64.grad) <= tolerance
    kernel_grad = minkowski_to_dense_kernel(conv.kernel.grad, kernel).double()
    assert relative_error(kernel_grad, weight64.grad) <= tolerance


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("stride", [2, 4])
def test_strided_sparse_conv_keeps_the_downsampled_visible_set(backend, stride):
    images, mask = _inputs(channels=4)
    conv = torch.nn.Conv2d(4, 8, kernel_size=stride, stride=stride)
    out = sparse_from_images(images, mask, backend).conv2d(conv)
    assert out.stride == stride
    dense = out.to_dense()
    reference = F.conv2d(images * mask_at_stride(mask, 1)[:, None], conv.weight, conv.bias, stride=stride)
    visible = mask_at_stride(mask, stride)[:, None].expand_as(reference)
    assert relative_error(dense[visible], reference[visible]) <= 1e-5
    assert torch.all(dense[~visible] == 0)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_unsupported_conv_geometry_is_refused(backend):
    images, mask = _inputs()
    conv = torch.nn.Conv2d(3, 4, kernel_size=3, stride=1, padding=0)
    with pytest.raises(ValueError, match="unsupported convolution geometry kernel=3 stride=1 padding=0"):
        sparse_from_images(images, mask, backend).conv2d(conv)


def test_bad_mask_shape_is_refused():
    images, _ = _inputs()
    with pytest.raises(ValueError, match=r"mask must be a \(B, 3, 4\) bool tensor"):
        sparse_from_images(images, torch.ones(2, 4, 4, dtype=torch.bool), "torch")
