"""Pretraining the shapes world's tiny semantic encoder (the SigLIP2 of the shapes flavour).

The released model starts from a pretrained SigLIP2 whose patch features already say what is
where. A random encoder trained jointly with the rest on a CPU budget learns no image-dependent
features (the flow head then ignores the prompt and questions are answered at chance), so the
demo pretrains it first, as it does the VAE, and then freezes it.

Objective: dense labels from the generator. Every patch is labelled with the colour and class
of the object covering most of it (or background), and two linear probes on the encoder's
final features must recover both. The inputs are the rendered images (as SigLIP2 saw real
images) or, given the trained VAE, pixel decodings of noised latents, which is what the
encoder meets inside Cheers but trains slower (benchmarks/RESULTS.md, "Shapes world").
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from cheers.config import SiglipConfig
from cheers.errors import InputError
from cheers.shapes.autoencoder import scene_pixels
from cheers.shapes.pretrain import pretrain
from cheers.shapes.scenes import COLOURS, SHAPES, Scene, object_masks, sample_scene
from cheers.tokenizer.siglip import SiglipVision
from cheers.tokenizer.vae import VAE


def patch_labels(scene: Scene, patch: int, min_cover: float = 0.125) -> tuple[np.ndarray, np.ndarray]:
    """(colour, shape) labels [S/p, S/p] int64 per patch: 1 + the index of the object covering
    most of the patch (in ``COLOURS`` / ``SHAPES``), 0 for background (cover under ``min_cover``)."""
    if scene.height != scene.width or scene.height % patch:
        raise InputError(f"patch labels need a square image whose side is a multiple of the {patch} px patch; "
                         f"got {scene.width}x{scene.height}")
    g = scene.height // patch
    best = np.zeros((g, g), dtype=np.float32)
    colour = np.zeros((g, g), dtype=np.int64)
    shape = np.zeros((g, g), dtype=np.int64)
    for obj, mask in zip(scene.objects, object_masks(scene)):
        cover = mask.reshape(g, patch, g, patch).mean(axis=(1, 3))
        win = (cover > best) & (cover >= min_cover)
        best = np.where(win, cover, best)
        colour[win] = 1 + COLOURS.index(obj.colour)
        shape[win] = 1 + SHAPES.index(obj.shape)
    return colour, shape


def labelled_scenes(n: int, image_size: int, patch: int, rng: np.random.Generator):
    """n random scenes: pixels [n, 3, S, S] in [0, 1], colour and shape labels [n, S/p, S/p]."""
    scenes = [sample_scene(rng, image_size) for _ in range(n)]
    pixels = scene_pixels(scenes)
    labels = [patch_labels(s, patch) for s in scenes]
    colour = torch.from_numpy(np.stack([c for c, _ in labels]))
    shape = torch.from_numpy(np.stack([s for _, s in labels]))
    return pixels, colour, shape


class PatchProbes(nn.Module):
    """Linear colour and shape classifiers on the encoder's patch features."""

    def __init__(self, dim: int):
        super().__init__()
        self.colour = nn.Linear(dim, 1 + len(COLOURS))
        self.shape = nn.Linear(dim, 1 + len(SHAPES))

    def forward(self, feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.colour(feats), self.shape(feats)


def train_semantic_encoder(cfg: SiglipConfig, vae: VAE | None, image_size: int, *, steps: int | None = None,
                           seconds: float | None = None, batch: int = 32, lr: float = 3e-3, t_min: float = 0.5,
                           pool_size: int = 1024, seed: int = 0, desc: str | None = None
                           ) -> tuple[SiglipVision, list[float], dict[str, float]]:
    """Train a ``SiglipVision`` on dense shapes labels for ``steps`` optimiser steps and / or
    ``seconds`` (``cheers.shapes.pretrain.pretrain``).

    The inputs are rendered scenes (``vae=None``, the demo's choice) or, given the trained
    ``vae``, pixel decodings of their noised latents. Returns the encoder, its loss curve and
    the probes' patch accuracies on fresh clean scenes
    (``colour``, ``shape``: over object patches; ``background``: over the rest).
    """
    torch.manual_seed(seed)
    rng = np.random.default_rng([seed, 11])
    encoder = SiglipVision(cfg)
    encoder.init_weights()
    probes = PatchProbes(cfg.hidden_size)
    if vae is not None:
        vae.eval()
    pool = labelled_scenes(pool_size, image_size, cfg.patch_size, rng)  # partly redrawn every 32 steps

    def loss_fn(step: int) -> torch.Tensor:
        if step and step % 32 == 0:
            fresh = labelled_scenes(batch, image_size, cfg.patch_size, rng)
            slot = torch.randint(0, len(pool[0]), (batch,))
            for p, f in zip(pool, fresh):
                p[slot] = f
        idx = torch.randint(0, len(pool[0]), (batch,))
        pixels, colour, shape = (p[idx] for p in pool)
        seen = pixels
        if vae is not None:
            with torch.no_grad():
                x1 = vae.encode(pixels)
                t = t_min + (1 - t_min) * torch.rand(batch, 1, 1, 1)
                seen = vae.decode(t * x1 + (1 - t) * torch.randn_like(x1))
        feats, _ = encoder(seen)
        logit_c, logit_s = probes(feats)
        return (F.cross_entropy(logit_c.flatten(0, 1), colour.flatten())
                + F.cross_entropy(logit_s.flatten(0, 1), shape.flatten()))

    losses = pretrain(loss_fn, [*encoder.parameters(), *probes.parameters()], lr=lr, steps=steps,
                      seconds=seconds, desc=desc)
    encoder.eval()
    return encoder, losses, probe_accuracy(encoder, probes, vae, image_size, rng)


@torch.no_grad()
def probe_accuracy(encoder: SiglipVision, probes: PatchProbes, vae: VAE | None, image_size: int,
                   rng: np.random.Generator, n: int = 256) -> dict[str, float]:
    """Patch accuracies of the probes on ``n`` fresh clean scenes."""
    pixels, colour, shape = labelled_scenes(n, image_size, encoder.cfg.patch_size, rng)
    feats, _ = encoder(pixels if vae is None else vae.decode(vae.encode(pixels)))
    pred_c, pred_s = (rearrange(x.argmax(-1), "b (h w) -> b h w", h=colour.shape[1]) for x in probes(feats))
    obj = colour > 0
    return {"colour": (pred_c == colour)[obj].float().mean().item(),
            "shape": (pred_s == shape)[obj].float().mean().item(),
            "background": (pred_c == 0)[~obj].float().mean().item()}
