"""Inference engines: text-to-image sampling and autoregressive text decoding, with KV caches.

Text-to-image: the prompt (and its CFG null prompt) runs through the LLM once; its KV cache
is reused at every step, where only the image block is recomputed. The conditional and the
unconditional branch run as one batch, and the pixel decoder + SigLIP2 run once per step on
the shared ``xt``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from cheers.attention import build_dense_mask
from cheers.cuda_graphs import StaticDecoder, StaticVelocity
from cheers.decode_batch import DecodeBatch, RowSampling, pick_token
from cheers.errors import InputError
from cheers.flow_head import transport
from cheers.kv_cache import KVCache
from cheers.sequence import GEN_PLACEHOLDER, expand_placeholders, pack, prepend_image


@dataclass
class PrefixState:
    """The cached prompt of a batch of rows (left-padded to one length P)."""

    cache: KVCache
    doc_ids: torch.Tensor  # [R, P]: 0 for prompt tokens, -1 for left padding
    next_pos: torch.Tensor  # [R]: RoPE position of the first token after the prompt
    last_hidden: torch.Tensor  # [R, D]: final state of the last prompt token

    @property
    def length(self) -> int:
        return self.doc_ids.shape[1]


def left_pad(rows: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """ids [R, P] left-padded with ``pad`` and doc ids [R, P] (-1 on padding)."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    doc = torch.full((len(rows), width), -1, dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            ids[i, width - len(r):] = torch.tensor(r)
            doc[i, width - len(r):] = 0
    return ids, doc


