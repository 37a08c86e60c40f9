"""A convolutional detail stage: a one-level U-Net over the latent grid (``head.stage_b_kind="conv"``).

Not in the released head, whose stage B is a DiT. It is what a CPU-sized shapes model can
learn to draw with in minutes: 3x3 residual blocks see each cell's neighbours from the first
layer on, and every block is modulated by one condition vector (the time embedding, plus the
prompt state with ``head.prompt_condition``).

    x [B, G*G, D_in] (raster) -> conv 3x3 -> [B, W, G, G]
      -> n x ResBlock -> skip -> stride-2 conv -> n x ResBlock -> nearest 2x up
      -> concat skip -> n x ResBlock (first: 2W -> W) -> GroupNorm, SiLU, conv 3x3 -> [B, G*G, D_out]
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from cheers.errors import InputError


def _groups(channels: int) -> int:
    """The largest of 32, 16, 8, 4, 2, 1 groups that divides ``channels``."""
    return next(g for g in (32, 16, 8, 4, 2, 1) if channels % g == 0)


class ResBlock(nn.Module):
    """GroupNorm, SiLU, conv 3x3, FiLM from the condition, GroupNorm, SiLU, conv 3x3 (zero-initialised),
    plus a 1x1 skip where the width changes."""

    def __init__(self, dim_in: int, dim_out: int, cond_dim: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(_groups(dim_in), dim_in)
        self.conv1 = nn.Conv2d(dim_in, dim_out, 3, padding=1)
        self.film = nn.Linear(cond_dim, 2 * dim_out)
        self.norm2 = nn.GroupNorm(_groups(dim_out), dim_out)
        self.conv2 = nn.Conv2d(dim_out, dim_out, 3, padding=1)
        self.skip = nn.Conv2d(dim_in, dim_out, 1) if dim_in != dim_out else nn.Identity()

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """x [B, C_in, H, W], cond [B, D_cond] -> [B, C_out, H, W]."""
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = rearrange(self.film(F.silu(cond)), "b (two c) -> two b c 1 1", two=2)
        h = self.norm2(h) * (1 + scale) + shift
        return self.skip(x) + self.conv2(F.silu(h))

    def init_weights(self) -> None:
        for m in (self.conv1, self.film, self.skip):
            if not isinstance(m, nn.Identity):
                m.reset_parameters()
        self.norm1.reset_parameters()
        self.norm2.reset_parameters()
        nn.init.zeros_(self.conv2.weight)  # the block starts as its skip path
        nn.init.zeros_(self.conv2.bias)


class ConvStage(nn.Module):
    """``x [B, G*G, D_in]`` on a square raster grid (G even) -> ``[B, G*G, D_out]``."""

    def __init__(self, *, dim_in: int, width: int, out_dim: int, blocks_per_level: int, cond_dim: int):
        super().__init__()
        self.conv_in = nn.Conv2d(dim_in, width, 3, padding=1)
        self.enc = nn.ModuleList(ResBlock(width, width, cond_dim) for _ in range(blocks_per_level))
        self.down = nn.Conv2d(width, width, 3, stride=2, padding=1)
        self.mid = nn.ModuleList(ResBlock(width, width, cond_dim) for _ in range(blocks_per_level))
        self.dec = nn.ModuleList(ResBlock(2 * width if i == 0 else width, width, cond_dim)
                                 for i in range(blocks_per_level))
        self.norm_out = nn.GroupNorm(_groups(width), width)
        self.conv_out = nn.Conv2d(width, out_dim, 3, padding=1)

    def forward(self, x: torch.Tensor, cond: torch.Tensor, side: int) -> torch.Tensor:
        """x [B, side*side, D_in] (raster), cond [B, D_cond] -> [B, side*side, D_out]."""
        if side % 2 or x.shape[1] != side * side:
            raise InputError(f"the conv stage needs an even square grid, got {x.shape[1]} tokens for side {side}")
        h = self.conv_in(rearrange(x, "b (h w) d -> b d h w", h=side))
        for block in self.enc:
            h = block(h, cond)
        skip = h
        h = self.down(h)  # [B, W, G/2, G/2]
        for block in self.mid:
            h = block(h, cond)
        h = torch.cat([F.interpolate(h, scale_factor=2.0, mode="nearest"), skip], dim=1)
        for block in self.dec:
            h = block(h, cond)
        out = self.conv_out(F.silu(self.norm_out(h)))
        return rearrange(out, "b d h w -> b (h w) d")

    def init_weights(self) -> None:
        for m in (self.conv_in, self.down, self.norm_out):
            m.reset_parameters()
        for block in (*self.enc, *self.mid, *self.dec):
            block.init_weights()
        nn.init.zeros_(self.conv_out.weight)  # the stage's output is the prediction itself
        nn.init.zeros_(self.conv_out.bias)
