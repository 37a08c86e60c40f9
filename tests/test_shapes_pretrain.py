"""The shared pretraining loop of the shapes world's VAE and semantic encoder."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from cheers.errors import InputError
from cheers.shapes.pretrain import pretrain


def _fit(steps=None, seconds=None):
    w = nn.Parameter(torch.zeros(3))
    target = torch.tensor([1.0, -2.0, 3.0])
    seen: list[int] = []

    def loss_fn(step):
        seen.append(step)
        loss = (w - target).square().sum()
        return loss, loss.detach() * 2  # the curve holds the second value

    return w, seen, pretrain(loss_fn, [w], lr=0.1, steps=steps, seconds=seconds)


def test_a_step_budget_runs_exactly_that_many_steps_and_learns():
    w, seen, losses = _fit(steps=200)
    assert seen == list(range(200)) and len(losses) == 200
    assert losses[-1] < 1e-3 * losses[0]
    assert losses[0] == pytest.approx(2 * 14.0)  # the logged value, not the loss
    w2, _, losses2 = _fit(steps=200)
    assert torch.equal(w, w2) and losses == losses2  # a step budget is deterministic


def test_the_learning_rate_decays_to_zero_over_the_steps():
    w = nn.Parameter(torch.zeros(1))
    values: list[float] = []

    def loss_fn(step):
        values.append(float(w.detach()))
        return w.sum()  # gradient 1 at every step: each AdamW move equals that step's lr

    pretrain(loss_fn, [w], lr=1.0, steps=4)
    values.append(float(w.detach()))
    moves = [values[k] - values[k + 1] for k in range(4)]
    want = [0.5 * (1 + math.cos(math.pi * k / 4)) for k in range(4)]
    assert moves == pytest.approx(want, rel=1e-5)


def test_a_time_budget_stops():
    _, seen, losses = _fit(seconds=0.2)
    assert len(losses) == len(seen) >= 1


@pytest.mark.parametrize("kwargs, match", [
    ({}, "needs a budget"),
    ({"steps": 0}, "steps=0"),
    ({"seconds": -1.0}, "seconds=-1.0"),
    ({"seconds": float("nan")}, "seconds=nan"),
])
def test_a_bad_budget_is_refused(kwargs, match):
    w = nn.Parameter(torch.zeros(1))
    with pytest.raises(InputError, match=match):
        pretrain(lambda step: w.sum(), [w], lr=0.1, **kwargs)
