"""Cheers attention masks (causal text, bidirectional images, packing, padding) and backends."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from cheers.attention import (
    attend,
    build_block_mask,
    build_dense_mask,
    causal_mask,
    doc_ids_from_padding,
    image_block_ids,
)
from cheers.errors import ConfigError, InputError

# Two packed documents and padding in row 0; left padding in row 1. Images: 2..4 (doc 0),
# 9..10 (doc 1), and in row 1 at 5..7.
DOC = torch.tensor([
    [0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, -1, -1],
    [-1, -1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
])
IS_IMG = torch.zeros(2, 14, dtype=torch.bool)
IS_IMG[0, 2:5] = IS_IMG[0, 9:11] = IS_IMG[1, 5:8] = True


def _rule(doc: torch.Tensor, block: torch.Tensor, q: int, k: int) -> bool:
    """The mask rule, written out one pair at a time."""
    if doc[q] < 0:
        return q == k
    same_image = block[q] >= 0 and block[q] == block[k]
    return bool(doc[q] == doc[k] and doc[k] >= 0 and (k <= q or same_image))


def test_image_block_ids_number_contiguous_runs():
    blocks = image_block_ids(IS_IMG)
    assert blocks[0].tolist() == [-1, -1, 0, 0, 0, -1, -1, -1, -1, 1, 1, -1, -1, -1]
    assert blocks[1, 5:8].tolist() == [0, 0, 0] and (blocks[1, :5] == -1).all()
    assert doc_ids_from_padding(torch.tensor([[0, 1, 1]])).tolist() == [[-1, 0, 0]]


@pytest.mark.parametrize("q_len", [14, 5, 1])
def test_dense_mask_follows_the_rule(q_len):
    block = image_block_ids(IS_IMG)
    mask = build_dense_mask(DOC, block, q_len=q_len)
    assert mask.shape == (2, 1, q_len, 14) and mask.dtype == torch.bool
    past = 14 - q_len
    for b in range(2):
        for qi in range(q_len):
            for k in range(14):
                assert mask[b, 0, qi, k].item() == _rule(DOC[b], block[b], past + qi, k), (b, qi, k)
    assert mask.any(-1).all()  # every row, padding included, sees something


def test_dense_mask_spot_checks():
    mask = build_dense_mask(DOC, image_block_ids(IS_IMG))[0, 0]
    assert mask[2, 4] and mask[4, 2]  # bidirectional inside the image
    assert not mask[1, 2]  # text never sees a later image token
    assert not mask[8, 3] and not mask[9, 6]  # no attention across packed documents
    assert mask[10, 9] and mask[9, 10] and not mask[11, 12]  # doc 1 image; padding key
    assert mask[12].tolist() == [k == 12 for k in range(14)]  # padding query: itself only


def test_no_ids_means_causal():
    doc = torch.zeros(1, 6, dtype=torch.long)
    assert torch.equal(build_dense_mask(doc), causal_mask(6, 6).expand(1, 1, 6, 6))
    assert torch.equal(build_dense_mask(doc, q_len=2), causal_mask(2, 6))


def _qkv(b=2, hq=4, hkv=2, lq=14, lk=14, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(b, hq, lq, d, generator=g),
        torch.randn(b, hkv, lk, d, generator=g),
        torch.randn(b, hkv, lk, d, generator=g),
    )


def _reference(q, k, v, mask):
    """Plain softmax attention with the heads repeated (GQA spelled out)."""
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    scores = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
    return scores.masked_fill(~mask, float("-inf")).softmax(-1) @ v


def test_sdpa_dense_mask_matches_reference_and_has_no_nan():
    q, k, v = _qkv()
    mask = build_dense_mask(DOC, image_block_ids(IS_IMG))
    out = attend(q, k, v, mask)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, _reference(q, k, v, mask), atol=1e-5, rtol=1e-5)


def test_causal_fast_path_and_cache_offset():
    q, k, v = _qkv()
    full = attend(q, k, v)  # is_causal fast path
    torch.testing.assert_close(full, _reference(q, k, v, causal_mask(14, 14)), atol=1e-5, rtol=1e-5)
    for lq in (1, 4):  # queries after a cache: bottom-right aligned causality
        torch.testing.assert_close(attend(q[:, :, -lq:], k, v), full[:, :, -lq:], atol=1e-5, rtol=1e-5)


def test_flex_matches_dense():
    q, k, v = _qkv()
    doc, block = DOC, image_block_ids(IS_IMG)
    try:
        block_mask = build_block_mask(doc, block)
        flex = attend(q, k, v, block_mask, backend="flex")
    except Exception as e:  # noqa: BLE001 - whatever this CPU build cannot do
        pytest.skip(f"FlexAttention cannot run on this CPU build: {type(e).__name__}: {e}")
    dense = attend(q, k, v, build_dense_mask(doc, block))
    # padding query rows: both see only themselves
    torch.testing.assert_close(flex, dense, atol=1e-5, rtol=1e-5)
    # a query chunk after a cache, and plain causal without a mask
    flex_tail = attend(q[:, :, -5:], k, v, build_block_mask(doc, block, q_len=5), backend="flex")
    torch.testing.assert_close(flex_tail, dense[:, :, -5:], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(attend(q, k, v, backend="flex"), attend(q, k, v), atol=1e-5, rtol=1e-5)


def test_backend_errors_are_clear():
    q, k, v = _qkv()
    with pytest.raises(ConfigError, match="unknown attention backend 'xformers'"):
        attend(q, k, v, backend="xformers")
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        with pytest.raises(ConfigError, match="flash-attn"):
            attend(q, k, v, backend="flash")
    with pytest.raises(InputError, match="plain causal"):
        attend(q, k, v, build_dense_mask(DOC), backend="flash")
    with pytest.raises(InputError, match="does not fit"):
        attend(q, k, v, torch.ones(2, 1, 14, 13, dtype=torch.bool))
    with pytest.raises(InputError, match="must be bool"):
        attend(q, k, v, torch.ones(2, 1, 14, 14))
    with pytest.raises(InputError, match="not a multiple"):
        attend(q, k[:, :1].expand(2, 3, 14, 8), v[:, :1].expand(2, 3, 14, 8))
    with pytest.raises(InputError, match="q_len=20"):
        build_dense_mask(DOC, q_len=20)


def test_gradients_match_the_reference_and_respect_the_mask():
    """Backward through the masked attention gives the plain softmax attention's gradients, and
    nothing flows across documents or into padding from other positions."""
    mask = build_dense_mask(DOC, image_block_ids(IS_IMG))
    target = torch.randn(2, 4, 14, 8, generator=torch.Generator().manual_seed(1))
    grads = []
    for fn in (attend, _reference):
        q, k, v = (t.double().requires_grad_() for t in _qkv())
        F.mse_loss(fn(q, k, v, mask), target.double()).backward()
        grads.append((q.grad, k.grad, v.grad))
    for ours, ref in zip(*grads):
        torch.testing.assert_close(ours, ref, atol=1e-10, rtol=1e-8)
    # a loss on document 0's queries of row 0 reaches no key or value of document 1 or padding
    q, k, v = (t.requires_grad_() for t in _qkv())
    out = attend(q, k, v, mask)
    doc0 = (DOC[0] == 0).nonzero().squeeze(1)
    out[0, :, doc0].square().sum().backward()
    others = DOC[0] != 0
    assert (k.grad[0, :, others] == 0).all() and (v.grad[0, :, others] == 0).all()
    assert k.grad[0, :, ~others].abs().sum() > 0 and v.grad[0, :, ~others].abs().sum() > 0
    # and a text query never sends gradient to a later key (causal), unless both are one image
    q, k, v = (t.requires_grad_() for t in _qkv())
    attend(q, k, v, mask)[0, :, 1].square().sum().backward()  # position 1: text, before the image at 2..4
    assert (k.grad[0, :, 2:] == 0).all() and k.grad[0, :, :2].abs().sum() > 0
