"""The KL autoencoder of the vision tokenizer (FLUX.2 type), over diffusers' Encoder/Decoder.

Data flow (reference sizes for a 512 px image, z = 32 channels):

    pixels [B, 3, 512, 512] in [0, 1]
      -> VAEEncoder        z  [B, 32, 64, 64]     (posterior mean; no sampling)
      -> LatentNorm        x1 [B, 128, 32, 32]    (2x2 patchify + fixed normalisation)
    x [B, 128, 32, 32]
      -> LatentNorm^-1 -> VAEDecoder -> pixels [B, 3, 512, 512] (unclamped)

Pixels go in as [0, 1], not [-1, 1]: the official Cheers code feeds the processor's
``/255`` values straight into the encoder and the released weights were trained that way.

``VAE`` (frozen encoder + decoder for the final image) and ``PixelDecoder`` (the trainable
copy of the decoder that turns noisy latents ``xt`` into pixels for SigLIP) each carry
their own ``LatentNorm``: the official checkpoint stores two with different statistics.

State-dict keys (ours): ``encoder.net.*`` (diffusers ``Encoder`` names),
``encoder.quant_conv.*``, ``decoder.post_quant_conv.*``, ``decoder.net.*`` (diffusers
``Decoder`` names), ``bn.*``. ``cheers.adapters.diffusers_vae`` translates the official and
diffusers layouts to these.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.models.autoencoders.vae import Decoder, Encoder
from diffusers.models.resnet import ResnetBlock2D
from torch import nn

from cheers.config import VAEConfig
from cheers.errors import ConfigError, InputError

from .latent import LatentNorm

# GroupNorm eps of every norm in the LDM / FLUX autoencoder (diffusers' Encoder/Decoder
# hard-code the same value).
_NORM_EPS = 1e-6
_LOGVAR_MIN = -30.0  # the log-variance of a deterministic latent channel (the training clamp)


def _check_widths(widths: list[int], groups: int, what: str) -> None:
    for w in widths:
        if w <= 0 or w % groups:
            raise ConfigError(
                f"{what}: block width {w} is not a positive multiple of norm_groups={groups}"
            )


def _reset_parameters(module: nn.Module) -> None:
    """PyTorch's default init on every leaf that has one (convs, linears, GroupNorms)."""
    for m in module.modules():
        if m is not module and hasattr(m, "reset_parameters"):
            m.reset_parameters()


def _check_pixels(pixels: torch.Tensor, channels: int, multiple: int) -> None:
    if (
        pixels.ndim != 4
        or pixels.shape[1] != channels
        or pixels.shape[2] % multiple
        or pixels.shape[3] % multiple
    ):
        raise InputError(
            f"image of shape {tuple(pixels.shape)}: expected [B, {channels}, H, W] with H and W "
            f"multiples of {multiple}"
        )


class VAEEncoder(nn.Module):
    """LDM encoder + ``quant_conv``; returns the posterior mean.

    ``forward(pixels [B, in_channels, H, W] in [0, 1]) -> z [B, z_channels, H/f, W/f]`` with
    ``f = 2 ** (len(ch_mult) - 1)`` (8 at the reference).

    Level ``i`` has ``num_res_blocks`` residual blocks of width ``ch * ch_mult[i]``. The LDM
    stem maps the image to ``ch`` channels, while diffusers' ``Encoder`` maps it straight to
    ``ch * ch_mult[0]``; the two agree when ``ch_mult[0] == 1`` (every released VAE). For any
    other ``ch_mult[0]`` (the official tiny fixture uses 2) the stem conv and the first
    residual block are rebuilt the LDM way, so that checkpoint loads unchanged.
    """

    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        if cfg.num_res_blocks < 1:
            raise ConfigError(f"vae.num_res_blocks={cfg.num_res_blocks}: the encoder needs >= 1")
        widths = [cfg.ch * m for m in cfg.ch_mult]
        _check_widths([cfg.ch, *widths], cfg.norm_groups, "vae encoder")
        self.in_channels = cfg.in_channels
        self.z_channels = cfg.z_channels
        self.downsample = 2 ** (len(widths) - 1)
        self.net = Encoder(
            in_channels=cfg.in_channels,
            out_channels=cfg.z_channels,
            down_block_types=("DownEncoderBlock2D",) * len(widths),
            block_out_channels=tuple(widths),
            layers_per_block=cfg.num_res_blocks,
            norm_num_groups=cfg.norm_groups,
            act_fn="silu",
            double_z=True,  # conv_out gives mean and log-variance: 2z channels
            mid_block_add_attention=True,
        )
        if widths[0] != cfg.ch:
            self.net.conv_in = nn.Conv2d(cfg.in_channels, cfg.ch, kernel_size=3, padding=1)
            self.net.down_blocks[0].resnets[0] = ResnetBlock2D(
                in_channels=cfg.ch,
                out_channels=widths[0],
                temb_channels=None,
                eps=_NORM_EPS,
                groups=cfg.norm_groups,
                non_linearity="silu",
            )
        self.quant_conv = nn.Conv2d(2 * cfg.z_channels, 2 * cfg.z_channels, kernel_size=1)
        self.pooled_rgb = cfg.pooled_rgb_latent
        if self.pooled_rgb and (cfg.in_channels < 3 or cfg.z_channels < 3):
            raise ConfigError(f"vae.pooled_rgb_latent needs 3 input and >= 3 latent channels, got "
                              f"in_channels={cfg.in_channels}, z_channels={cfg.z_channels}")

    def init_weights(self) -> None:
        """Default init of every layer (used after a ``meta`` build and ``to_empty``)."""
        _reset_parameters(self)

    def moments(self, pixels: torch.Tensor) -> torch.Tensor:
        """``pixels [B, C, H, W]`` -> ``[B, 2z, H/8, W/8]``: posterior mean and log-variance."""
        _check_pixels(pixels, self.in_channels, self.downsample)
        moments = self.quant_conv(self.net(pixels))
        if not self.pooled_rgb:
            return moments
        # channels 0-2: the pooled pixels, centred and scaled to [-1, 1], with no noise
        rgb = (2.0 * F.avg_pool2d(pixels[:, :3], self.downsample) - 1.0).to(moments.dtype)  # [B, 3, H/f, W/f]
        z = self.z_channels
        return torch.cat([rgb, moments[:, 3:z], torch.full_like(rgb, _LOGVAR_MIN), moments[:, z + 3:]], dim=1)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """``pixels [B, C, H, W]`` in [0, 1] -> posterior mean ``z [B, z, H/8, W/8]``."""
        return self.moments(pixels)[:, : self.z_channels]  # [B, z, H/8, W/8]


