"""Fast normalised Walsh-Hadamard transforms over the last dimension.

A size ``n`` is handled as ``n = 2^p * K``: the transform is the Kronecker product
``H_K (x) H_{2^p} / sqrt(n)``, with ``H_{2^p}`` Sylvester's matrix and ``H_K`` a small
Hadamard matrix we build with Paley's constructions (``K = q + 1`` for a prime ``q = 3 mod 4``,
``K = 2(q + 1)`` for a prime ``q = 1 mod 4``). The Sylvester part runs as a mixed-radix
butterfly: the ``2^p`` axis is reshaped into a few small axes of at most 64 entries and each
is contracted with a small Sylvester matrix, so the cost is ``O(n log n)`` with a handful of
kernel launches instead of ``p``. The ``K`` part is one ``K x K`` contraction.

Sizes the Qwen2.5-1.5B backbone needs: 1536 = 12 * 128 (Paley I, q = 11), 8960 = 140 * 64
(Paley I, q = 139), 256 = 2^8. A size with no construction falls back, with a warning, to a
block-diagonal transform over its largest power-of-two factor.

Modes:
    "full": one transform over all ``n`` entries (falls back to blocks as above);
    "block128": block-diagonal, blocks of ``gcd(n, 128)`` entries (128 wherever ``n`` is a
        multiple of 128, smaller blocks for small test layers).

All transforms are orthogonal: ``hadamard_transform(hadamard_transform(x, plan), plan,
transpose=True) == x``. Random sign vectors (the ``SU`` / ``SV`` of LC-QAT) live with the
layers, not here.
"""

from __future__ import annotations

import functools
import math
import warnings
from dataclasses import dataclass

import torch
from torch import Tensor

from cheers.errors import InputError

HADAMARD_MODES = ("full", "block128")
_MAX_RADIX_BITS = 6  # butterfly stages contract axes of at most 2^6 = 64 entries


def _is_prime(q: int) -> bool:
    if q < 2:
        return False
    return all(q % d for d in range(2, math.isqrt(q) + 1))


def _jacobsthal(q: int) -> Tensor:
    """``Q[i, j] = chi(j - i)`` over GF(q), ``chi`` the quadratic character (q prime). [q, q]"""
    squares = {(x * x) % q for x in range(1, q)}
    chi = torch.tensor([0] + [1 if a in squares else -1 for a in range(1, q)], dtype=torch.float64)
    idx = torch.arange(q)
    return chi[(idx[None, :] - idx[:, None]) % q]


