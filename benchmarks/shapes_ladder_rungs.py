"""The shapes ladder: text-to-image generators from a plain pixel DiT up to the whole Cheers
model, one part added per rung, so a learning curve per rung shows where learning breaks.

    R0  pixel DiT; the caption's mean token embedding joins the time in adaLN
    R1  R0, with the caption embedding read from the LLM's state at <im_start> (LLM trained jointly)
    R2  image tokens inside the LLM sequence (bidirectional image block); a plain head reads
        the velocity from their final states (``llm_time``: the time embedding is added to the
        image tokens, so the LLM sees t, which the released model's LLM does not)
    R3  R2 + the cascaded head (stage A, the gated detail residual, stage B)
    R4  R3 + the frozen semantic encoder on the noisy input and the 2x2 compressor (the Cheers
        vision tokenizer on a lossless pixel latent)
    R5  R4 on the shapes VAE latent: the ``shapes`` flavour itself

Every rung takes the trainer's ``Batch`` and returns ``{"loss", "ce", "flow"}``; every rung
predicts with ``velocity_at(batch, xt, t)``, which ``sample`` integrates with the project's
sampler, and maps pixels to its latent and back with ``encode`` / ``decode``. R0-R3 see pixels through ``PixelLatent`` (RGB in [-1, 1], space-to-depth by the latent
cell), R4 too, in place of the VAE. No I/O here: the harness, ``benchmarks/shapes_ladder.py``,
reads and writes files.
"""

from __future__ import annotations

import dataclasses

import torch
from einops import rearrange
from torch import nn

from cheers.attention import build_dense_mask
from cheers.config import ModelConfig
from cheers.errors import ConfigError
from cheers.flow_head import transport
from cheers.flow_head.dit import DiTStage, FinalLayer
from cheers.flow_head.model import CascadedFlowHead
from cheers.flow_head.transport import timestep_frequencies
from cheers.llm import LLM
from cheers.losses import linear_cross_entropy
from cheers.model import CheersModel
from cheers.sequence import IGNORE, Batch
from cheers.shapes.parts import install_parts
from cheers.weight_init import normal_linears_

RUNGS = {
    "R0": "pixel DiT, mean caption embedding in adaLN",
    "R1": "pixel DiT, caption from the jointly trained LLM's <im_start> state",
    "R2": "image tokens in the LLM sequence, plain head",
    "R3": "R2 + cascaded head (stage A, gated detail residual, stage B)",
    "R4": "R3 + frozen semantic encoder on xt + 2x2 compressor (pixel latent)",
    "R5": "R4 on the shapes VAE latent (the shapes flavour)",
}


def with_token_px(cfg: ModelConfig, token_px: int) -> ModelConfig:
    """``cfg`` with LLM image tokens of ``token_px`` pixels a side: the latent cell becomes
    ``token_px / 2`` (the 2x2 compressor's geometry), so ``tokens_per_image`` is
    ``(image_size / token_px)^2``. Only the geometry changes."""
    cell = token_px // 2
    levels = cell // cfg.tokenizer.vae.latent_patch
    if token_px % 2 or levels < 1 or levels & (levels - 1) or cfg.tokenizer.image_size % token_px:
        raise ConfigError(f"token_px={token_px}: needs an even divisor of the image size "
                          f"{cfg.tokenizer.image_size} whose half is a power-of-two multiple of "
                          f"the latent patch {cfg.tokenizer.vae.latent_patch}")
    depth = levels.bit_length()  # ch_mult entries: 2 ** (depth - 1) = levels
    vae = dataclasses.replace(cfg.tokenizer.vae, ch_mult=cfg.tokenizer.vae.ch_mult[:1] * depth,
                              decoder_ch_mult=cfg.tokenizer.vae.decoder_ch_mult[:1] * depth)
    siglip = dataclasses.replace(cfg.tokenizer.siglip, patch_size=cell)
    return dataclasses.replace(cfg, tokenizer=dataclasses.replace(cfg.tokenizer, vae=vae, siglip=siglip))