class Engine:
    """Runs a ``CheersModel`` for inference. All methods are ``torch.no_grad``.

    ``static=True`` runs both loops as fixed-shape steps (``cheers.cuda_graphs``), replayed
    as CUDA graphs on a GPU; the default is on for CUDA models, off elsewhere (on a CPU the
    dynamic steps are cheaper). ``compile=True`` also compiles the decoding step.
    """

    def __init__(self, model, static: bool | None = None, compile: bool = False):
        self.model = model
        self.cfg = model.cfg
        self._static = static
        self.compile = compile

    @property
    def static(self) -> bool:
        return self.device.type == "cuda" if self._static is None else self._static

    @property
    def device(self) -> torch.device:
        # an offloaded model's weights live on the CPU and run where its hooks move them
        return getattr(self.model, "execution_device", None) or next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.llm.parameters()).dtype

    # ------------------------------------------------------------------ prompts

    @torch.no_grad()
    def prefill(self, rows: list[list[int]], images: list[list[torch.Tensor]],
                prefix_images: list[torch.Tensor | None] | None = None) -> PrefixState:
        """Run prompts through the LLM once and keep their KV cache.

        ``rows`` hold token ids with -200 placeholders for understanding images (``images[r]``
        in order, [3, H, W] in [0, 1], at t = 1). ``prefix_images[r]``, when given, is put in
        front of the row as causal tokens (the official dummy image of text-to-image prompts).
        """
        model, cfg = self.model, self.cfg
        seqs = []
        for r, ids in enumerate(rows):
            if any(tok == GEN_PLACEHOLDER for tok in ids):
                raise InputError("a prompt cannot hold an image-generation placeholder (-300)")
            seq = expand_placeholders(ids, None, cfg, images[r], [False] * len(images[r]))
            pre = prefix_images[r] if prefix_images is not None else None
            if pre is not None:
                seq = prepend_image(seq, pre, cfg.tokens_per_image, cfg.tokens.pad)
            seqs.append(seq)
        batch = pack(seqs, cfg)  # right-padded; re-laid left-padded below
        width = batch.input_ids.shape[1]
        lengths = [len(s) for s in seqs]
        shift = [width - n for n in lengths]
        device = self.device

        def left(x: torch.Tensor, fill: int) -> torch.Tensor:
            out = torch.full_like(x, fill)
            for r, s in enumerate(shift):
                out[r, s:] = x[r, : width - s]
            return out

        ids = left(batch.input_ids, cfg.tokens.pad).to(device)
        doc = left(batch.doc_ids, -1).to(device)
        index = left(batch.image_index, -1).to(device)
        slot = left(batch.image_slot, -1).to(device)
        block = left(batch.block_ids, -1).to(device)
        pos = left(batch.position_ids, 0).to(device)
        tokens = None
        if batch.num_images:
            x1 = model.tokenizer.encode(batch.images.to(device, self.dtype))
            tokens, _ = model.image_tokens(x1)  # t = 1: xt is the clean latent
        embeds = model.embed(ids, index, slot, tokens)
        cache = model.llm.new_cache(max_len=width + cfg.tokens_per_image + 1)
        hidden = model.llm.hidden_states(inputs_embeds=embeds, position_ids=pos,
                                         mask=build_dense_mask(doc, block), cache=cache)
        next_pos = torch.tensor(lengths, device=device)
        return PrefixState(cache=cache, doc_ids=doc, next_pos=next_pos, last_hidden=hidden[:, -1])

    # ------------------------------------------------------------------ images

    @torch.no_grad()
    def image_velocity(self, prefix: PrefixState, xt: torch.Tensor, t: float | torch.Tensor,
                       cfg_scale: float) -> torch.Tensor:
        """CFG velocity [B, C, G, G] at (xt, t) for a prefix holding B conditional rows followed
        by B null-prompt rows (or just B rows when ``cfg_scale == 1``); outside
        ``transport.cfg_interval`` the scale is 1, and an eager step (``t`` a float) then runs
        the conditional rows alone. ``t``: a float or a 0-dim tensor (what a captured graph
        reads; its shapes are fixed, so it runs every row and weighs them)."""
        model, n = self.model, self.cfg.tokens_per_image
        b = xt.shape[0]
        w = transport.guidance_scale(t, cfg_scale, self.cfg.transport.cfg_interval)
        rows = prefix.doc_ids.shape[0]
        cache = prefix.cache
        if rows > b and not torch.is_tensor(t) and w == 1.0:
            rows, cache = b, cache.first_rows(b)  # the null rows would be weighed 0
        tokens, patch_embeds = model.image_tokens(xt)  # once per step, shared by both branches
        reps = rows // b
        tokens, patch_embeds = tokens.repeat(reps, 1, 1), patch_embeds.repeat(reps, 1, 1)
        p = prefix.length
        doc = torch.cat([prefix.doc_ids[:rows], torch.zeros(rows, n, dtype=torch.long, device=xt.device)], 1)
        block = torch.cat([torch.full_like(prefix.doc_ids[:rows], -1),
                           torch.zeros(rows, n, dtype=torch.long, device=xt.device)], 1)
        pos = prefix.next_pos[:rows, None] + torch.arange(n, device=xt.device)[None]
        hidden = model.llm.hidden_states(inputs_embeds=tokens, position_ids=pos,
                                         mask=build_dense_mask(doc, block, q_len=n), cache=cache)
        cache.crop(p)  # drop the image block: the next step recomputes it
        tt = t.expand(rows) if torch.is_tensor(t) else torch.full((rows,), t, device=xt.device)
        v = model.velocity(hidden, tt, xt.repeat(reps, 1, 1, 1), patch_embeds)
        if reps == 1:
            return v
        v_cond, v_uncond = v[:b], v[b:]
        return v_uncond + w * (v_cond - v_uncond)

    @torch.no_grad()
    def sample_images(self, cond_rows: list[list[int]], null_rows: list[list[int]] | None, *,
                      noise: torch.Tensor, steps: int, cfg_scale: float, shift: float,
                      sampler: str = "euler", prefix_images: list[torch.Tensor | None] | None = None,
                      start: tuple[torch.Tensor, float] | None = None,
                      callback: Callable[[int], None] | None = None) -> torch.Tensor:
        """Latents [B, C, G, G] for B prompts (ids ending with ``<im_start>``).

        ``start=(x_src, t0)`` starts from ``t0 x_src + (1 - t0) noise`` at time t0 (editing).
        """
        use_cfg = null_rows is not None and cfg_scale != 1.0
        rows = cond_rows + (null_rows if use_cfg else [])
        pre = None
        if prefix_images is not None:
            pre = prefix_images + (prefix_images if use_cfg else [])
        prefix = self.prefill(rows, [[] for _ in rows], pre)
        x, t0 = noise.to(self.device, self.dtype), 0.0
        if start is not None:
            x_src, t0 = start
            x = transport.interpolate(x_src.to(x), x, torch.full((x.shape[0],), t0, device=x.device))

        def velocity(x_t: torch.Tensor, t: float | torch.Tensor) -> torch.Tensor:
            return self.image_velocity(prefix, x_t, t, cfg_scale)

        if self.static:  # every step has the same shapes: one graph for the whole velocity
            velocity = StaticVelocity(velocity, x)

        return transport.sample_ode(velocity, x, steps=steps, shift=shift, sampler=sampler, t_start=t0,
                                    official_last_step=self.cfg.transport.official_last_step,
                                    callback=callback)

    # ------------------------------------------------------------------ text

    @torch.no_grad()
    def decode_text(self, rows: list[list[int]], images: list[list[torch.Tensor]], *,
                    max_new_tokens: int, stop_ids: set[int], temperature: float = 0.0,
                    top_p: float = 1.0, generator: torch.Generator | None = None
                    ) -> Iterator[torch.Tensor]:
        """Yield the next token of every row, one step at a time (``[R]`` long each step).

        Greedy at ``temperature == 0``; otherwise temperature + nucleus (top-p) sampling. A row
        that emitted a stop id keeps emitting it; the loop ends when all rows have stopped.
        """
        if max_new_tokens < 1:
            raise InputError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if self.static:
            prefix = self.prefill(rows, images)
            logits = self.model.llm.logits(prefix.last_hidden)  # [R, V]
            static = StaticDecoder(self.model.llm, prefix.cache, prefix.doc_ids, prefix.next_pos.clone(),
                                   max_new_tokens, compile=self.compile)
            step = static.step
        else:
            batch = self.decode_batch()
            batch.join(rows, images, [RowSampling() for _ in rows])  # tokens are picked below, for all rows
            logits = batch.logits

            def step(nxt: torch.Tensor) -> torch.Tensor:
                batch.advance(nxt)
                return batch.logits

        done = torch.zeros(len(rows), dtype=torch.bool, device=logits.device)
        stop = torch.tensor(sorted(stop_ids), device=logits.device, dtype=torch.long)
        for _ in range(max_new_tokens):
            nxt = pick_token(logits, temperature, top_p, generator)
            nxt = torch.where(done, stop[0] if len(stop) else nxt, nxt)
            yield nxt
            done |= torch.isin(nxt, stop)
            if bool(done.all()):
                return
            logits = step(nxt)

    def decode_batch(self) -> DecodeBatch:
        """An empty batch of text decodes on this engine, which rows join and leave between
        steps (continuous batching, as the server runs its chats)."""
        return DecodeBatch(self)
