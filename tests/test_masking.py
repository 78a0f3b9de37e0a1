import pytest
import torch

from sparkme.masking import check_image_size, mask_at_stride, num_visible, random_mask, upsample_mask


@pytest.mark.parametrize("batch", [1, 3, 8])
@pytest.mark.parametrize("grid", [(1, 1), (7, 7), (6, 8), (3, 11)])
@pytest.mark.parametrize("ratio", [0.0, 0.25, 0.6, 0.75, 0.9, 0.99])
def test_exact_visible_count_per_image(batch, grid, ratio):
    h, w = grid
    mask = random_mask(batch, h, w, ratio)
    assert mask.shape == (batch, h, w) and mask.dtype == torch.bool
    expected = max(1, round(h * w * (1 - ratio)))
    assert mask.view(batch, -1).sum(1).tolist() == [expected] * batch


def test_keep_count_formula():
    assert num_visible(7, 7, 0.6) == 20  # SparK: round(49 * 0.4)
    assert num_visible(14, 14, 0.75) == 49


def test_reproducible_under_seed_and_varies_across_seeds():
    a = random_mask(4, 7, 7, 0.6, generator=torch.Generator().manual_seed(3))
    b = random_mask(4, 7, 7, 0.6, generator=torch.Generator().manual_seed(3))
    c = random_mask(4, 7, 7, 0.6, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert not torch.equal(a[0], a[1])  # images in a batch get different masks


@pytest.mark.parametrize("bad", [-0.1, 1.0, 1.5])
def test_bad_ratio_is_refused(bad):
    with pytest.raises(ValueError, match=r"mask ratio must be in \[0, 1\)"):
        random_mask(2, 7, 7, bad)


@pytest.mark.parametrize("size", [(225, 224), (224, 100), (0, 32)])
def test_bad_image_size_is_refused(size):
    with pytest.raises(ValueError, match="multiples of the patch size 32"):
        check_image_size(*size)


def test_bad_batch_is_refused():
    with pytest.raises(ValueError, match="batch size must be >= 1, got 0"):
        random_mask(0, 7, 7, 0.6)


def test_upsample_repeats_cells():
    mask = torch.tensor([[[True, False], [False, True]]])
    up = upsample_mask(mask, 2)
    assert up.shape == (1, 4, 4)
    assert torch.equal(up[0, :2, :2], torch.ones(2, 2, dtype=torch.bool))
    assert torch.equal(up[0, :2, 2:], torch.zeros(2, 2, dtype=torch.bool))
    assert torch.equal(mask_at_stride(mask, 32), mask)
    assert mask_at_stride(mask, 4).shape == (1, 16, 16)
    with pytest.raises(ValueError, match="stride must divide the patch size 32"):
        mask_at_stride(mask, 3)