def with_pixel_latent(cfg: ModelConfig) -> ModelConfig:
    """``cfg`` with as many latent channels as a pixel latent has (3 per pixel of a cell)."""
    vae = cfg.tokenizer.vae
    cell = vae.downsample
    z = 3 * cell * cell // vae.latent_patch**2
    return dataclasses.replace(cfg, tokenizer=dataclasses.replace(
        cfg.tokenizer, vae=dataclasses.replace(vae, z_channels=z, pooled_rgb_latent=False)))


class PixelLatent(nn.Module):
    """A lossless latent: pixels [B, 3, H, W] in [0, 1] -> ``scale * (2 p - 1)``, space-to-depth
    by ``cell`` -> [B, 3 cell^2, H / cell, W / cell]. Stands in for the VAE (``encode`` /
    ``decode``) and, called, for the pixel decoder (latent -> pixels in [0, 1], unclamped).
    ``scale`` sets the data's variance against the unit noise, as a VAE's latent scale does."""

    def __init__(self, cell: int, scale: float = 1.0):
        super().__init__()
        self.cell, self.scale = cell, scale

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        return rearrange((pixels * 2 - 1) * self.scale, "b c (h p) (w r) -> b (p r c) h w", p=self.cell, r=self.cell)

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        pixels = rearrange(latent / self.scale, "b (p r c) h w -> b c (h p) (w r)", p=self.cell, r=self.cell)
        return (pixels + 1) / 2

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        return self.decode(latent)

    def init_weights(self) -> None:
        pass


# --------------------------------------------------------------------------- batch helpers


def image_states(batch: Batch, hidden: torch.Tensor, n: int) -> torch.Tensor:
    """hidden [B, L, D] -> [I, n, D]: every image's slot states in slot order."""
    sel = batch.image_index >= 0
    at = (batch.image_index[sel], batch.image_slot[sel])
    return hidden.new_empty(batch.num_images, n, hidden.shape[-1]).index_put(at, hidden[sel])


