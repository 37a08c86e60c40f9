"""The cascaded flow-matching head: semantic stage A, gated detail residual, detail stage B.

The head predicts only; time sampling, targets and sampling live in ``transport.py``.

    hidden [B, N, D_llm] (LLM states at the N image tokens, 16x16 at 512 px)
      -> stage A (DiT, width D_llm)           -> [B, N, 4 D_sig] -> pixel shuffle -> Z [B, 4N, D_sig]
      -> gate: Z' = LN(Z + g(Z) * S)          (S: SigLIP patch embeddings of the pixel-decoded xt)
      (``latent_to_stage_b``: Z' += a linear map of xt at each latent cell, C_latent -> D_sig)
      -> stage B (DiT, width D_sig)           -> [B, 4N, C_latent] (velocity per latent cell)
"""

from __future__ import annotations

import torch
from einops import rearrange
from torch import nn

from cheers.config import ModelConfig
from cheers.errors import InputError
from cheers.flow_head.dit import DiTStage
from cheers.flow_head.transport import timestep_frequencies
from cheers.weight_init import normal_linears_


class TimeEmbedding(nn.Module):
    """One sinusoid of ``t * scale`` ([cos, sin]; the released model: t in [0, 1] as is) and
    one MLP per stage."""

    def __init__(self, freq_dim: int, dim_a: int, dim_b: int, scale: float = 1.0):
        super().__init__()
        self.freq_dim = freq_dim
        self.scale = scale
        self.mlp_a = nn.Sequential(nn.Linear(freq_dim, dim_a), nn.SiLU(), nn.Linear(dim_a, dim_a))
        self.mlp_b = nn.Sequential(nn.Linear(freq_dim, dim_b), nn.SiLU(), nn.Linear(dim_b, dim_b))

    def sinusoid(self, t: torch.Tensor) -> torch.Tensor:
        """t [B] -> [B, freq_dim] in fp32."""
        freqs = timestep_frequencies(self.freq_dim, device=t.device)  # made on the device: graph-safe
        args = (t.float() * self.scale)[:, None] * freqs[None]
        return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)

    def forward(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """t [B] -> (temb_a [B, 1, D_a], temb_b [B, 1, D_b])."""
        emb = self.sinusoid(t).to(self.mlp_a[0].weight.dtype)
        return self.mlp_a(emb)[:, None], self.mlp_b(emb)[:, None]


class DetailGate(nn.Module):
    """``Z' = LayerNorm(Z + g(Z) * high)`` with ``g = Linear(D, 1)(SiLU(Linear(D, D)))``, unbounded."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.gate = nn.Sequential(nn.Linear(dim, dim), nn.SiLU(), nn.Linear(dim, 1))
        self.layer_norm = nn.LayerNorm(dim, eps=eps)

    def forward(self, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
        """low, high [B, M, D] -> [B, M, D]."""
        return self.layer_norm(low + self.gate(low) * high)

    def init_weights(self, std: float = 0.02) -> None:
        nn.init.normal_(self.gate[0].weight, std=std)
        nn.init.zeros_(self.gate[0].bias)
        # zero-initialised: at the start of training stage B sees the semantic map alone
        nn.init.zeros_(self.gate[2].weight)
        nn.init.zeros_(self.gate[2].bias)
        self.layer_norm.reset_parameters()


class CascadedFlowHead(nn.Module):
    """Velocity of the latent at every latent cell from the LLM's image-token states."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        hc = cfg.head
        d_llm = cfg.llm.hidden_size
        d_sig = cfg.tokenizer.siglip.hidden_size
        self.grid = cfg.latent_grid  # side of the latent grid (32 at 512 px)
        self.stage_b_positions = hc.stage_b_positions
        self.time_embed = TimeEmbedding(hc.time_freq_dim, d_llm, d_sig, hc.time_scale)
        self.stage_a = DiTStage(dim=d_llm, out_dim=4 * d_sig, depth=hc.stage_a_blocks,
                                heads=hc.stage_a_heads, kv_heads=hc.stage_a_kv_heads,
                                mlp_ratio=hc.mlp_ratio, eps=hc.norm_eps, rope_theta=hc.rope_theta)
        self.gate = DetailGate(d_sig, hc.gate_ln_eps)
        c_latent = cfg.tokenizer.vae.latent_channels
        self.stage_b = DiTStage(dim=d_sig, out_dim=c_latent, depth=hc.stage_b_blocks,
                                heads=hc.stage_b_heads, kv_heads=hc.stage_b_kv_heads,
                                mlp_ratio=hc.mlp_ratio, eps=hc.norm_eps, rope_theta=hc.rope_theta)
        self.latent_in = nn.Linear(c_latent, d_sig) if hc.latent_to_stage_b else None

    def positions_b(self, n: int, device) -> torch.Tensor:
        if self.stage_b_positions == "official":
            # the released model runs stage B with positions arange(n/2) twice
            return torch.arange(n // 2, device=device).repeat(2)
        return torch.arange(n, device=device)

    def forward(self, hidden: torch.Tensor, t: torch.Tensor, detail: torch.Tensor,
                xt: torch.Tensor | None = None, return_intermediates: bool = False):
        """Predict the head output per latent cell.

        hidden [B, N, D_llm] image-token states (raster over the N = (G/2)^2 LLM grid),
        t [B] in [0, 1], detail [B, G*G, D_sig] SigLIP patch embeddings of the decoded xt,
        xt [B, C_latent, G, G] (read only with ``latent_to_stage_b``).
        Returns [B, G*G, C_latent] (raster, channels last).
        """
        g2 = self.grid // 2
        temb_a, temb_b = self.time_embed(t)
        a_out = self.stage_a(hidden, temb_a, torch.arange(hidden.shape[1], device=hidden.device))
        # each LLM token (gi, gj) carries a 2x2 block of SigLIP cells laid out [py][px][D]
        low = rearrange(a_out, "b (gi gj) (py px d) -> b (gi py gj px) d", gi=g2, py=2, px=2)
        gated = self.gate(low, detail)
        if self.latent_in is not None:
            if xt is None:
                raise InputError("head.latent_to_stage_b is on: the head needs xt")
            gated = gated + self.latent_in(rearrange(xt, "b c h w -> b (h w) c").to(gated.dtype))
        out = self.stage_b(gated, temb_b, self.positions_b(gated.shape[1], gated.device))
        if return_intermediates:
            return out, {"stage_a": a_out, "gate": gated, "temb_a": temb_a, "temb_b": temb_b}
        return out

    def fsdp_units(self) -> list[nn.Module]:
        return [*self.stage_a.blocks, *self.stage_b.blocks]

    def init_weights(self, std: float = 0.02) -> None:
        normal_linears_(self.time_embed.mlp_a, self.time_embed.mlp_b, std=std)
        # stage A feeds stage B: a zero output there would starve stage B of any signal
        self.stage_a.init_weights(std, zero_output=False)
        self.stage_b.init_weights(std)
        self.gate.init_weights(std)
        normal_linears_(self.latent_in, std=std)

