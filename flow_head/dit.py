"""adaLN-Zero DiT blocks of the flow head: RMSNorm, GQA attention with RoPE, SwiGLU MLP."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from cheers.llm import RMSNorm, apply_rope, rope_cos_sin


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``x (1 + scale) + shift`` in fp32 (the official head does this in fp32)."""
    return (x.float() * (1 + scale.float()) + shift.float()).to(x.dtype)


class HeadAttention(nn.Module):
    """Bidirectional GQA self-attention with RoPE and no biases."""

    def __init__(self, dim: int, heads: int, kv_heads: int):
        super().__init__()
        self.heads, self.kv_heads = heads, kv_heads
        self.head_dim = dim // heads
        self.q_proj = nn.Linear(dim, heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(dim, kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(dim, kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(heads * self.head_dim, dim, bias=False)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        q = rearrange(self.q_proj(x), "b n (h d) -> b h n d", h=self.heads)
        k = rearrange(self.k_proj(x), "b n (h d) -> b h n d", h=self.kv_heads)
        v = rearrange(self.v_proj(x), "b n (h d) -> b h n d", h=self.kv_heads)
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        out = F.scaled_dot_product_attention(q, k, v, enable_gqa=self.heads != self.kv_heads)
        return self.o_proj(rearrange(out, "b h n d -> b n (h d)"))


class SwiGLU(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DiTBlock(nn.Module):
    """adaLN-Zero block: 6-way modulation [shift, scale, gate] x [attention, MLP] from ``temb``."""

    def __init__(self, dim: int, heads: int, kv_heads: int, mlp_ratio: int, eps: float):
        super().__init__()
        self.input_layernorm = RMSNorm(dim, eps)
        self.attn = HeadAttention(dim, heads, kv_heads)
        self.post_attention_layernorm = RMSNorm(dim, eps)
        self.mlp = SwiGLU(dim, mlp_ratio * dim)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x: torch.Tensor, temb: torch.Tensor, rope) -> torch.Tensor:
        """x [B, N, D], temb [B, 1, D] -> [B, N, D]."""
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = self.adaLN_modulation(temb).chunk(6, dim=-1)
        x = x + gate_a * self.attn(modulate(self.input_layernorm(x), shift_a, scale_a), rope)
        x = x + gate_m * self.mlp(modulate(self.post_attention_layernorm(x), shift_m, scale_m))
        return x


class FinalLayer(nn.Module):
    """RMSNorm, modulation by [shift, scale] from ``temb``, then a linear projection."""

    def __init__(self, dim: int, out_dim: int, eps: float):
        super().__init__()
        self.norm_final = RMSNorm(dim, eps)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))
        self.linear = nn.Linear(dim, out_dim)

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(temb).chunk(2, dim=-1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class DiTStage(nn.Module):
    """A stack of DiT blocks plus the final layer (one stage of the cascaded head)."""

    def __init__(self, *, dim: int, out_dim: int, depth: int, heads: int, kv_heads: int,
                 mlp_ratio: int, eps: float, rope_theta: float):
        super().__init__()
        self.head_dim = dim // heads
        self.rope_theta = rope_theta
        self.blocks = nn.ModuleList(DiTBlock(dim, heads, kv_heads, mlp_ratio, eps)
                                    for _ in range(depth))
        self.final = FinalLayer(dim, out_dim, eps)

    def forward(self, x: torch.Tensor, temb: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """x [B, N, D], temb [B, 1, D], positions [N] -> [B, N, out_dim]."""
        rope = rope_cos_sin(positions[None], self.head_dim, self.rope_theta)  # [1, 1, N, Dh] each
        for block in self.blocks:
            x = block(x, temb, rope)
        return self.final(x, temb)

    def init_weights(self, std: float = 0.02, zero_output: bool = True) -> None:
        """DiT init: normal linears, zero adaLN modulation (blocks start as identity), and a
        zero output projection when the stage's output is the prediction itself."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=std)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Conv2d):
                m.reset_parameters()
            elif isinstance(m, RMSNorm):
                nn.init.ones_(m.weight)
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[1].weight)
            nn.init.zeros_(block.adaLN_modulation[1].bias)
        nn.init.zeros_(self.final.adaLN_modulation[1].weight)
        nn.init.zeros_(self.final.adaLN_modulation[1].bias)
        if zero_output:
            nn.init.zeros_(self.final.linear.weight)
            nn.init.zeros_(self.final.linear.bias)
