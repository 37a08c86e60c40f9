"""SigLIP / SigLIP2 (fixed-resolution) vision transformer, our own, loading the released weights.

Parameter names follow the Hugging Face ``SiglipVisionModel`` body (``embeddings.*``,
``encoder.layers.{i}.*``, ``post_layernorm``, optional ``head.*``) so checkpoints load unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from cheers.config import SiglipConfig
from cheers.errors import InputError


def _activation(name: str):
    if name == "gelu_pytorch_tanh":
        return lambda x: F.gelu(x, approximate="tanh")
    if name == "gelu":
        return F.gelu
    raise InputError(f"unsupported SigLIP hidden_act {name!r}")


class SiglipEmbeddings(nn.Module):
    def __init__(self, cfg: SiglipConfig):
        super().__init__()
        self.patch_size = cfg.patch_size
        self.num_patches = (cfg.image_size // cfg.patch_size) ** 2
        self.patch_embedding = nn.Conv2d(cfg.num_channels, cfg.hidden_size, cfg.patch_size, cfg.patch_size)
        self.position_embedding = nn.Embedding(self.num_patches, cfg.hidden_size)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels [B, 3, H, W] -> patch embeddings + positions [B, (H/p)(W/p), D]."""
        x = rearrange(self.patch_embedding(pixels.to(self.patch_embedding.weight.dtype)), "b d h w -> b (h w) d")
        if x.shape[1] != self.num_patches:
            raise InputError(
                f"SigLIP expects {self.num_patches} patches ({int(self.num_patches ** 0.5)}^2 of "
                f"{self.patch_size} px), got {x.shape[1]} from an image of shape {tuple(pixels.shape)}"
            )
        return x + self.position_embedding.weight[None]


class SiglipAttention(nn.Module):
    def __init__(self, cfg: SiglipConfig):
        super().__init__()
        d = cfg.hidden_size
        self.heads = cfg.num_attention_heads
        self.q_proj, self.k_proj = nn.Linear(d, d), nn.Linear(d, d)
        self.v_proj, self.out_proj = nn.Linear(d, d), nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = (rearrange(p(x), "b n (h d) -> b h n d", h=self.heads)
                   for p in (self.q_proj, self.k_proj, self.v_proj))
        out = F.scaled_dot_product_attention(q, k, v)
        return self.out_proj(rearrange(out, "b h n d -> b n (h d)"))


class SiglipMLP(nn.Module):
    def __init__(self, cfg: SiglipConfig):
        super().__init__()
        self.act = _activation(cfg.hidden_act)
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class SiglipLayer(nn.Module):
    def __init__(self, cfg: SiglipConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.self_attn = SiglipAttention(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = SiglipMLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class SiglipEncoder(nn.Module):
    def __init__(self, cfg: SiglipConfig):
        super().__init__()
        self.layers = nn.ModuleList(SiglipLayer(cfg) for _ in range(cfg.num_hidden_layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


class SiglipPoolingHead(nn.Module):
    """The attention-pooling head of released SigLIP checkpoints. Kept only so they load
    strictly; Cheers never uses its output."""

    def __init__(self, cfg: SiglipConfig):
        super().__init__()
        d = cfg.hidden_size
        self.probe = nn.Parameter(torch.zeros(1, 1, d))
        self.attention = nn.MultiheadAttention(d, cfg.num_attention_heads, batch_first=True)
        self.layernorm = nn.LayerNorm(d, eps=cfg.layer_norm_eps)
        self.mlp = SiglipMLP(cfg)


class SiglipVision(nn.Module):
    """The semantic encoder: pixels [B, 3, H, W] -> patch features [B, (H/p)(W/p), D]."""

    def __init__(self, cfg: SiglipConfig):
        super().__init__()
        self.cfg = cfg
        self.embeddings = SiglipEmbeddings(cfg)
        self.encoder = SiglipEncoder(cfg)
        self.post_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        if cfg.use_head:
            self.head = SiglipPoolingHead(cfg)

    def encode(self, embeds: torch.Tensor) -> torch.Tensor:
        """Transformer + final LayerNorm over precomputed patch embeddings [B, M, D]."""
        return self.post_layernorm(self.encoder(embeds))

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (features [B, M, D], patch embeddings [B, M, D]).

        The patch embeddings (conv + positions, before any transformer layer) are the detail
        signal of the flow head's gate, so they are returned rather than recomputed.
        """
        embeds = self.embeddings(pixels)
        return self.encode(embeds), embeds

    def fsdp_units(self) -> list[nn.Module]:
        return list(self.encoder.layers)

    def init_weights(self, std: float = 0.02) -> None:
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                nn.init.normal_(m.weight, std=std)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                m.reset_parameters()
            elif isinstance(m, nn.Embedding):
                nn.init.normal_(m.weight, std=std)
            elif isinstance(m, nn.MultiheadAttention):
                m._reset_parameters()
        if self.cfg.use_head:
            nn.init.normal_(self.head.probe, std=std)
