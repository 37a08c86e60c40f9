"""Scalar 2-bit baselines LC-QAT is measured against, at equal data.

- Round-to-nearest (RTN): per output row and group of ``g`` inputs, asymmetric min/max with
  4 levels ``min + q * (max - min) / 3``, ``q`` in {0..3}. Stored cost: 2 bits per weight plus
  an fp16 scale and an fp16 minimum per group (g64: 2.5 bits, g128: 2.25 bits).
- GPTQ with the same grid: columns rounded left to right with Hessian error feedback; each
  group's grid is set from the (already updated) weights when the group starts.
- LSQ-style scalar QAT: a learned step and offset per group, straight-through rounding, the
  LSQ gradient scale ``1 / sqrt(g * Q_p)`` on the step.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from cheers.errors import InputError

from .lcq_linear import DEFAULT_EXCLUDE, select_linears, set_submodule

LEVELS = 4  # 2 bits
SCALE_BITS = 16  # fp16 scale and minimum per group


def _check_groups(n: int, group_size: int, name: str = "") -> None:
    if group_size <= 0 or n % group_size:
        raise InputError(
            f"layer {name!r}: input size {n} is not a multiple of the group size {group_size}"
        )


def grid_from_minmax(w: Tensor) -> tuple[Tensor, Tensor]:
    """Step and minimum of the 4-level grid spanning each row of ``w`` [..., g] -> ([...], [...])."""
    lo, hi = w.amin(-1), w.amax(-1)
    scale = ((hi - lo) / (LEVELS - 1)).clamp_min(1e-10)
    return scale, lo


def quantize_to_grid(w: Tensor, scale: Tensor, lo: Tensor) -> Tensor:
    """Codes ``clamp(round((w - lo) / scale), 0, 3)`` for ``w`` [..., g] with per-row grids [...]."""
    return torch.clamp(torch.round((w - lo[..., None]) / scale[..., None]), 0, LEVELS - 1)


@torch.no_grad()
def rtn_quantize(w: Tensor, group_size: int = 64) -> tuple[Tensor, Tensor, Tensor]:
    """Round-to-nearest 2-bit with group min/max. w: [m, n] -> codes [m, n] uint8,
    scale [m, n/g], minimum [m, n/g] (float32)."""
    m, n = w.shape
    _check_groups(n, group_size)
    wg = w.float().reshape(m, n // group_size, group_size)  # [m, G, g]
    scale, lo = grid_from_minmax(wg)
    codes = quantize_to_grid(wg, scale, lo)
    return codes.reshape(m, n).to(torch.uint8), scale, lo


def dequantize_groups(codes: Tensor, scale: Tensor, lo: Tensor) -> Tensor:
    """codes [m, n], scale / minimum [m, G] -> weights [m, n] float32."""
    m, n = codes.shape
    g = n // scale.shape[1]
    wg = codes.float().reshape(m, -1, g) * scale[..., None] + lo[..., None]
    return wg.reshape(m, n)


@torch.no_grad()
def gptq_quantize(w: Tensor, hessian: Tensor, group_size: int = 64, damp: float = 0.01, block: int = 128) -> tuple[Tensor, Tensor, Tensor]:
    """GPTQ onto the 2-bit group grid: minimise ``tr((W^ - W) H (W^ - W)^T)`` column by column.

    w: [m, n]; hessian: undamped ``E[x x^T]`` [n, n]. Returns like ``rtn_quantize``.
    """
    m, n = w.shape
    _check_groups(n, group_size)
    w = w.float().clone()
    h = hessian.float().clone()
    dead = torch.diagonal(h) == 0  # inputs never seen: no information, keep them out of the solve
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    h += damp * torch.diagonal(h).mean() * torch.eye(n, device=h.device)
    # upper Cholesky factor of H^-1: row j holds the feedback of column j onto later columns
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    codes = torch.zeros(m, n, dtype=torch.uint8, device=w.device)
    scales = torch.zeros(m, n // group_size, device=w.device)
    mins = torch.zeros_like(scales)
    for b0 in range(0, n, block):
        b1 = min(b0 + block, n)
        err = torch.zeros(m, b1 - b0, device=w.device)
        for j in range(b0, b1):
            if j % group_size == 0:  # the group's grid comes from its current (updated) weights
                g = j // group_size
                scales[:, g], mins[:, g] = grid_from_minmax(w[:, j : j + group_size])
            g = j // group_size
            q = quantize_to_grid(w[:, j : j + 1], scales[:, g], mins[:, g])[:, 0]  # [m]
            codes[:, j] = q.to(torch.uint8)
            e = (w[:, j] - (q * scales[:, g] + mins[:, g])) / hinv[j, j]
            w[:, j + 1 : b1] -= e[:, None] * hinv[j, j + 1 : b1][None, :]
            err[:, j - b0] = e
        w[:, b1:] -= err @ hinv[b0:b1, b1:]
    return codes, scales, mins


class ScalarQuantLinear(nn.Module):
    """A linear layer with a 2-bit group-quantized weight (RTN or GPTQ). x: [..., n] -> [..., m]

    Buffers: ``codes`` [m, n] uint8 in {0..3} (unpacked: the cost below counts 2 bits),
    ``scale`` and ``minimum`` [m, n/g], optional ``bias`` [m].
    """

    def __init__(self, in_features: int, out_features: int, group_size: int, bias: bool = True, method: str = "rtn") -> None:
        super().__init__()
        _check_groups(in_features, group_size)
        self.in_features, self.out_features, self.group_size, self.method = in_features, out_features, group_size, method
        n_groups = in_features // group_size
        self.register_buffer("codes", torch.zeros(out_features, in_features, dtype=torch.uint8))
        self.register_buffer("scale", torch.zeros(out_features, n_groups))
        self.register_buffer("minimum", torch.zeros(out_features, n_groups))
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, method={self.method}, g={self.group_size}"

    @classmethod
    def from_quantized(cls, linear: nn.Linear, codes: Tensor, scale: Tensor, lo: Tensor, method: str) -> ScalarQuantLinear:
        group = linear.in_features // scale.shape[1]
        q = cls(linear.in_features, linear.out_features, group, linear.bias is not None, method).to(linear.weight.device)
        q.codes.copy_(codes)
        q.scale.copy_(scale)
        q.minimum.copy_(lo)
        if linear.bias is not None:
            q.bias.copy_(linear.bias.detach().float())
        return q

    def dequantized_weight(self) -> Tensor:
        """[m, n] float32"""
        return dequantize_groups(self.codes, self.scale, self.minimum)

    def forward(self, x: Tensor) -> Tensor:
        w = self.dequantized_weight().to(x.dtype)
        return nn.functional.linear(x, w, None if self.bias is None else self.bias.to(x.dtype))

    def bits_per_weight(self) -> float:
        """2 bits per weight plus an fp16 scale and minimum per group."""
        return math.log2(LEVELS) + 2 * SCALE_BITS / self.group_size


# --------------------------------------------------------------------------- LSQ QAT


class _RoundSTE(torch.autograd.Function):
    """``round`` forward, identity backward (the straight-through estimator)."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:  # type: ignore[override]
        return torch.round(x)

    @staticmethod
    def backward(ctx, g: Tensor) -> Tensor:  # type: ignore[override]
        return g


