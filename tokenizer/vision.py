"""The unified vision tokenizer: pixels -> VAE latent x1; any latent xt -> LLM tokens.

    pixels [B, 3, H, W] in [0, 1] --VAE encoder + 2x2 patchify + BN--> x1 [B, C, G, G]
    xt [B, C, G, G] --pixel decoder--> pixels --SigLIP2--> [B, G*G, D_sig] --2x2 compressor--> [B, (G/2)^2, D_llm]
    (``latent_to_llm``: + a linear map of each token's 2x2 cells of xt, [B, (G/2)^2, 4 C] -> D_llm)

At 512 px: C = 128, G = 32, D_sig = 1152, 256 LLM tokens of width 1536.
"""

from __future__ import annotations

import torch
from einops import rearrange
from torch import nn

from cheers.config import ModelConfig
from cheers.errors import InputError
from cheers.tokenizer.compressor import TokenCompressor
from cheers.tokenizer.siglip import SiglipVision
from cheers.tokenizer.vae import VAE, PixelDecoder


class VisionTokenizer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        tc = cfg.tokenizer
        self.image_size = tc.image_size
        self.vae = VAE(tc.vae)
        self.pixel_decoder = PixelDecoder(tc.vae)
        self.siglip = SiglipVision(tc.siglip)
        hidden = tc.compressor_hidden or 4 * tc.siglip.hidden_size
        self.compressor = TokenCompressor(tc.siglip.hidden_size, hidden, cfg.llm.hidden_size,
                                          eps=tc.compressor_ln_eps, out_rms=tc.compressor_out_rms)
        self.latent_proj = nn.Linear(4 * tc.vae.latent_channels, cfg.llm.hidden_size) if tc.latent_to_llm else None

    def check_pixels(self, pixels: torch.Tensor) -> None:
        if pixels.dim() != 4 or pixels.shape[1] != 3:
            raise InputError(f"images must be [B, 3, H, W] RGB, got shape {tuple(pixels.shape)}")
        if pixels.shape[-2:] != (self.image_size, self.image_size):
            raise InputError(
                f"images must be {self.image_size}x{self.image_size} for this model, got "
                f"{pixels.shape[-2]}x{pixels.shape[-1]} (shape {tuple(pixels.shape)})"
            )

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """Clean latent x1 [B, C, G, G] of images in [0, 1]."""
        self.check_pixels(pixels)
        return self.vae.encode(pixels)

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        """Pixels [B, 3, H, W] (unclamped) of a normalised latent, through the frozen VAE decoder."""
        return self.vae.decode(latent)

    def forward(self, xt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Noisy latent xt [B, C, G, G] -> (LLM tokens [B, (G/2)^2, D_llm], SigLIP patch embeddings [B, G*G, D_sig])."""
        pixels = self.pixel_decoder(xt)
        feats, patch_embeds = self.siglip(pixels)
        tokens = self.compressor(feats)
        if self.latent_proj is not None:
            # the compressor's token order: raster over the (G/2)^2 grid of 2x2 cell blocks
            cells = rearrange(xt, "b c (gi py) (gj px) -> b (gi gj) (py px c)", py=2, px=2)
            tokens = tokens + self.latent_proj(cells.to(tokens.dtype))
        return tokens, patch_embeds

    def fsdp_units(self) -> list[nn.Module]:
        return self.siglip.fsdp_units()

    def init_weights(self) -> None:
        self.vae.init_weights()
        self.pixel_decoder.init_weights()
        self.siglip.init_weights()
        self.compressor.init_weights()
        if self.latent_proj is not None:
            # small beside the compressor's tokens at first (shapes: RMS ~0.016 against 0.05)
            nn.init.normal_(self.latent_proj.weight, std=0.002)
            nn.init.zeros_(self.latent_proj.bias)
