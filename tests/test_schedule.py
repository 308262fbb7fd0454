"""The learning-rate schedule (utils/training/schedule.py) as a unit, and as torch's LambdaLR applies it."""

from __future__ import annotations

import math

import pytest

from utils.training.schedule import lr_lambda


def test_warmup_rises_linearly_and_never_starts_at_zero():
    f = lr_lambda("cosine", warmup=4, total=20)
    assert [f(s) for s in range(4)] == [0.2, 0.4, 0.6, 0.8]
    assert f(4) == 1.0  # the peak, right after warmup


@pytest.mark.parametrize("kind,middle", [("linear", 0.5), ("cosine", 0.5), ("constant", 1.0)])
def test_decay_after_warmup(kind, middle):
    f = lr_lambda(kind, warmup=2, total=12)
    assert f(2) == 1.0
    assert f(7) == pytest.approx(middle)  # halfway through the 10 decay steps
    assert f(12) == pytest.approx(0.0 if kind != "constant" else 1.0, abs=1e-12)


def test_cosine_follows_the_half_cosine():
    f = lr_lambda("cosine", warmup=0, total=100)
    for step in (0, 10, 25, 50, 75, 99):
        assert f(step) == pytest.approx(0.5 * (1 + math.cos(math.pi * step / 100)))
    assert f(25) > lr_lambda("linear", 0, 100)(25)  # cosine decays more slowly at first


def test_linear_never_goes_negative_past_the_end():
    assert lr_lambda("linear", 0, 10)(15) == 0.0


def test_warmup_longer_than_the_run_stays_at_peak_after_it():
    f = lr_lambda("linear", warmup=10, total=5)
    assert f(9) == pytest.approx(10 / 11) and f(10) == 1.0


def test_as_torch_applies_it():
    import torch

    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda("linear", 2, 6))
    seen = []
    for _ in range(6):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen == pytest.approx([0.1 / 3, 0.2 / 3, 0.1, 0.075, 0.05, 0.025])
