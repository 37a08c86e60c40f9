"""Latent patchify and normalisation: the VAE latent as the model sees it.

The VAE encoder gives ``z`` with ``z_channels`` channels at H/8. Cheers folds each 2x2
block of latent cells into the channels (``4 * z_channels`` at H/16, so that one latent
cell matches one SigLIP patch) and normalises every channel with fixed statistics:

    x = (patchify(z) - running_mean) / sqrt(running_var + eps)

This is a non-affine ``BatchNorm2d`` that the official code forces into eval mode, so it
is written here as the explicit formula: no train/eval state can ever switch it to batch
statistics. The buffer names match ``BatchNorm2d`` so checkpoints load unchanged.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from einops import rearrange
from torch import nn

from cheers.config import VAEConfig
from cheers.errors import InputError


def patchify(z: torch.Tensor, patch: int = 2) -> torch.Tensor:
    """Fold ``patch x patch`` latent cells into channels, channel-major.

    ``z [B, C, H, W] -> [B, C * p * p, H / p, W / p]``; output channel ``c*p*p + pi*p + pj``
    holds input cell ``(h*p + pi, w*p + pj)`` of channel ``c`` (the FLUX.2 / Cheers order).
    """
    return rearrange(z, "b c (h pi) (w pj) -> b (c pi pj) h w", pi=patch, pj=patch)


def unpatchify(x: torch.Tensor, patch: int = 2) -> torch.Tensor:
    """Exact inverse of :func:`patchify`: ``[B, C*p*p, h, w] -> [B, C, h*p, w*p]``."""
    return rearrange(x, "b (c pi pj) h w -> b c (h pi) (w pj)", pi=patch, pj=patch)


def to_tokens(x: torch.Tensor) -> torch.Tensor:
    """Latent grid to tokens in raster order, channels last: ``[B, C, h, w] -> [B, h*w, C]``."""
    return rearrange(x, "b c h w -> b (h w) c")


def to_grid(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Inverse of :func:`to_tokens`: ``[B, h*w, C] -> [B, C, h, w]``."""
    if tokens.ndim != 3 or tokens.shape[1] != h * w:
        raise InputError(f"tokens of shape {tuple(tokens.shape)} do not form a {h}x{w} grid")
    return rearrange(tokens, "b (h w) c -> b c h w", h=h, w=w)


class LatentNorm(nn.Module):
    """2x2 patchify + fixed per-channel normalisation of the VAE latent.

    Buffers (the checkpoint's ``bn.*``): ``running_mean [4z]``, ``running_var [4z]`` (fp32)
    and ``num_batches_tracked`` (int64, kept for format fidelity; unused).

    ``normalize(z [B, z, H/8, W/8]) -> x [B, 4z, H/16, W/16]``;
    ``denormalize(x) -> z`` is its exact inverse (up to float rounding).
    """

    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        self.z_channels = cfg.z_channels
        self.patch = cfg.latent_patch
        self.channels = cfg.latent_channels
        self.eps = cfg.bn_eps
        self.register_buffer("running_mean", torch.zeros(self.channels))
        self.register_buffer("running_var", torch.ones(self.channels))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))

    def init_weights(self) -> None:
        """Identity statistics (mean 0, var 1); call :meth:`fit_statistics` or load real ones."""
        with torch.no_grad():
            self.running_mean.zero_()
            self.running_var.fill_(1.0)
            self.num_batches_tracked.zero_()

    def _mean_std(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``mean, std`` as ``[1, C, 1, 1]`` in at least fp32 (see :meth:`_compute_dtype`)."""
        dtype = self._compute_dtype(like)
        mean = self.running_mean.to(like.device, dtype).view(1, -1, 1, 1)
        std = torch.sqrt(self.running_var.to(like.device, dtype) + self.eps).view(1, -1, 1, 1)
        return mean, std

    @staticmethod
    def _compute_dtype(x: torch.Tensor) -> torch.dtype:
        # At least fp32: rounding the std to bf16 would scale whole channels by up to 0.4%.
        return torch.promote_types(x.dtype, torch.float32)

    def normalize(self, z: torch.Tensor) -> torch.Tensor:
        """``z [B, z, H, W]`` (raw VAE latent) -> ``x [B, 4z, H/2, W/2]`` (model latent)."""
        p = self.patch
        if z.ndim != 4 or z.shape[1] != self.z_channels or z.shape[2] % p or z.shape[3] % p:
            raise InputError(
                f"latent of shape {tuple(z.shape)}: expected [B, {self.z_channels}, H, W] "
                f"with H and W multiples of {p}"
            )
        x = patchify(z, p)  # [B, 4z, h, w]
        mean, std = self._mean_std(x)
        return ((x.to(mean.dtype) - mean) / std).to(z.dtype)

    def denormalize(self, x: torch.Tensor) -> torch.Tensor:
        """``x [B, 4z, h, w]`` (model latent) -> ``z [B, z, 2h, 2w]`` (raw VAE latent)."""
        if x.ndim != 4 or x.shape[1] != self.channels:
            raise InputError(
                f"latent of shape {tuple(x.shape)}: expected [B, {self.channels}, h, w]"
            )
        mean, std = self._mean_std(x)
        z = (x.to(mean.dtype) * std + mean).to(x.dtype)  # [B, 4z, h, w]
        return unpatchify(z, self.patch)  # [B, z, 2h, 2w]

    @torch.no_grad()
    def fit_statistics(self, latents: Iterable[torch.Tensor]) -> None:
        """Set ``running_mean`` / ``running_var`` from raw latents ``z [B, z, H, W]``.

        Exact per-channel mean and unbiased variance over every batch, position and sample
        (accumulated in float64), not a momentum average: used once, after a small VAE has
        been trained (the shapes world). ``num_batches_tracked`` becomes the batch count.
        """
        count = 0
        batches = 0
        total = torch.zeros(self.channels, dtype=torch.float64)
        total_sq = torch.zeros(self.channels, dtype=torch.float64)
        for z in latents:
            if z.ndim != 4 or z.shape[1] != self.z_channels:
                raise InputError(
                    f"latent of shape {tuple(z.shape)}: expected [B, {self.z_channels}, H, W]"
                )
            x = patchify(z.detach(), self.patch).to("cpu", torch.float64)  # [B, 4z, h, w]
            total += x.sum(dim=(0, 2, 3))
            total_sq += x.square().sum(dim=(0, 2, 3))
            count += x.shape[0] * x.shape[2] * x.shape[3]
            batches += 1
        if count < 2:
            raise InputError(f"fit_statistics needs at least 2 latent positions, got {count}")
        mean = total / count
        var = (total_sq - count * mean.square()).clamp_min(0.0) / (count - 1)
        self.running_mean.copy_(mean)
        self.running_var.copy_(var)
        self.num_batches_tracked.fill_(batches)

    def extra_repr(self) -> str:
        return f"z_channels={self.z_channels}, patch={self.patch}, eps={self.eps}"
