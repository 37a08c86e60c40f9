"""Pretraining the shapes world's tiny VAE, the frozen first stage of its vision tokenizer.

The released model uses the FLUX.2 VAE; the shapes world has no pretrained one, so it trains
its own first (reconstruction + a small KL), then fits the latent BatchNorm statistics.
"""

from __future__ import annotations

import numpy as np
import torch

from cheers.config import VAEConfig
from cheers.shapes.pretrain import pretrain
from cheers.shapes.scenes import BACKGROUND as _BG
from cheers.shapes.scenes import render, sample_scene
from cheers.tokenizer.vae import VAE

BACKGROUND = torch.tensor(_BG, dtype=torch.float32).view(1, 3, 1, 1) / 255.0


def scene_pixels(scenes) -> torch.Tensor:
    """[n, 3, S, S] float in [0, 1]: the rendered ``scenes``."""
    return torch.from_numpy(np.stack([render(s) for s in scenes])).permute(0, 3, 1, 2).float() / 255.0


def scene_images(n: int, image_size: int, rng: np.random.Generator) -> torch.Tensor:
    """[n, 3, S, S] float in [0, 1] of random shapes scenes."""
    return scene_pixels([sample_scene(rng, image_size) for _ in range(n)])


def train_vae(cfg: VAEConfig, image_size: int, *, steps: int | None = None, seconds: float | None = None,
              batch: int = 4, lr: float = 3e-3, kl_weight: float = 1e-6, seed: int = 0,
              device: str = "cpu", desc: str | None = None) -> tuple[VAE, list[float]]:
    """Train a ``VAE`` on fresh scenes for ``steps`` optimiser steps and / or ``seconds``
    (``cheers.shapes.pretrain.pretrain``); returns it with its reconstruction-loss curve.
    Pixels stay in [0, 1], as the VAE sees them in the model."""
    torch.manual_seed(seed)
    rng = np.random.default_rng([seed, 7])
    vae = VAE(cfg)
    vae.init_weights()
    vae.to(device).train()
    pool = scene_images(2048, image_size, rng)  # re-drawn in part every 64 steps: cheap and varied

    def loss_fn(step: int) -> tuple[torch.Tensor, torch.Tensor]:
        nonlocal pool
        if step and step % 64 == 0:
            pool[: batch * 2] = scene_images(batch * 2, image_size, rng)
            pool = pool[torch.randperm(len(pool))]
        x = pool[torch.randint(0, len(pool), (batch,))].to(device)
        moments = vae.encoder.moments(x)  # [B, 2z, h, w]: mean and log-variance
        mean, logvar = moments.chunk(2, dim=1)
        logvar = logvar.clamp(-30, 20)
        z = mean + torch.randn_like(mean) * (0.5 * logvar).exp()
        recon = vae.decoder(z)
        # shapes are small on a plain background: weight the pixels that differ from it, or
        # the first hundred steps only learn the grey
        weight = 1.0 + 8.0 * (x - BACKGROUND.to(x)).abs().amax(dim=1, keepdim=True)
        rec = ((recon - x).abs() * weight).mean() + ((recon - x).square() * weight).mean()
        kl = 0.5 * (mean.pow(2) + logvar.exp() - 1 - logvar).mean()
        return rec + kl_weight * kl, rec

    losses = pretrain(loss_fn, [*vae.encoder.parameters(), *vae.decoder.parameters()], lr=lr, steps=steps,
                      seconds=seconds, desc=desc)
    vae.eval()
    with torch.no_grad():
        latents = [vae.encoder(pool[i:i + 256].to(device)) for i in range(0, len(pool), 256)]
        vae.bn.fit_statistics(latents)
    return vae.cpu(), losses
