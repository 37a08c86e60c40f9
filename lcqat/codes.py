"""The byte layout of LC-QAT codes: four 2-bit codes per byte, the first in the lowest bits.

Shared by the packed format (``pack``) and the inference kernels (``kernels``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from cheers.errors import InputError

from .lcq_linear import VEC


def pack_codes(z: Tensor) -> Tensor:
    """Codes [m, n] in {0..3} -> bytes [m, n/4] uint8 (4 codes per byte, first code lowest)."""
    if z.shape[-1] % VEC:
        raise InputError(
            f"cannot pack codes of shape {tuple(z.shape)}: last size not a multiple of 4"
        )
    if z.numel() and int(z.max()) > 3:
        raise InputError(f"codes must lie in 0..3, found {int(z.max())}")
    z = z.to(torch.uint8).reshape(*z.shape[:-1], -1, VEC)  # [m, n/4, 4]
    return z[..., 0] | (z[..., 1] << 2) | (z[..., 2] << 4) | (z[..., 3] << 6)


def unpack_codes(packed: Tensor) -> Tensor:
    """Bytes [m, n/4] uint8 -> codes [m, n] uint8."""
    parts = [(packed >> (2 * i)) & 3 for i in range(VEC)]
    return torch.stack(parts, dim=-1).reshape(*packed.shape[:-1], -1)
