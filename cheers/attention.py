"""Attention masks for the Cheers token layout, and one attention function with three backends.

The layout of a (possibly packed, possibly padded) row is described by two integer tensors:

* ``doc_ids`` ``[B, L]``: packed-sample id of every token, ``-1`` for padding.
* ``block_ids`` ``[B, L]``: image-block id of every token, ``-1`` for text. All tokens of one
  image share an id.

Query ``q`` may attend key ``k`` iff ``doc[q] == doc[k]``, ``doc[k] >= 0`` and
(``k <= q`` or ``block[q] == block[k] >= 0``): causal over text, bidirectional inside an image,
and text never sees a later image token. A padding query attends only itself, so every row of
the mask has at least one True entry and no NaN can appear.

With a KV cache the queries are the last ``Lq`` of the ``Lk`` positions (indices
``Lk - Lq .. Lk - 1``); the ids always cover all ``Lk`` positions.
"""

from __future__ import annotations

import functools
import warnings
from typing import Literal

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor

from cheers.errors import ConfigError, InputError

try:  # FlexAttention is in every torch we support, but keep import errors readable
    from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention
except ImportError:  # pragma: no cover - very old torch
    BlockMask = None  # type: ignore[assignment,misc]
    create_block_mask = flex_attention = None  # type: ignore[assignment]

Backend = Literal["sdpa", "flex", "flash"]
BACKENDS: tuple[str, ...] = ("sdpa", "flex", "flash")

Mask = Tensor | BlockMask | None


# --------------------------------------------------------------------------- layout helpers


def image_block_ids(is_image: Tensor) -> Tensor:
    """Give every contiguous run of image tokens its own block id.

    Args:
        is_image: ``[B, L]`` bool, True at image tokens.
    Returns:
        ``[B, L]`` long: ``-1`` at text, ``0, 1, 2, ...`` per run (numbered across the row).
    """
    is_image = is_image.bool()
    prev = F.pad(is_image[:, :-1], (1, 0), value=False)  # [B, L]: was the previous token image?
    starts = is_image & ~prev
    run = torch.cumsum(starts.long(), dim=1) - 1  # [B, L]
    return torch.where(is_image, run, torch.full_like(run, -1))


def doc_ids_from_padding(attention_mask: Tensor) -> Tensor:
    """Turn a HF-style ``[B, L]`` 0/1 padding mask (1 = real token) into ``doc_ids`` (0 / -1)."""
    return torch.where(attention_mask.bool(), 0, -1).long()


def _check_ids(doc_ids: Tensor, block_ids: Tensor | None, q_len: int | None) -> tuple[Tensor, int]:
    if doc_ids.dim() != 2:
        raise InputError(f"doc_ids must be [B, L], got shape {tuple(doc_ids.shape)}")
    if block_ids is None:
        block_ids = torch.full_like(doc_ids, -1)
    elif block_ids.shape != doc_ids.shape:
        raise InputError(
            f"block_ids shape {tuple(block_ids.shape)} != doc_ids shape {tuple(doc_ids.shape)}"
        )
    lk = doc_ids.shape[1]
    lq = lk if q_len is None else q_len
    if not 0 < lq <= lk:
        raise InputError(f"q_len={q_len} must be in 1..{lk} (the number of key positions)")
    return block_ids, lq


# --------------------------------------------------------------------------- dense mask


