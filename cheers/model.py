"""The unified Cheers model: vision tokenizer + LLM + cascaded flow head.

``CheersModel.forward(batch) -> {"loss", "ce", "flow"}`` for any mix of text-to-image,
image-to-text and text-only samples. No I/O here: loading lives in ``cheers/checkpoint.py``,
sampling in ``cheers/engine.py``.
"""

from __future__ import annotations

import torch
from einops import rearrange
from torch import nn

from cheers.attention import build_dense_mask
from cheers.config import ModelConfig
from cheers.errors import InputError
from cheers.flow_head import transport
from cheers.flow_head.model import CascadedFlowHead
from cheers.llm import LLM
from cheers.losses import linear_cross_entropy
from cheers.sequence import IGNORE, Batch
from cheers.tokenizer.vision import VisionTokenizer


class CheersModel(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.tokenizer = VisionTokenizer(cfg)
        self.llm = LLM(cfg.llm)
        self.head = CascadedFlowHead(cfg)

    # ------------------------------------------------------------------ parts

    def init_weights(self) -> None:
        """Initialise every parameter (after ``to_empty`` of a meta-device build)."""
        self.tokenizer.init_weights()
        self.llm.init_weights()
        self.head.init_weights()

    def fsdp_units(self) -> list[nn.Module]:
        """Blocks to shard one by one before the root (LLM, SigLIP and head blocks)."""
        return [*self.llm.layers, *self.tokenizer.fsdp_units(), *self.head.fsdp_units()]

    def image_tokens(self, xt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """xt [I, C, G, G] -> (LLM tokens [I, N, D], SigLIP patch embeddings [I, G*G, D_sig])."""
        return self.tokenizer(xt)

    def velocity(self, hidden: torch.Tensor, t: torch.Tensor, xt: torch.Tensor,
                 patch_embeds: torch.Tensor) -> torch.Tensor:
        """Predicted velocity [I, C, G, G] from image-token states hidden [I, N, D_llm].

        With ``transport.prediction == "x1"`` the head predicts the clean latent and the
        velocity is ``(x1 - xt) / max(1 - t, x1_loss_t_min)``, in training and in sampling
        alike: above ``t = 1 - x1_loss_t_min`` the loss makes the output ``xt + t_min v``
        rather than x1, and reading it as x1 there would scale the last velocities by up to
        ``t_min / (1 - t)``. The released model predicts the velocity.
        """
        out = self.head(hidden, t, patch_embeds, xt)  # [I, G*G, C]
        g = self.cfg.latent_grid
        out = rearrange(out, "i (h w) c -> i c h w", h=g, w=g)
        if self.cfg.transport.prediction == "x1":
            return transport.velocity_from_x1(out, xt, t, t_min=self.cfg.transport.x1_loss_t_min)
        return out

    def embed(self, input_ids: torch.Tensor, image_index: torch.Tensor, image_slot: torch.Tensor,
              image_tokens: torch.Tensor | None) -> torch.Tensor:
        """Token embeddings [B, L, D] with image slots filled from image_tokens [I, N, D]."""
        embeds = self.llm.embed_tokens(input_ids.clamp_min(0))
        slots = image_index >= 0
        if slots.any():
            if image_tokens is None:
                raise InputError("the batch has image slots but no images")
            embeds = embeds.masked_scatter(
                slots[..., None], image_tokens[image_index[slots], image_slot[slots]].to(embeds.dtype)
            )
        return embeds

    # ------------------------------------------------------------------ training forward

    def prepare_images(self, batch: Batch, generator: torch.Generator | None = None):
        """x1, x0, t, xt for every image of the batch; understanding images get t = 1 (clean)."""
        with torch.no_grad():
            x1 = self.tokenizer.encode(batch.images)  # the VAE encoder is always frozen
        n = x1.shape[0]
        is_gen = batch.is_gen.to(x1.device)
        if batch.t is not None:
            t = batch.t.to(x1.device, torch.float32).reshape(n)
        else:
            sampled = transport.sample_time(n, self.cfg.transport, generator=generator, device=x1.device)
            t = torch.where(is_gen, sampled, torch.ones_like(sampled))
        x0 = batch.noise.to(x1) if batch.noise is not None else torch.randn(
            x1.shape, generator=generator, device=x1.device, dtype=x1.dtype)
        xt = transport.interpolate(x1, x0, t)
        return x1, x0, t, xt

    def forward(self, batch: Batch, generator: torch.Generator | None = None,
                return_outputs: bool = False):
        """Losses of a packed batch: ``ce`` over text targets, ``flow`` (velocity MSE) over
        generation images, ``loss = ce + flow``."""
        if batch.input_ids.shape[1] > self.cfg.max_seq_len:
            raise InputError(
                f"sequence length {batch.input_ids.shape[1]} is over max_seq_len={self.cfg.max_seq_len}"
            )
        device = batch.input_ids.device
        tokens = patch_embeds = None
        idle = None  # zero-weight outputs of parts this batch does not use (see _idle)
        if batch.num_images:
            x1, x0, t, xt = self.prepare_images(batch, generator)
            tokens, patch_embeds = self.image_tokens(xt)
        elif self.training:
            idle = self._idle_tokens(device)
        embeds = self.embed(batch.input_ids, batch.image_index, batch.image_slot, tokens)
        mask = build_dense_mask(batch.doc_ids, batch.block_ids)
        hidden = self.llm.hidden_states(inputs_embeds=embeds, position_ids=batch.position_ids, mask=mask)

        has_target = batch.targets != IGNORE
        if has_target.any():
            # only where a target exists; chunked so the [N, V] logits never exist at once
            ce = linear_cross_entropy(hidden[has_target], self.llm.lm_head.weight, batch.targets[has_target])
        else:
            ce = hidden.sum() * 0.0

        gen = batch.is_gen if batch.num_images else None
        if gen is not None and gen.any():
            gen_idx = gen.nonzero().squeeze(1).to(device)
            n = self.cfg.tokens_per_image
            sel = torch.isin(batch.image_index, gen_idx)
            at = (torch.searchsorted(gen_idx, batch.image_index[sel]), batch.image_slot[sel])
            # [len(gen_idx), n, D]: each generation image's states in slot order; the velocity is
            # read at the slots themselves
            h_img = hidden.new_empty(len(gen_idx), n, hidden.shape[-1]).index_put(at, hidden[sel])
            v_pred = self.velocity(h_img, t[gen_idx], xt[gen_idx], patch_embeds[gen_idx])
            tc = self.cfg.transport
            flow = transport.flow_loss(v_pred, x1[gen_idx], x0[gen_idx], target=tc.loss_target,
                                       t=t[gen_idx], t_min=tc.x1_loss_t_min)
        else:
            v_pred = None
            flow = ce.new_zeros(())
            if self.training:
                idle = self._idle_head(device) + (0.0 if idle is None else idle)
        loss = ce + flow
        if idle is not None:
            loss = loss + idle
        out = {"loss": loss, "ce": ce.detach(), "flow": flow.detach()}
        if return_outputs:
            out.update(hidden=hidden, v_pred=v_pred)
        return out

    # Every trainable part runs exactly once per training forward, in the same order
    # (vision tokenizer -> LLM -> head), whatever the micro-batch holds: FSDP issues one
    # all-gather per unit in that order, and ranks with different batches must agree.

    def _zero_latent(self, device) -> torch.Tensor:
        """One all-zero latent [1, C, G, G] in the head's dtype."""
        g, c = self.cfg.latent_grid, self.cfg.tokenizer.vae.latent_channels
        return torch.zeros(1, c, g, g, device=device, dtype=next(self.head.parameters()).dtype)

    def _idle_tokens(self, device) -> torch.Tensor:
        """Zero loss through the vision tokenizer, for batches without images."""
        tokens, patch_embeds = self.image_tokens(self._zero_latent(device))
        return tokens.sum() * 0.0 + patch_embeds.sum() * 0.0

    def _idle_head(self, device) -> torch.Tensor:
        """Zero loss through the flow head, for batches without generation images."""
        cfg = self.cfg
        xt = self._zero_latent(device)
        hidden = xt.new_zeros(1, cfg.tokens_per_image, cfg.llm.hidden_size)
        detail = xt.new_zeros(1, cfg.latent_grid**2, cfg.tokenizer.siglip.hidden_size)
        return self.head(hidden, torch.ones(1, device=device), detail, xt).sum() * 0.0
