"""The 2x2 token compressor: SigLIP patch features -> LLM tokens (4x fewer)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from cheers.weight_init import normal_linears_


class TokenCompressor(nn.Module):
    """LayerNorm, 2x2 merge (offset-major: cells (0,0),(0,1),(1,0),(1,1), each D wide), MLP.

    [B, G*G, D_sig] -> [B, (G/2)^2, D_llm]; at the reference 1024 x 1152 -> 256 x 1536.
    ``out_rms`` scales every output token to that RMS (``TokenizerConfig.compressor_out_rms``).
    """

    def __init__(self, d_in: int, d_hidden: int, d_out: int, eps: float = 1e-5, out_rms: float | None = None):
        super().__init__()
        self.layernorm = nn.LayerNorm(d_in, eps=eps)
        self.mlp = nn.Sequential(nn.Linear(4 * d_in, d_hidden), nn.GELU(), nn.Linear(d_hidden, d_out))
        self.out_rms = out_rms

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        g = int(round(feats.shape[1] ** 0.5))
        x = self.layernorm(feats.to(self.layernorm.weight.dtype))
        x = rearrange(x, "b (gi py gj px) d -> b (gi gj) (py px d)", gi=g // 2, py=2, px=2)
        x = self.mlp(x)
        if self.out_rms is not None:
            x = F.rms_norm(x, x.shape[-1:], eps=1e-6) * self.out_rms
        return x

    def init_weights(self, std: float = 0.02) -> None:
        self.layernorm.reset_parameters()
        normal_linears_(self.mlp, std=std)
