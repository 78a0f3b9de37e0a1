"""FusedLamb against timm's Lamb: the same parameters and state after several steps (schedule-like lr and weight
decay changes, a no-decay group, always_adapt), interchangeable state_dicts, and timm's path where it must be."""

import copy

import pytest
import torch
from timm.optim import Lamb, param_groups_weight_decay

from sparkme.engine.fused_lamb import FusedLamb, lamb_update


def _model(dtype):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, bias=False), torch.nn.BatchNorm2d(8), torch.nn.Flatten(),
                                torch.nn.Linear(8 * 6 * 6, 5))
    return model.to(dtype)


def _run(optimizer_class, dtype, steps=4, **kwargs):
    model = _model(dtype)
    groups = param_groups_weight_decay(model, 0.04)
    optimizer = optimizer_class(groups, lr=1e-2, betas=(0.9, 0.95), max_grad_norm=None, **kwargs)
    generator = torch.Generator().manual_seed(1)
    for step in range(steps):
        for group in optimizer.param_groups:  # what SparkSchedule does every step
            group["lr"] = 1e-2 * (step + 1) / steps
            if group["weight_decay"]:
                group["weight_decay"] = 0.04 + 0.01 * step
        x = torch.randn(4, 3, 8, 8, generator=generator, dtype=dtype)
        model(x).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return model, optimizer


@pytest.mark.parametrize("dtype, tolerance", [(torch.float64, 1e-12), (torch.float32, 2e-6)])
@pytest.mark.parametrize("compile", [False, True], ids=["eager", "compiled"])
def test_equals_timm_lamb(dtype, tolerance, compile):
    expected, expected_optimizer = _run(Lamb, dtype)
    actual, optimizer = _run(FusedLamb, dtype, compile=compile)
    for (name, e), a in zip(expected.state_dict().items(), actual.state_dict().values()):
        assert torch.allclose(a, e, rtol=tolerance, atol=tolerance), name
    for e, a in zip(expected_optimizer.state.values(), optimizer.state.values()):
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.allclose(a[key], e[key], rtol=tolerance, atol=tolerance * e[key].abs().max().item()), key


def test_trust_ratio_is_applied():
    """A parameter whose update norm differs from its own: the step is lr x ||p|| / ||u|| x u, not lr x u."""
    param, grad = torch.tensor([3.0, 4.0]), torch.tensor([1.0, 0.0])
    exp_avg, exp_avg_sq = torch.zeros(2), torch.zeros(2)
    scalars = torch.tensor([0.1, 0.9, 0.999, 0.1, 0.001**0.5, 1e-8, 0.0, 1.0])
    lamb_update(param, grad, exp_avg, exp_avg_sq, scalars)
    # m = 0.1 g, v = 0.001 g^2 -> update = g (unit norm); ||p|| = 5 -> step 0.1 x 5 x g
    assert torch.allclose(param, torch.tensor([2.5, 4.0]), atol=1e-5)


def test_state_dicts_move_between_timm_and_fused():
    model, timm_optimizer = _run(Lamb, torch.float32, steps=2)
    fused = FusedLamb(param_groups_weight_decay(model, 0.04), lr=1e-2, betas=(0.9, 0.95), compile=False)
    fused.load_state_dict(copy.deepcopy(timm_optimizer.state_dict()))
    back = Lamb(param_groups_weight_decay(model, 0.04), lr=1e-2, betas=(0.9, 0.95))
    back.load_state_dict(fused.state_dict())
    assert back.state_dict()["param_groups"][0]["step"] == 2


def test_settings_outside_pretraining_and_unfused_run_timms_step(monkeypatch):
    calls = []
    monkeypatch.setattr(FusedLamb, "_run_update", lambda self, *a: calls.append(a))
    for kwargs, fused in [(dict(caution=True), True), (dict(max_grad_norm=1.0), True), ({}, False)]:
        model = _model(torch.float32)
        optimizer = FusedLamb(model.parameters(), lr=1e-2, compile=False, **kwargs)
        optimizer.fused = fused
        model(torch.randn(2, 3, 8, 8)).sum().backward()
        before = [p.clone() for p in model.parameters()]
        optimizer.step()
        assert not calls and any(not torch.equal(b, p) for b, p in zip(before, model.parameters()))