@functools.cache
def _small_hadamard(k: int) -> Tensor | None:
    """An unnormalised K x K Hadamard matrix (entries +-1, ``H H^T = K I``), or None if we
    have no construction for ``K``. float64 on the CPU; cached."""
    if k == 1:
        return torch.ones(1, 1, dtype=torch.float64)
    if k == 2:
        return torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    if k % 4:
        return None
    h = None
    q = k - 1
    if _is_prime(q) and q % 4 == 3:  # Paley I: H = I + [[0, 1^T], [-1, Q]]
        s = torch.zeros(k, k, dtype=torch.float64)
        s[0, 1:] = 1.0
        s[1:, 0] = -1.0
        s[1:, 1:] = _jacobsthal(q)
        h = torch.eye(k, dtype=torch.float64) + s
    q = k // 2 - 1
    if h is None and _is_prime(q) and q % 4 == 1:  # Paley II: C (x) [[1,-1],[-1,-1]] + I (x) [[1,1],[1,-1]]
        c = torch.zeros(q + 1, q + 1, dtype=torch.float64)
        c[0, 1:] = 1.0
        c[1:, 0] = 1.0
        c[1:, 1:] = _jacobsthal(q)
        a = torch.tensor([[1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64)
        b = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
        h = torch.kron(c, a) + torch.kron(torch.eye(q + 1, dtype=torch.float64), b)
    if h is None:
        return None
    if not torch.equal(h @ h.T, k * torch.eye(k, dtype=torch.float64)):  # guards the constructions
        raise AssertionError(f"Paley construction for K={k} is not a Hadamard matrix")
    return h


def _sylvester(size: int) -> Tensor:
    """Unnormalised Sylvester Hadamard matrix of a power-of-two size. [size, size] float64"""
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < size:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


@dataclass(frozen=True)
class HadamardPlan:
    """How a size-``n`` transform is built: ``n // block`` diagonal blocks of ``block`` entries,
    each ``H_k (x) H_{block // k}``."""

    n: int
    block: int
    k: int

    @property
    def pow2(self) -> int:
        return self.block // self.k

    @property
    def is_full(self) -> bool:
        return self.block == self.n


def _pow2_factor(n: int) -> int:
    return n & -n


@functools.cache
def hadamard_plan(n: int, mode: str = "full") -> HadamardPlan:
    """The plan for size ``n`` in ``mode`` ("full" or "block128"). See the module docstring."""
    if n < 1:
        raise InputError(f"Hadamard size must be positive, got {n}")
    if mode not in HADAMARD_MODES:
        raise InputError(f"unknown Hadamard mode {mode!r}; expected one of {HADAMARD_MODES}")
    two = _pow2_factor(n)
    if mode == "block128":
        return HadamardPlan(n=n, block=math.gcd(n, 128), k=1)
    odd = n // two
    k = odd
    while k <= n:  # smallest constructible K = odd * 2^j
        if _small_hadamard(k) is not None:
            return HadamardPlan(n=n, block=n, k=k)
        k *= 2
    warnings.warn(
        f"no Hadamard construction for size {n} = {two} * {odd}: using a block-diagonal "
        f"transform of {n // two} blocks of {two}",
        stacklevel=2,
    )
    return HadamardPlan(n=n, block=two, k=1)


@functools.lru_cache(maxsize=64)
def _matrices(plan: HadamardPlan, dtype: torch.dtype, device: torch.device) -> tuple[list[Tensor], Tensor]:
    """(Sylvester stage matrices, normalised K matrix). The 1/sqrt(block) is folded into H_K."""
    p = plan.pow2.bit_length() - 1
    n_stages = max(1, math.ceil(p / _MAX_RADIX_BITS)) if p else 0
    bits = [p // n_stages + (1 if i < p % n_stages else 0) for i in range(n_stages)]
    stages = [_sylvester(2**b).to(device=device, dtype=dtype) for b in bits]
    hk = _small_hadamard(plan.k)
    assert hk is not None
    hk = (hk / math.sqrt(plan.block)).to(device=device, dtype=dtype)
    return stages, hk


def hadamard_transform(x: Tensor, plan: HadamardPlan | str = "full", *, transpose: bool = False) -> Tensor:
    """``x -> H x`` over the last dimension (``H^T x`` with ``transpose``); orthogonal.

    x: ``[..., n]``; ``plan``: a ``HadamardPlan`` or a mode name (then planned for ``x``'s
    size). Runs in ``x``'s dtype; returns ``[..., n]``.
    """
    n = x.shape[-1]
    if isinstance(plan, str):
        plan = hadamard_plan(n, plan)
    if plan.n != n:
        raise InputError(f"Hadamard plan is for size {plan.n}, input has last dimension {n}")
    stages, hk = _matrices(plan, x.dtype, x.device)
    lead = x.shape[:-1]
    # [..., n] -> [M, K, r_1, ..., r_s]  (M = leading entries * number of blocks)
    radices = [s.shape[0] for s in stages]
    y = x.reshape(-1, plan.k, *radices)
    for axis, h in enumerate(stages, start=2):
        # Sylvester matrices are symmetric: contract the axis from the right with H
        y = torch.movedim(torch.movedim(y, axis, -1) @ h, -1, axis)
    if plan.k > 1:
        hk_applied = hk.T if transpose else hk
        y = _contract_k(y, hk_applied)
    else:
        y = y * hk[0, 0]
    return y.reshape(*lead, n)


def _contract_k(y: Tensor, hk: Tensor) -> Tensor:
    """``y[m, k, ...] -> sum_j hk[k, j] y[m, j, ...]``. [M, K, rest...] -> same shape"""
    m, k = y.shape[:2]
    flat = y.reshape(m, k, -1)  # [M, K, R]
    return (hk @ flat).reshape(y.shape)  # [K, K] @ [M, K, R] -> [M, K, R]


def hadamard_matrix(n: int, mode: str = "full", dtype: torch.dtype = torch.float64) -> Tensor:
    """The dense normalised transform matrix ``H`` with ``hadamard_transform(x) == x @ H.T``.
    For tests and small layers only. [n, n]"""
    eye = torch.eye(n, dtype=dtype)
    return hadamard_transform(eye, hadamard_plan(n, mode)).T


def random_signs(n: int, generator: torch.Generator | None = None) -> Tensor:
    """``n`` independent random signs (+1 / -1). [n] float32"""
    bits = torch.randint(0, 2, (n,), generator=generator)
    return bits.float() * 2.0 - 1.0
