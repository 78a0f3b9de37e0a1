"""``row_group_norm`` (the norm of true-sparse rows in hash order, MinkowskiEngine's) against torch's ``group_norm``
run on each sample's rows, in float64: outputs and the gradients of the rows, weight and bias, with shuffled rows,
instance (one channel a group) and group norms, and a one-row sample."""

import pytest
import torch
import torch.nn.functional as F

from conftest import relative_error
from sparkme.sparse.row_group_norm import row_group_norm


@pytest.mark.parametrize("groups", [6, 2])
def test_row_group_norm_equals_group_norm_per_sample(groups):
    generator = torch.Generator().manual_seed(0)
    counts = torch.tensor([7, 1, 12])
    samples = torch.repeat_interleave(torch.arange(3), counts)
    order = torch.randperm(len(samples), generator=generator)  # rows in no particular order
    features = torch.randn(len(samples), 6, generator=generator, dtype=torch.float64) * 3 + 1
    weight, bias = (torch.randn(6, generator=generator, dtype=torch.float64) for _ in range(2))
    projection = torch.randn(features.shape, generator=generator, dtype=torch.float64)

    def grads(out, *inputs):
        return torch.autograd.grad((out * projection).sum(), inputs)

    f, w, b = (t.clone().requires_grad_() for t in (features, weight, bias))
    ours = row_group_norm(f[order], samples[order], counts, groups, w, b, 1e-5)
    ours_grads = grads(ours[order.argsort()], f, w, b)

    f2, w2, b2 = (t.clone().requires_grad_() for t in (features, weight, bias))
    parts, start = [], 0
    for count in counts.tolist():
        rows = f2[start:start + count]
        # torch's group_norm refuses a group of one value; its normalised value is 0, so the output is the bias
        parts.append(b2.expand(1, -1) if rows.numel() // groups == 1
                     else F.group_norm(rows.t()[None], groups, w2, b2, 1e-5)[0].t())
        start += count
    reference = torch.cat(parts)
    reference_grads = grads(reference, f2, w2, b2)
    assert relative_error(ours[order.argsort()], reference) < 1e-12
    for name, a, r in zip(("rows", "weight", "bias"), ours_grads, reference_grads):
        assert relative_error(a, r) < 1e-12, name


def test_row_group_norm_passes_gradcheck():
    generator = torch.Generator().manual_seed(1)
    samples = torch.tensor([1, 0, 1, 1, 0, 1])
    features = torch.randn(6, 4, generator=generator, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(4, generator=generator, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(4, generator=generator, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda f, w, b: row_group_norm(f, samples, torch.tensor([2, 4]), 2, w, b, 1e-3), (features, weight, bias))