def first_slots(batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """(row, column) [I] of each image's first slot, in image order."""
    first = (batch.image_index >= 0) & (batch.image_slot == 0)
    rows, cols = first.nonzero(as_tuple=True)
    order = torch.argsort(batch.image_index[rows, cols])
    return rows[order], cols[order]


def prompt_mask(batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows [I], mask [I, L]): for each image, its row and the text tokens of its document
    before its image block (the prompt, chat template included)."""
    rows, cols = first_slots(batch)
    doc = batch.doc_ids[rows, cols]
    pos = torch.arange(batch.input_ids.shape[1], device=rows.device)
    mask = ((batch.doc_ids[rows] == doc[:, None]) & (batch.image_index[rows] < 0)
            & (pos[None] < cols[:, None]))
    return rows, mask


def text_ce(hidden: torch.Tensor, lm_head: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    has = targets != IGNORE
    if not has.any():
        return hidden.sum() * 0.0
    return linear_cross_entropy(hidden[has], lm_head, targets[has])


# --------------------------------------------------------------------------- R0-R3


class LadderNet(nn.Module):
    """Rungs R0-R3 on a pixel latent whose cell is ``cfg``'s latent cell.

    R0 / R1 run a DiT over the LLM-token grid (``cfg.tokens_per_image`` tokens); R2 / R3 put
    those tokens in the LLM's image block. Widths: the DiT and the LLM share ``llm.hidden_size``.
    """

    def __init__(self, cfg: ModelConfig, rung: str, dit_depth: int = 6, dit_token_px: int | None = None,
                 pixel_scale: float = 1.0, llm_time: bool = False):
        super().__init__()
        if rung not in ("R0", "R1", "R2", "R3"):
            raise ConfigError(f"LadderNet builds R0-R3, not {rung!r}")
        if llm_time and rung not in ("R2", "R3"):
            raise ConfigError(f"llm_time adds the time to the LLM's image tokens: R2 / R3 only, not {rung}")
        self.cfg, self.rung, self.llm_time = cfg, rung, llm_time
        d = cfg.llm.hidden_size
        # R0 / R1 never put image tokens in the sequence: their DiT grid is free of cfg's
        cell = dit_token_px // 2 if dit_token_px and rung in ("R0", "R1") else cfg.tokenizer.vae.downsample
        self.latent = PixelLatent(cell, pixel_scale)
        c = 3 * cell**2  # latent channels
        self.g = cfg.tokenizer.image_size // cell
        self.n = (self.g // 2) ** 2
        self.latent_shape = (c, self.g, self.g)
        self.token_in = nn.Linear(4 * c, d)  # one token per 2x2 latent cells
        self.token_pos = nn.Parameter(torch.zeros(self.n, d))
        if rung == "R0":
            self.caption = nn.Embedding(cfg.llm.vocab_size, d)
        else:
            self.llm = LLM(cfg.llm)
        if rung in ("R0", "R1", "R2") or llm_time:
            hc = cfg.head
            self.time_mlp = nn.Sequential(nn.Linear(hc.time_freq_dim, d), nn.SiLU(), nn.Linear(d, d))
        if rung in ("R0", "R1"):
            self.cond_in = nn.Linear(d, d)
            hc = cfg.head
            self.dit = DiTStage(dim=d, out_dim=4 * c, depth=dit_depth, heads=hc.stage_a_heads,
                                kv_heads=hc.stage_a_kv_heads, mlp_ratio=hc.mlp_ratio, eps=hc.norm_eps,
                                rope_theta=hc.rope_theta)
        elif rung == "R2":
            self.out = FinalLayer(d, 4 * c, cfg.head.norm_eps)
        else:
            self.head = CascadedFlowHead(cfg)
            # the SigLIP patch embedding's stand-in: the gate's detail input per latent cell
            self.detail_in = nn.Linear(c, cfg.tokenizer.siglip.hidden_size)
            self.detail_pos = nn.Parameter(torch.zeros(self.g * self.g, cfg.tokenizer.siglip.hidden_size))

    def init_weights(self) -> None:
        normal_linears_(self.token_in)
        nn.init.normal_(self.token_pos, std=0.02)
        if self.rung == "R0":
            nn.init.normal_(self.caption.weight, std=0.02)
        else:
            self.llm.init_weights()
        if self.rung in ("R0", "R1", "R2") or self.llm_time:
            normal_linears_(self.time_mlp)
        if self.rung in ("R0", "R1"):
            normal_linears_(self.cond_in)
            self.dit.init_weights()
        elif self.rung == "R2":
            for m in self.out.modules():
                if isinstance(m, nn.Linear):
                    nn.init.zeros_(m.weight)
                    nn.init.zeros_(m.bias)
            nn.init.ones_(self.out.norm_final.weight)
        else:
            self.head.init_weights()
            normal_linears_(self.detail_in)
            nn.init.normal_(self.detail_pos, std=0.02)

    def time_embedding(self, t: torch.Tensor) -> torch.Tensor:
        """t [I] -> [I, 1, D]: the head's sinusoid of ``time_scale * t`` through an MLP."""
        hc = self.cfg.head
        args = (t.float() * hc.time_scale)[:, None] * timestep_frequencies(hc.time_freq_dim, device=t.device)[None]
        return self.time_mlp(torch.cat([torch.cos(args), torch.sin(args)], dim=-1))[:, None]

    def tokens(self, xt: torch.Tensor) -> torch.Tensor:
        """xt [I, C, G, G] -> image tokens [I, N, D] (raster over the 2x2 cell blocks)."""
        cells = rearrange(xt, "i c (gi py) (gj px) -> i (gi gj) (py px c)", py=2, px=2)
        return self.token_in(cells) + self.token_pos

    def untokens(self, out: torch.Tensor) -> torch.Tensor:
        """[I, N, 4 C] -> [I, C, G, G], the inverse of ``tokens``' cell layout."""
        g2 = self.g // 2
        return rearrange(out, "i (gi gj) (py px c) -> i c (gi py) (gj px)", gi=g2, py=2, px=2)

    def _llm_hidden(self, batch: Batch, image_tokens: torch.Tensor | None) -> torch.Tensor:
        embeds = self.llm.embed_tokens(batch.input_ids.clamp_min(0))
        slots = batch.image_index >= 0
        if image_tokens is not None and slots.any():
            embeds = embeds.masked_scatter(
                slots[..., None], image_tokens[batch.image_index[slots], batch.image_slot[slots]].to(embeds.dtype))
        mask = build_dense_mask(batch.doc_ids, batch.block_ids)
        return self.llm.hidden_states(inputs_embeds=embeds, position_ids=batch.position_ids, mask=mask)

    def predict(self, batch: Batch, xt: torch.Tensor, t: torch.Tensor):
        """(x1 prediction [I, C, G, G], text CE) for every image of ``batch``."""
        tokens = self.tokens(xt)
        if self.rung == "R0":
            rows, mask = prompt_mask(batch)
            emb = self.caption(batch.input_ids.clamp_min(0))[rows]  # [I, L, D]
            m = mask[..., None].to(emb.dtype)
            cond, ce = (emb * m).sum(1) / m.sum(1).clamp_min(1.0), xt.new_zeros(())
        elif self.rung == "R1":
            hidden = self._llm_hidden(batch, None)
            rows, cols = first_slots(batch)
            cond = hidden[rows, cols - 1]  # the <im_start> state: it has read the prompt only
            ce = text_ce(hidden, self.llm.lm_head.weight, batch.targets)
        if self.rung in ("R0", "R1"):
            temb = self.time_embedding(t) + self.cond_in(cond)[:, None]
            out = self.dit(tokens, temb, torch.arange(self.n, device=xt.device))
            return self.untokens(out), ce
        if self.llm_time:  # the LLM sees t, as R0's DiT blocks do through adaLN
            tokens = tokens + self.time_embedding(t)
        hidden = self._llm_hidden(batch, tokens)
        ce = text_ce(hidden, self.llm.lm_head.weight, batch.targets)
        h_img = image_states(batch, hidden, self.n)
        if self.rung == "R2":
            return self.untokens(self.out(h_img, self.time_embedding(t))), ce
        detail = self.detail_in(rearrange(xt, "i c h w -> i (h w) c")) + self.detail_pos
        out = self.head(h_img, t, detail, xt)  # [I, G*G, C]
        return rearrange(out, "i (h w) c -> i c h w", h=self.g), ce

    def velocity_at(self, batch: Batch, xt: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        x1_pred, _ = self.predict(batch, xt, t)
        return transport.velocity_from_x1(x1_pred, xt, t, t_min=self.cfg.transport.x1_loss_t_min)

    def forward(self, batch: Batch, generator: torch.Generator | None = None):
        tc = self.cfg.transport
        x1 = self.encode(batch.images)
        t = transport.sample_time(x1.shape[0], tc, generator=generator, device=x1.device)
        x0 = torch.randn(x1.shape, generator=generator, device=x1.device, dtype=x1.dtype)
        xt = transport.interpolate(x1, x0, t)
        x1_pred, ce = self.predict(batch, xt, t)
        v_pred = transport.velocity_from_x1(x1_pred, xt, t, t_min=tc.x1_loss_t_min)
        flow = transport.flow_loss(v_pred, x1, x0, target=tc.loss_target, t=t, t_min=tc.x1_loss_t_min)
        loss = ce + flow
        return {"loss": loss, "ce": ce.detach(), "flow": flow.detach()}

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.latent.encode(pixels)

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        return self.latent.decode(latent)


# --------------------------------------------------------------------------- R4, R5


class CheersRung(CheersModel):
    """R4 / R5: the Cheers model itself (its own training forward), with pretrained parts
    (``parts``: state dicts of ``vae`` and ``siglip``) loaded by ``init_weights``; R4 swaps the
    VAE and the pixel decoder for ``PixelLatent``."""

    def __init__(self, cfg: ModelConfig, rung: str, parts: dict[str, dict[str, torch.Tensor]],
                 pixel_scale: float = 1.0):
        if rung not in ("R4", "R5"):
            raise ConfigError(f"CheersRung builds R4 and R5, not {rung!r}")
        super().__init__(cfg)
        self.rung = rung
        self._parts = parts
        self.latent_shape = (cfg.tokenizer.vae.latent_channels, cfg.latent_grid, cfg.latent_grid)
        if rung == "R4":
            self.tokenizer.vae = PixelLatent(cfg.tokenizer.vae.downsample, pixel_scale)
            self.tokenizer.pixel_decoder = self.tokenizer.vae

    def init_weights(self) -> None:
        super().init_weights()
        install_parts(self.tokenizer, self._parts, source="the rung's pretrained parts", vae=self.rung == "R5")

    def velocity_at(self, batch: Batch, xt: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        tokens, patch_embeds = self.image_tokens(xt)
        embeds = self.embed(batch.input_ids, batch.image_index, batch.image_slot, tokens)
        mask = build_dense_mask(batch.doc_ids, batch.block_ids)
        hidden = self.llm.hidden_states(inputs_embeds=embeds, position_ids=batch.position_ids, mask=mask)
        h_img = image_states(batch, hidden, self.cfg.tokens_per_image)
        return self.velocity(h_img, t, xt, patch_embeds)

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.tokenizer.encode(pixels)

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        return self.tokenizer.decode(latent)


def rung_config(cfg: ModelConfig, rung: str, token_px: int | None = None) -> ModelConfig:
    """The model config a rung runs on: R0-R4 on a pixel latent; R2 / R3 with LLM image tokens of
    ``token_px`` pixels (default: the LLM-token size of ``cfg``). R0 / R1 take ``token_px``
    in ``build_rung``: their sequences carry no image tokens."""
    if rung not in RUNGS:
        raise ConfigError(f"unknown rung {rung!r}; known: {', '.join(RUNGS)}")
    if token_px is not None:
        if rung not in ("R0", "R1", "R2", "R3"):
            raise ConfigError(f"token_px applies to R0-R3 (their pixel latent has a free grid), not {rung}; "
                              "R4 / R5 take the grid of their pretrained parts")
        if rung in ("R2", "R3"):
            cfg = with_token_px(cfg, token_px)
    return cfg if rung == "R5" else with_pixel_latent(cfg)


def build_rung(cfg: ModelConfig, rung: str, parts: dict | None = None, token_px: int | None = None,
               pixel_scale: float = 1.0, llm_time: bool = False) -> nn.Module:
    """The rung's model, built (not initialised) from the config ``rung_config`` gave."""
    if rung in ("R4", "R5"):
        if not parts or "siglip" not in parts or (rung == "R5" and "vae" not in parts):
            raise ConfigError(f"{rung} needs pretrained parts: siglip" + (" and vae" if rung == "R5" else ""))
        return CheersRung(cfg, rung, parts, pixel_scale)
    return LadderNet(cfg, rung, dit_token_px=token_px, pixel_scale=pixel_scale, llm_time=llm_time)


@torch.no_grad()
def sample(model: nn.Module, batch: Batch, x0: torch.Tensor, *, steps: int, cfg_scale: float,
           shift: float = 1.0) -> torch.Tensor:
    """Clean latents [I, C, G, G] from noise x0 [I, ...] with plain Euler (the shapes sampler).

    ``batch`` holds 2 I images: the I conditional prompts, then their I null prompts (CFG)."""
    n = x0.shape[0]
    if batch.num_images != 2 * n:
        raise ConfigError(f"the sampling batch holds {batch.num_images} images, expected 2 x {n}")

    def velocity(x: torch.Tensor, t: float) -> torch.Tensor:
        tt = torch.full((2 * n,), t, device=x.device)
        v = model.velocity_at(batch, torch.cat([x, x]), tt)
        v_cond, v_null = v[:n], v[n:]
        return v_null + cfg_scale * (v_cond - v_null)

    return transport.sample_ode(velocity, x0, steps=steps, shift=shift, official_last_step=False)