def build_dense_mask(
    doc_ids: Tensor, block_ids: Tensor | None = None, *, q_len: int | None = None
) -> Tensor:
    """Boolean attention mask for SDPA (True = may attend).

    Args:
        doc_ids: ``[B, Lk]`` packed-sample id per key position, ``-1`` = padding.
        block_ids: ``[B, Lk]`` image-block id, ``-1`` = text; None means all text (causal).
        q_len: number of query positions, the last ``q_len`` of the ``Lk`` (default ``Lk``).
    Returns:
        ``[B, 1, Lq, Lk]`` bool.
    """
    block_ids, lq = _check_ids(doc_ids, block_ids, q_len)
    lk = doc_ids.shape[1]
    past = lk - lq
    q_pos = torch.arange(past, lk, device=doc_ids.device)  # [Lq]
    k_pos = torch.arange(lk, device=doc_ids.device)  # [Lk]

    doc_q = doc_ids[:, past:, None]  # [B, Lq, 1]
    doc_k = doc_ids[:, None, :]  # [B, 1, Lk]
    blk_q = block_ids[:, past:, None]
    blk_k = block_ids[:, None, :]

    causal = k_pos[None, None, :] <= q_pos[None, :, None]  # [1, Lq, Lk]
    same_image = (blk_q == blk_k) & (blk_q >= 0)  # [B, Lq, Lk]
    allowed = (doc_q == doc_k) & (doc_k >= 0) & (causal | same_image)
    # A padding query would have an empty row (softmax of all -inf = NaN): let it see itself.
    self_pad = (doc_q < 0) & (k_pos[None, None, :] == q_pos[None, :, None])
    return rearrange(allowed | self_pad, "b q k -> b 1 q k")


def causal_mask(lq: int, lk: int, device: torch.device | str | None = None) -> Tensor:
    """``[1, 1, Lq, Lk]`` bool causal mask with the queries at the last ``Lq`` positions."""
    q_pos = torch.arange(lk - lq, lk, device=device)
    k_pos = torch.arange(lk, device=device)
    return rearrange(k_pos[None, :] <= q_pos[:, None], "q k -> 1 1 q k")


# --------------------------------------------------------------------------- block mask