def _grad_scale(x: Tensor, scale: float) -> Tensor:
    """Value ``x``, gradient times ``scale``."""
    return (x - x * scale).detach() + x * scale


class LSQLinear(nn.Module):
    """Scalar 2-bit QAT linear in the style of LSQ(+): a learned step and offset per group.

    ``W^ = beta + s * (clamp(round((W - beta) / s - 0.5), -2, 1) + 0.5)``: the 4 levels
    ``beta + {-1.5, -0.5, 0.5, 1.5} s``, the RTN min/max grid at initialisation. Rounding is
    straight-through; the step's gradient is scaled by ``1 / sqrt(g * Q_p)`` (Q_p = 1) as in LSQ.
    Parameters: ``weight`` [m, n] (latent), ``step``, ``offset`` [m, n/g], ``bias`` [m].
    """

    def __init__(self, in_features: int, out_features: int, group_size: int = 64, bias: bool = True) -> None:
        super().__init__()
        _check_groups(in_features, group_size)
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        n_groups = in_features // group_size
        self.weight = nn.Parameter(torch.zeros(out_features, in_features))
        self.step = nn.Parameter(torch.ones(out_features, n_groups))
        self.offset = nn.Parameter(torch.zeros(out_features, n_groups))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: nn.Linear, group_size: int = 64) -> LSQLinear:
        m, n = linear.out_features, linear.in_features
        q = cls(n, m, group_size, linear.bias is not None).to(linear.weight.device)
        w = linear.weight.detach().float()
        q.weight.copy_(w)
        scale, lo = grid_from_minmax(w.reshape(m, n // group_size, group_size))
        q.step.copy_(scale)
        q.offset.copy_(lo + 1.5 * scale)
        if linear.bias is not None:
            q.bias.copy_(linear.bias.detach().float())
        return q

    def quantized_weight(self) -> Tensor:
        """The fake-quantized weight (differentiable through the STE). [m, n]"""
        m, n = self.weight.shape
        g = self.group_size
        s = _grad_scale(self.step, 1.0 / math.sqrt(g)).abs().clamp_min(1e-8)[..., None]  # [m, G, 1]
        beta = self.offset[..., None]
        v = (self.weight.reshape(m, n // g, g) - beta) / s
        q = torch.clamp(_RoundSTE.apply(v - 0.5), -2, 1) + 0.5
        return (q * s + beta).reshape(m, n)

    def codes(self) -> Tensor:
        """Integer levels in {0..3}. [m, n] uint8"""
        with torch.no_grad():
            m, n = self.weight.shape
            g = self.group_size
            v = (self.weight.reshape(m, n // g, g) - self.offset[..., None]) / self.step.abs().clamp_min(1e-8)[..., None]
            return (torch.clamp(torch.round(v - 0.5), -2, 1) + 2).reshape(m, n).to(torch.uint8)

    def forward(self, x: Tensor) -> Tensor:
        w = self.quantized_weight().to(x.dtype)
        return nn.functional.linear(x, w, None if self.bias is None else self.bias.to(x.dtype))

    def bits_per_weight(self) -> float:
        return math.log2(LEVELS) + 2 * SCALE_BITS / self.group_size


def apply_lsq(
    model: nn.Module,
    group_size: int = 64,
    include: list[str] | tuple[str, ...] | None = None,
    exclude: list[str] | tuple[str, ...] | None = DEFAULT_EXCLUDE,
) -> list[str]:
    """Swap the selected ``nn.Linear`` layers for ``LSQLinear`` (in place); layers whose input
    size is not a multiple of ``group_size`` are left alone. Returns the swapped names."""
    swapped = []
    for name, lin in select_linears(model, include, exclude):
        if lin.in_features % group_size:
            continue
        set_submodule(model, name, LSQLinear.from_linear(lin, group_size))
        swapped.append(name)
    return swapped
