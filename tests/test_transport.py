"""The flow-matching convention: x1 data, x0 noise, xt = t x1 + (1 - t) x0, v = x1 - x0, t = 1 clean."""

from __future__ import annotations

import pytest
import torch

from cheers.config import TransportConfig
from cheers.errors import InputError
from cheers.flow_head import transport


def test_interpolation_endpoints():
    x1, x0 = torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2)
    assert torch.equal(transport.interpolate(x1, x0, torch.ones(3)), x1)
    assert torch.equal(transport.interpolate(x1, x0, torch.zeros(3)), x0)
    mid = transport.interpolate(x1, x0, torch.tensor([0.25, 0.5, 0.75]))
    torch.testing.assert_close(mid[1], 0.5 * (x1[1] + x0[1]))


def test_loss_is_zero_at_true_velocity():
    x1, x0 = torch.randn(2, 8), torch.randn(2, 8)
    assert transport.flow_loss(x1 - x0, x1, x0).item() == 0.0
    assert transport.flow_loss(torch.zeros(2, 8), x1, x0).item() > 0


def test_x1_loss_weighs_the_velocity_error_by_one_minus_t_squared():
    x1, x0 = torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2)
    t = torch.tensor([0.1, 0.5, 0.7])  # all below 1 - t_min
    assert transport.flow_loss(x1 - x0, x1, x0, target="x1", t=t).item() < 1e-12
    v = torch.randn_like(x1)
    weight = (1 - t).reshape(-1, 1, 1, 1) ** 2
    expected = (weight * (v - (x1 - x0)) ** 2).mean()
    torch.testing.assert_close(transport.flow_loss(v, x1, x0, target="x1", t=t), expected)
    # past 1 - t_min the clamp of velocity_from_x1 applies, so the x1 a velocity implies is exact
    # for an x1-predicting head at every t
    x1_pred = torch.randn_like(x1)
    t = torch.tensor([0.2, 0.97, 1.0])
    xt = transport.interpolate(x1, x0, t)
    v = transport.velocity_from_x1(x1_pred, xt, t, t_min=0.05)
    torch.testing.assert_close(transport.x1_from_velocity(v, xt, t, t_min=0.05), x1_pred)
    torch.testing.assert_close(transport.flow_loss(v, x1, x0, target="x1", t=t, t_min=0.05),
                               ((x1_pred - x1) ** 2).mean())
    with pytest.raises(InputError, match="needs the times"):
        transport.flow_loss(v, x1, x0, target="x1")
    with pytest.raises(InputError, match="unknown flow loss target"):
        transport.flow_loss(v, x1, x0, target="noise", t=t)


@pytest.mark.parametrize("sampler,steps", [("euler", 10), ("heun", 5)])
def test_integrating_the_exact_velocity_reaches_the_data(sampler, steps):
    x1, x0 = torch.randn(4, 3), torch.randn(4, 3)
    # on the straight path the velocity is constant: x1 - x0, whatever (x, t)
    out = transport.sample_ode(lambda x, t: x1 - x0, x0, steps=steps, shift=0.5, sampler=sampler,
                               official_last_step=False)
    torch.testing.assert_close(out, x1)


def test_velocity_depending_on_state_reaches_the_data():
    x1, x0 = torch.randn(4, 3), torch.randn(4, 3)

    # the field of the straight path written in terms of (x, t): v = (x1 - x) / (1 - t)
    def v(x, t):
        return (x1 - x) / max(1 - t, 1e-9) if t < 1 else x1 - x0

    out = transport.sample_ode(v, x0, steps=20, shift=1.0, official_last_step=False)
    torch.testing.assert_close(out, x1, atol=1e-5, rtol=1e-5)


def test_official_grid_and_last_step():
    assert transport.time_grid(3, 0.5) == pytest.approx([0.0, 1 / 3, 1.0])
    seen = []
    x = transport.sample_ode(lambda x, t: (seen.append(t), torch.ones_like(x))[1], torch.zeros(1),
                             steps=3, shift=0.5)
    assert seen == pytest.approx([0.0, 1 / 3, 1.0])
    # the official sampler applies the t = 1 velocity as one more step of 1/N
    assert x.item() == pytest.approx(1.0 + 1 / 3)


@pytest.mark.parametrize("sampler,official_last_step", [("euler", True), ("euler", False), ("heun", False)])
@pytest.mark.parametrize("steps", [1, 2, 20])
def test_progress_callback_counts_every_step_once(sampler, official_last_step, steps):
    """A progress bar of ``steps`` ends at its total with every sampler (it stopped at 19 of 20)."""
    calls, evaluations = [], []

    def velocity(x, t):
        evaluations.append(t)
        return torch.ones_like(x)

    transport.sample_ode(velocity, torch.zeros(1), steps=steps, shift=1.0, sampler=sampler,
                         official_last_step=official_last_step, callback=calls.append)
    assert calls == list(range(steps))
    assert len(evaluations) == {"euler": steps if official_last_step or steps == 1 else steps - 1,
                                "heun": 2 * (steps - 1)}[sampler]


def test_time_shift_and_sampling():
    assert transport.time_shift(0.5, 1.0) == 0.5
    assert transport.time_shift(0.5, 0.5) == pytest.approx(1 / 3)
    for mode in ("uniform", "shifted"):
        t = transport.sample_time(1000, TransportConfig(time_sampling=mode, train_shift=3.0),
                                  generator=torch.Generator().manual_seed(0))
        assert t.min() >= 0 and t.max() <= 1
    with pytest.raises(InputError, match="steps must be >= 1"):
        transport.time_grid(0, 0.5)
    with pytest.raises(InputError, match="unknown sampler 'rk4'"):
        transport.sample_ode(lambda x, t: x, torch.zeros(1), steps=2, shift=1.0, sampler="rk4")


def test_x1_prediction_gives_the_velocity():
    x1, x0 = torch.randn(2, 4, 2, 2), torch.randn(2, 4, 2, 2)
    t = torch.tensor([0.2, 0.7])
    xt = transport.interpolate(x1, x0, t)
    torch.testing.assert_close(transport.velocity_from_x1(x1, xt, t), x1 - x0, atol=1e-5, rtol=1e-5)


def test_guidance_scale_only_inside_its_interval():
    assert transport.guidance_scale(0.3, 4.0, [0.4, 1.0]) == 1.0
    assert transport.guidance_scale(0.4, 4.0, [0.4, 1.0]) == 4.0  # both ends included
    assert transport.guidance_scale(1.0, 4.0, [0.4, 1.0]) == 4.0
    assert transport.guidance_scale(0.9, 4.0, [0.0, 0.8]) == 1.0
    # a 0-dim tensor time (what a captured graph reads) gives a tensor, same values
    for t, want in ((0.3, 1.0), (0.5, 4.0)):
        got = transport.guidance_scale(torch.tensor(t), 4.0, [0.4, 1.0])
        assert torch.is_tensor(got) and got.item() == want


@pytest.mark.parametrize("interval", [[0.5], [0.6, 0.4], [-0.1, 1.0], [0.0, 1.5]])
def test_cfg_interval_is_checked(interval):
    from cheers.errors import ConfigError

    with pytest.raises(ConfigError, match=r"transport\.cfg_interval"):
        TransportConfig(cfg_interval=interval)
