"""The correctly rounded square root and the AdamW built on it: IEEE-exact roots, and
otherwise torch's AdamW update and state."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from raysweep.reproducible import CorrectlyRoundedAdamW, exact_sqrt
from raysweep.spec import PhaseConfig
from raysweep.train import _torch_optimizer


def _correctly_rounded(values: torch.Tensor) -> torch.Tensor:
    # A float32 square root computed in float64 and rounded once is the correctly rounded one.
    return values.double().sqrt().to(values.dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_exact_sqrt_is_correctly_rounded(dtype):
    values = (torch.rand(200_000, generator=torch.Generator().manual_seed(0)) * 10).to(dtype)
    tiny = torch.tensor([0.0, 1e-30, 1e-12, 3.4e38], dtype=torch.float32).to(dtype)
    for v in (values, tiny, values[::3]):
        got = exact_sqrt(v)
        assert got.dtype == dtype
        assert torch.equal(got, _correctly_rounded(v))


def _train(model, optimizer, steps: int = 40) -> None:
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        model(torch.randn(8, 16, generator=gen)).pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad()


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 4))


def test_adamw_follows_torch_adamw_and_takes_exact_roots():
    ours, theirs = _model(), _model()
    a = CorrectlyRoundedAdamW(ours.parameters(), lr=3e-3, weight_decay=0.01)
    b = torch.optim.AdamW(theirs.parameters(), lr=3e-3, weight_decay=0.01)
    _train(ours, a)
    _train(theirs, b)
    for p, q in zip(ours.parameters(), theirs.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6)
    # Replaying the last step by hand with a float64 root gives the very same bits.
    model = _model()
    opt = CorrectlyRoundedAdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    _train(model, opt, steps=1)
    first = next(model.parameters())
    state = opt.state[first]
    before = _model()[0].weight.detach().clone()
    expected = before.mul(1 - 3e-3 * 0.01).addcdiv_(
        state["exp_avg"], _correctly_rounded(state["exp_avg_sq"]) / np.sqrt(1 - 0.999) + 1e-8, value=-3e-3 / 0.1
    )
    assert torch.equal(first.detach(), expected)


def test_adamw_state_is_torch_state():
    ours, theirs = _model(), _model()
    b = torch.optim.AdamW(theirs.parameters(), lr=1e-3)
    _train(theirs, b, steps=5)
    ours.load_state_dict(theirs.state_dict())
    a = CorrectlyRoundedAdamW(ours.parameters(), lr=1e-3)
    a.load_state_dict(copy.deepcopy(b.state_dict()))
    _train(ours, a, steps=3)
    _train(theirs, b, steps=3)
    for p, q in zip(ours.parameters(), theirs.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6)
    assert set(a.state_dict()["state"][0]) == set(b.state_dict()["state"][0])


def test_cpu_trials_take_the_correctly_rounded_adamw():
    opt = _torch_optimizer(_model(), PhaseConfig(lr=1e-3, optimizer="adamw"))
    assert isinstance(opt, CorrectlyRoundedAdamW)
    with pytest.raises(ValueError, match="plain AdamW"):
        CorrectlyRoundedAdamW(_model().parameters(), amsgrad=True)
