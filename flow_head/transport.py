"""Flow-matching maths: time convention, time sampling, interpolation, loss and ODE samplers.

The one time convention of the project (the network never sees another):

    x1 = clean data latent, x0 ~ N(0, I) noise,
    xt = t * x1 + (1 - t) * x0,   velocity target v = x1 - x0,   t = 1 is clean.

The network (``flow_head/model.py``) only predicts; everything about ``t`` lives here.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from cheers.config import SAMPLERS, TransportConfig
from cheers.errors import InputError

VelocityFn = Callable[[torch.Tensor, float], torch.Tensor]


def interpolate(x1: torch.Tensor, x0: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``xt = t x1 + (1 - t) x0``; ``t`` [N] broadcasts over the trailing dims of ``x1`` [N, ...]."""
    t = t.reshape(-1, *([1] * (x1.dim() - 1))).to(x1.dtype)
    return t * x1 + (1 - t) * x0


def velocity_target(x1: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
    """The velocity of the straight path, pointing from noise to data: ``x1 - x0``."""
    return x1 - x0


def velocity_from_x1(x1_pred: torch.Tensor, xt: torch.Tensor, t: torch.Tensor, t_min: float = 0.05):
    """Velocity implied by a clean-data prediction: ``(x1_pred - xt) / (1 - t)``.

    ``1 - t`` is clamped at ``t_min`` so the conversion stays finite near t = 1.
    """
    t = t.reshape(-1, *([1] * (xt.dim() - 1))).to(xt.dtype)
    return (x1_pred - xt) / (1 - t).clamp_min(t_min)


def x1_from_velocity(v: torch.Tensor, xt: torch.Tensor, t: torch.Tensor, t_min: float = 0.05):
    """The clean latent a velocity implies: ``xt + max(1 - t, t_min) v``, the inverse of
    ``velocity_from_x1``."""
    t = t.reshape(-1, *([1] * (xt.dim() - 1))).to(xt.dtype)
    return xt + (1 - t).clamp_min(t_min) * v


def flow_loss(v_pred: torch.Tensor, x1: torch.Tensor, x0: torch.Tensor, *, target: str = "velocity",
              t: torch.Tensor | None = None, t_min: float = 0.05) -> torch.Tensor:
    """Mean squared error (over all elements) of the predicted velocity against ``x1 - x0``
    (``target="velocity"``), or of the clean latent it implies against ``x1`` (``"x1"``, which
    needs ``t``)."""
    if target == "velocity":
        return F.mse_loss(v_pred.float(), velocity_target(x1, x0).float())
    if target != "x1":
        raise InputError(f"unknown flow loss target {target!r}; use 'velocity' or 'x1'")
    if t is None:
        raise InputError("the x1 flow loss needs the times t")
    xt = interpolate(x1, x0, t)
    return F.mse_loss(x1_from_velocity(v_pred.float(), xt.float(), t, t_min), x1.float())


def time_shift(t: torch.Tensor | float, a: float):
    """``shift(t) = a t / (1 + (a - 1) t)``: a < 1 spends more steps near the noise end (t = 0)."""
    return a * t / (1 + (a - 1) * t)


def sample_time(n: int, cfg: TransportConfig, *, generator: torch.Generator | None = None,
                device: torch.device | str = "cpu") -> torch.Tensor:
    """Training times ``t`` [n] in [0, 1] by ``cfg.time_sampling``."""
    if cfg.time_sampling == "uniform":
        return torch.rand(n, generator=generator, device=device)
    if cfg.time_sampling == "shifted":
        return time_shift(torch.rand(n, generator=generator, device=device), cfg.train_shift)
    raise InputError(f"unknown time_sampling {cfg.time_sampling!r}")


def time_grid(steps: int, shift: float, start: float = 0.0) -> list[float]:
    """``steps`` times from ``start`` to 1 (both included), warped by ``time_shift``."""
    if steps < 1:
        raise InputError(f"steps must be >= 1, got {steps}")
    if steps == 1:
        return [float(time_shift(start, shift))]
    lin = torch.linspace(start, 1.0, steps, dtype=torch.float64)
    return [float(v) for v in time_shift(lin, shift)]


def sample_ode(velocity: VelocityFn, x: torch.Tensor, *, steps: int, shift: float,
               sampler: str = "euler", t_start: float = 0.0, official_last_step: bool = True,
               callback: Callable[[int], None] | None = None) -> torch.Tensor:
    """Integrate ``dx/dt = velocity(x, t)`` from ``t_start`` to 1.

    ``euler``: the official Cheers sampler. The time grid is ``time_shift(linspace(t_start, 1, steps))``;
    each step evaluates the velocity once. With ``official_last_step`` the velocity predicted at
    t = 1 is still applied, as one extra step of size ``1 / steps`` (what the released code does);
    without it the last evaluation is skipped, and the sampler is plain Euler over the grid.
    ``heun``: second order (two evaluations per interval), ends exactly at t = 1.
    ``callback(n)`` is called ``steps`` times, n = 0 .. steps - 1, the last once x has reached
    t = 1, whatever the sampler, so a progress bar of ``steps`` ends at its total.
    """
    if sampler not in SAMPLERS:
        raise InputError(f"unknown sampler {sampler!r}; use one of {', '.join(SAMPLERS)}")
    grid = time_grid(steps, shift, t_start)
    if sampler == "euler":
        for n, t in enumerate(grid):
            last = n == len(grid) - 1
            if last and not official_last_step and len(grid) > 1:
                if callback:  # x is at t = 1 already
                    callback(n)
                break
            v = velocity(x, t)
            dt = (1.0 / steps) if (last or t == 1.0) else grid[n + 1] - t
            x = x + v * dt
            if callback:
                callback(n)
        return x
    for n in range(len(grid) - 1):
        t, t_next = grid[n], grid[n + 1]
        v = velocity(x, t)
        x_euler = x + v * (t_next - t)
        v_next = velocity(x_euler, t_next)
        x = x + 0.5 * (v + v_next) * (t_next - t)
        if callback:
            callback(n)
    if callback:  # steps - 1 intervals: the last call marks t = 1 reached
        callback(len(grid) - 1)
    return x


def guidance_scale(t: float | torch.Tensor, scale: float, interval: Sequence[float]) -> float | torch.Tensor:
    """The classifier-free guidance scale at time ``t``: ``scale`` for ``lo <= t <= hi``, else 1
    (the conditional velocity alone). ``t`` may be a 0-dim tensor (a captured graph's input);
    the answer is then a tensor too, chosen without a host sync."""
    lo, hi = interval
    if torch.is_tensor(t):
        inside = (t >= lo) & (t <= hi)
        return torch.where(inside, torch.full_like(t, scale), torch.ones_like(t))
    return scale if lo <= t <= hi else 1.0


def timestep_frequencies(dim: int, max_period: float = 10000.0, device: torch.device | str | None = None) -> torch.Tensor:
    """Frequencies of the sinusoidal time embedding: ``exp(-ln(max_period) i / (dim/2))``."""
    half = dim // 2
    return torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=device) / half)