def build_block_mask(
    doc_ids: Tensor,
    block_ids: Tensor | None = None,
    *,
    q_len: int | None = None,
    block_size: int = 128,
) -> BlockMask:
    """FlexAttention ``BlockMask`` for the same rule as :func:`build_dense_mask`.

    Only the ``[B, Lk]`` id tensors are kept (no ``Lq x Lk`` tensor), so this scales to long
    packed sequences. Built on the ids' device; compiled on CUDA, where long masks would
    otherwise materialise in memory.
    """
    if create_block_mask is None:  # pragma: no cover
        raise ConfigError("this torch has no torch.nn.attention.flex_attention")
    block_ids, lq = _check_ids(doc_ids, block_ids, q_len)
    bsz, lk = doc_ids.shape
    past = lk - lq
    doc_ids = doc_ids.long()
    block_ids = block_ids.long()

    def mask_mod(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        q = q_idx + past  # absolute position of the query
        doc_q, doc_k = doc_ids[b, q], doc_ids[b, kv_idx]
        blk_q, blk_k = block_ids[b, q], block_ids[b, kv_idx]
        visible = (kv_idx <= q) | ((blk_q == blk_k) & (blk_q >= 0))
        allowed = (doc_q == doc_k) & (doc_k >= 0) & visible
        return allowed | ((doc_q < 0) & (kv_idx == q))

    on_cuda = doc_ids.device.type == "cuda"
    return create_block_mask(
        mask_mod, bsz, None, lq, lk, device=doc_ids.device, BLOCK_SIZE=block_size, _compile=on_cuda
    )


def build_causal_block_mask(lq: int, lk: int, device: torch.device | str) -> BlockMask:
    """Plain causal ``BlockMask`` with the ``lq`` queries at the last of ``lk`` positions."""
    past = lk - lq

    def mask_mod(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        return kv_idx <= q_idx + past

    return create_block_mask(mask_mod, None, None, lq, lk, device=device)


# --------------------------------------------------------------------------- attend


@functools.cache
def _compiled_flex():
    # One compiled wrapper per process; torch.compile's default marks a length dynamic after
    # it first changes, so a new sequence length does not recompile every time.
    return torch.compile(flex_attention)


def _flex(q: Tensor, k: Tensor, v: Tensor, mask: BlockMask, scale: float | None) -> Tensor:
    gqa = q.shape[1] != k.shape[1]
    if q.is_cuda:
        return _compiled_flex()(q, k, v, block_mask=mask, scale=scale, enable_gqa=gqa)
    # Off CUDA we run the unfused reference path on purpose (compiling for CPU costs ~20 s per
    # shape); torch warns about its speed, which is expected here.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
        return flex_attention(q, k, v, block_mask=mask, scale=scale, enable_gqa=gqa)


def _flash(q: Tensor, k: Tensor, v: Tensor, scale: float | None) -> Tensor:
    try:
        from flash_attn import flash_attn_func
    except ImportError as e:
        raise ConfigError(
            "attention backend 'flash' needs the optional package flash-attn "
            f"(pip install flash-attn), which cannot be imported here ({e}); use backend='sdpa'"
        ) from e
    if not q.is_cuda or q.dtype not in (torch.float16, torch.bfloat16):
        raise InputError(
            f"backend 'flash' needs CUDA fp16/bf16 tensors, got {q.dtype} on {q.device}"
        )
    # flash_attn takes [B, L, H, D], handles GQA itself and aligns causality bottom-right,
    # which is what a query chunk after a KV cache needs.
    out = flash_attn_func(
        rearrange(q, "b h l d -> b l h d"),
        rearrange(k, "b h l d -> b l h d"),
        rearrange(v, "b h l d -> b l h d"),
        softmax_scale=scale,
        causal=True,
    )
    return rearrange(out, "b l h d -> b h l d")


def attend(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: Mask = None,
    backend: Backend = "sdpa",
    *,
    scale: float | None = None,
) -> Tensor:
    """Scaled dot-product attention with grouped-query heads.

    Args:
        q: ``[B, Hq, Lq, Dh]`` queries, the last ``Lq`` of the ``Lk`` positions.
        k, v: ``[B, Hkv, Lk, Dh]`` with ``Hq % Hkv == 0``.
        mask: None = causal (bottom-right aligned when ``Lq < Lk``); a bool
            ``[B or 1, 1 or Hq, Lq, Lk]`` tensor from :func:`build_dense_mask`; or a FlexAttention
            ``BlockMask`` from :func:`build_block_mask` (backend ``"flex"`` only).
        backend: ``"sdpa"`` (default), ``"flex"`` or ``"flash"`` (flash-attn, plain causal only).
        scale: softmax scale, default ``Dh ** -0.5``.
    Returns:
        ``[B, Hq, Lq, Dh]``.
    """
    if backend not in BACKENDS:
        raise ConfigError(f"unknown attention backend {backend!r}; known: {', '.join(BACKENDS)}")
    hq, hkv = q.shape[1], k.shape[1]
    if hq % hkv:
        raise InputError(f"{hq} query heads is not a multiple of {hkv} key/value heads")
    lq, lk = q.shape[2], k.shape[2]
    if lq > lk:
        raise InputError(f"{lq} queries but only {lk} keys: queries must be the last keys")
    is_block_mask = BlockMask is not None and isinstance(mask, BlockMask)

    if backend == "flash":
        if mask is not None:
            raise InputError("backend 'flash' supports plain causal attention only (mask=None)")
        return _flash(q, k, v, scale)

    if backend == "flex":
        if mask is None:
            mask = build_causal_block_mask(lq, lk, q.device)
        elif not is_block_mask:
            raise InputError(
                "backend 'flex' needs a BlockMask (cheers.attention.build_block_mask), "
                f"got {type(mask).__name__}"
            )
        return _flex(q, k, v, mask, scale)

    # sdpa
    if is_block_mask:
        raise InputError("a BlockMask needs backend='flex'; use build_dense_mask for 'sdpa'")
    gqa = hq != hkv
    if mask is None:
        if lq == lk:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=gqa)
        if lq == 1:  # the single newest query sees every cached key
            return F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=gqa)
        mask = causal_mask(lq, lk, q.device)
    if mask.dtype != torch.bool:
        raise InputError(f"a dense attention mask must be bool (True = attend), got {mask.dtype}")
    if mask.dim() != 4 or mask.shape[-2:] != (lq, lk):
        raise InputError(
            f"dense attention mask of shape {tuple(mask.shape)} does not fit [B, 1, {lq}, {lk}] "
            "(queries x keys, keys counting the cache)"
        )
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa)