class VAEDecoder(nn.Module):
    """``post_quant_conv`` + LDM decoder: ``forward(z [B, z, h, w]) -> pixels [B, out, 8h, 8w]``.

    Level ``i`` has ``decoder_num_res_blocks + 1`` residual blocks of width
    ``decoder_ch * decoder_ch_mult[i]``. The output is not clamped.
    """

    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        if cfg.decoder_num_res_blocks < 0:
            raise ConfigError(f"vae.decoder_num_res_blocks={cfg.decoder_num_res_blocks} < 0")
        widths = [cfg.decoder_ch * m for m in cfg.decoder_ch_mult]
        _check_widths(widths, cfg.norm_groups, "vae decoder")
        self.z_channels = cfg.z_channels
        self.post_quant_conv = nn.Conv2d(cfg.z_channels, cfg.z_channels, kernel_size=1)
        self.net = Decoder(
            in_channels=cfg.z_channels,
            out_channels=cfg.out_channels,
            up_block_types=("UpDecoderBlock2D",) * len(widths),
            block_out_channels=tuple(widths),
            layers_per_block=cfg.decoder_num_res_blocks,  # diffusers adds the LDM "+ 1"
            norm_num_groups=cfg.norm_groups,
            act_fn="silu",
            mid_block_add_attention=True,
        )

    def init_weights(self) -> None:
        """Default init of every layer (used after a ``meta`` build and ``to_empty``)."""
        _reset_parameters(self)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """``z [B, z, h, w]`` (raw latent) -> ``pixels [B, out_channels, 8h, 8w]``, unclamped."""
        if z.ndim != 4 or z.shape[1] != self.z_channels:
            raise InputError(
                f"latent of shape {tuple(z.shape)}: expected [B, {self.z_channels}, h, w]"
            )
        return self.net(self.post_quant_conv(z))  # [B, out, 8h, 8w]


class VAE(nn.Module):
    """Encoder, decoder and latent normalisation of the tokenizer.

    ``encode(pixels [B, 3, H, W] in [0, 1]) -> x1 [B, 4z, H/16, W/16]``;
    ``decode(x [B, 4z, h, w]) -> pixels [B, 3, 16h, 16w]`` (unclamped).
    H and W must be multiples of ``cfg.downsample`` (16).
    """

    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.encoder = VAEEncoder(cfg)
        self.decoder = VAEDecoder(cfg)
        self.bn = LatentNorm(cfg)

    def init_weights(self) -> None:
        """Default init of every layer, identity latent statistics."""
        self.encoder.init_weights()
        self.decoder.init_weights()
        self.bn.init_weights()

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """``pixels [B, 3, H, W]`` in [0, 1] -> normalised latent ``x1 [B, 4z, H/16, W/16]``."""
        _check_pixels(pixels, self.cfg.in_channels, self.cfg.downsample)
        return self.bn.normalize(self.encoder(pixels))

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised latent ``x [B, 4z, h, w]`` -> ``pixels [B, 3, 16h, 16w]``, unclamped."""
        return self.decoder(self.bn.denormalize(x))


class PixelDecoder(nn.Module):
    """The trainable copy of the VAE decoder with its own latent statistics.

    ``forward(xt [B, 4z, h, w]) -> pixels [B, 3, 16h, 16w]`` (unclamped; fed to SigLIP2
    as is). ``xt`` is a noisy normalised latent; ``bn`` here is the pixel decoder's own
    ``LatentNorm``, not the VAE's (the official checkpoint stores different values).
    """

    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.decoder = VAEDecoder(cfg)
        self.bn = LatentNorm(cfg)

    def init_weights(self) -> None:
        """Default init of every layer, identity latent statistics."""
        self.decoder.init_weights()
        self.bn.init_weights()

    def forward(self, xt: torch.Tensor) -> torch.Tensor:
        """``xt [B, 4z, h, w]`` -> ``pixels [B, 3, 16h, 16w]``."""
        return self.decoder(self.bn.denormalize(xt))
