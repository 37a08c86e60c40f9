"""GPU kernels for packed LC-QAT layers (Triton, imported lazily: CPU-only machines never load it).

The product ``What @ x~`` of a packed layer needs no codebook: with ``What[r, 4g + j] =
sum_i A[j, i] z[r, g, i] + b[j]``,

    (What x~)_r = sum_{g, i} z[r, g, i] * x'[g, i] + c,   x'[g, :] = x~[4g : 4g + 4] @ A,
                                                          c = sum_g x~[4g : 4g + 4] . b

so the kernels multiply the raw 2-bit codes (0..3) with a transformed activation ``x'``, and
``c`` is one number per input row. For at most ``GEMV_MAX_ROWS`` rows a fused decode-GEMV
reads each code byte once per row (the bytes stay in L2 across rows); above that the codes are
decoded to a dense ``[m, n]`` matrix of 0..3 in the activation dtype and multiplied by GEMM.
"""

from __future__ import annotations

import functools
import importlib.util

import torch
from torch import Tensor

from cheers.errors import InputError

from .codes import unpack_codes

GEMV_MAX_ROWS = 8


def triton_available() -> bool:
    """True where the Triton path can run: a CUDA device and the ``triton`` package."""
    return torch.cuda.is_available() and importlib.util.find_spec("triton") is not None


def split_activation(xt: Tensor, a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """``x' = x~ (4-groups) @ A`` and ``c = sum x~ . b``. xt: [B, n] -> ([B, n/4, 4], [B])"""
    bsz, n = xt.shape
    xg = xt.reshape(bsz, n // 4, 4)  # [B, G, 4]
    return xg @ a.to(xt.dtype), (xg @ b.to(xt.dtype)).sum(-1)


def reference_lcq_matmul(xt: Tensor, codes: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """The kernels' algebra in plain PyTorch (any device): ``codes x' + c``. [B, n] -> [B, m]"""
    xp, c = split_activation(xt.float(), a.float(), b.float())
    z = unpack_codes(codes).float()  # [m, n]
    return xp.reshape(xt.shape[0], -1) @ z.T + c[:, None]


@functools.cache
def _kernels():
    import triton
    import triton.language as tl

    configs = [
        triton.Config({"BLOCK_M": bm, "BLOCK_W": bw}, num_warps=w)
        for bm, bw, w in [(16, 64, 4), (32, 32, 4), (8, 128, 4), (32, 64, 8), (64, 32, 8), (16, 128, 8), (4, 256, 4)]
    ]

    @triton.jit
    def _decode(words, s: tl.constexpr):
        # code s of each int32 word (byte s // 4, bits 2 (s % 4)) as an exact float32 0..3:
        # OR-ing the 2 bits into the mantissa of 2^23 and subtracting 2^23 avoids the slow
        # int-to-float conversion instruction
        bits = ((words >> (2 * s)) & 3) | 0x4B000000
        return bits.to(tl.float32, bitcast=True) - 8388608.0

    @triton.autotune(configs=configs, key=["M", "W"])
    @triton.jit
    def gemv_kernel(words_ptr, xs_ptr, c_ptr, out_ptr, M, W, BLOCK_M: tl.constexpr, BLOCK_W: tl.constexpr):
        # one program: one activation row (axis 0, fastest, so rows share code tiles in L2) and
        # BLOCK_M output rows. words: [M, W] int32 (16 codes each); xs: [B, 16, W] float32
        pid_b = tl.program_id(0)
        pid_m = tl.program_id(1)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        mask_m = offs_m < M
        x_row = xs_ptr + pid_b * 16 * W
        acc = tl.zeros((BLOCK_M, BLOCK_W), dtype=tl.float32)
        for w0 in range(0, W, BLOCK_W):
            offs_w = w0 + tl.arange(0, BLOCK_W)
            mask_w = offs_w < W
            words = tl.load(words_ptr + offs_m[:, None] * W + offs_w[None, :], mask=mask_m[:, None] & mask_w[None, :], other=0)
            for s in tl.static_range(16):
                xv = tl.load(x_row + s * W + offs_w, mask=mask_w, other=0.0)
                acc += _decode(words, s) * xv[None, :]
        y = tl.sum(acc, axis=1) + tl.load(c_ptr + pid_b)
        tl.store(out_ptr + pid_b * M + offs_m, y, mask=mask_m)

    dot_configs = [
        triton.Config({"BLOCK_M": bm, "BLOCK_W": bw}, num_warps=w)
        for bm, bw, w in [(64, 64, 4), (128, 32, 4), (32, 128, 4), (64, 128, 8), (128, 64, 8)]
    ]

    @triton.autotune(configs=dot_configs, key=["M", "W"])
    @triton.jit
    def gemv_dot_kernel(words_ptr, xs_ptr, c_ptr, out_ptr, M, W, B, BLOCK_M: tl.constexpr, BLOCK_W: tl.constexpr):
        # all (<= 16) activation rows in one program, so each code is decoded once: the decoded
        # bf16 tile meets the rows in a tensor-core dot. xs: [B, 16, W] float32 (rounded to bf16)
        pid_m = tl.program_id(0)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        mask_m = offs_m < M
        offs_b = tl.arange(0, 16)
        mask_b = offs_b < B
        acc = tl.zeros((BLOCK_M, 16), dtype=tl.float32)
        for w0 in range(0, W, BLOCK_W):
            offs_w = w0 + tl.arange(0, BLOCK_W)
            mask_w = offs_w < W
            words = tl.load(words_ptr + offs_m[:, None] * W + offs_w[None, :], mask=mask_m[:, None] & mask_w[None, :], other=0)
            for s in tl.static_range(16):
                xv = tl.load(
                    xs_ptr + offs_b[None, :] * (16 * W) + s * W + offs_w[:, None],
                    mask=mask_w[:, None] & mask_b[None, :],
                    other=0.0,
                ).to(tl.bfloat16)  # [BLOCK_W, 16]
                acc += tl.dot(_decode(words, s).to(tl.bfloat16), xv)
        acc += tl.load(c_ptr + offs_b, mask=mask_b, other=0.0)[None, :]
        tl.store(out_ptr + offs_b[None, :] * M + offs_m[:, None], acc, mask=mask_m[:, None] & mask_b[None, :])

    @triton.jit
    def decode_kernel(words_ptr, out_ptr, M, W, BLOCK_M: tl.constexpr, BLOCK_W: tl.constexpr):
        # words [M, W] int32 -> out [M, 16 W]: code s of word w at column s * W + w (planar)
        offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_w = tl.program_id(1) * BLOCK_W + tl.arange(0, BLOCK_W)
        mask = (offs_m < M)[:, None] & (offs_w < W)[None, :]
        words = tl.load(words_ptr + offs_m[:, None] * W + offs_w[None, :], mask=mask, other=0)
        base = out_ptr + offs_m[:, None] * (16 * W) + offs_w[None, :]
        for s in tl.static_range(16):
            tl.store(base + s * W, _decode(words, s).to(out_ptr.dtype.element_ty), mask=mask)

    return triton, gemv_kernel, decode_kernel, gemv_dot_kernel


def planar_activation(xp: Tensor) -> Tensor:
    """``x'`` [B, G, 4] -> [B, 16, G/4] in the order of the codes in an int32 word:
    entry ``(4j + i, w)`` multiplies code ``i`` of byte ``j`` of word ``w`` (group ``4w + j``)."""
    bsz, g, _ = xp.shape
    return xp.reshape(bsz, g // 4, 4, 4).permute(0, 2, 3, 1).reshape(bsz, 16, g // 4)


def decode_codes(codes: Tensor, dtype: torch.dtype) -> Tensor:
    """Packed codes [m, n/4] -> dense codes [m, n] (values 0..3) in ``dtype``, on the GPU, in
    the planar column order of ``planar_activation``."""
    triton, _, decode_kernel, _ = _kernels()
    words = codes.contiguous().view(torch.int32)  # [m, n/16]
    m, w = words.shape
    out = torch.empty(m, 16 * w, device=codes.device, dtype=dtype)
    bm, bw = 16, 128
    decode_kernel[(triton.cdiv(m, bm), triton.cdiv(w, bw))](words, out, m, w, BLOCK_M=bm, BLOCK_W=bw)
    return out


def lcq_matmul(xt: Tensor, codes: Tensor, a: Tensor, b: Tensor, out_dtype: torch.dtype = torch.float32) -> Tensor:
    """``What @ x~`` for rows of ``xt`` [B, n] (float32, on CUDA) and packed ``codes`` [m, n/4].

    B <= 8: fused decode-GEMV in float32 (for 2..8 rows with a half-precision ``out_dtype``: one
    program per row block decodes once and uses a tensor-core dot, activations rounded to
    bf16). Above: decode to ``out_dtype`` then GEMM in
    ``out_dtype``. Sizes ``n`` that are not a multiple of 16 take the PyTorch reference.
    Returns [B, m] (float32 for the GEMV, ``out_dtype`` for the GEMM).
    """
    if not xt.is_cuda or not codes.is_cuda:
        raise InputError("lcq_matmul runs on CUDA tensors; use the reference path on the CPU")
    bsz, n = xt.shape
    m, g = codes.shape
    if n != 4 * g:
        raise InputError(f"activation size {n} does not match packed codes of shape {tuple(codes.shape)}")
    if n % 16:
        return reference_lcq_matmul(xt, codes, a, b)
    xp, c = split_activation(xt.float(), a.float(), b.float())  # [B, G, 4], [B]
    xs = planar_activation(xp)  # [B, 16, G/4]
    if bsz <= GEMV_MAX_ROWS:
        triton, gemv_kernel, _, gemv_dot_kernel = _kernels()
        words = codes.contiguous().view(torch.int32)  # [m, n/16]
        out = torch.empty(bsz, m, device=xt.device, dtype=torch.float32)
        if bsz > 1 and out_dtype in (torch.bfloat16, torch.float16):
            # several rows at half precision: decode once, tensor-core dot with all rows
            gemv_dot_kernel[lambda meta: (triton.cdiv(m, meta["BLOCK_M"]),)](
                words, xs.contiguous(), c.contiguous(), out, m, words.shape[1], bsz
            )
            return out

        def grid(meta: dict) -> tuple[int, int]:
            return (bsz, triton.cdiv(m, meta["BLOCK_M"]))

        gemv_kernel[grid](words, xs.contiguous(), c.contiguous(), out, m, words.shape[1])
        return out
    z = decode_codes(codes, out_dtype)  # [m, n], planar column order
    return (xs.reshape(bsz, n).to(out_dtype) @ z.T).float().add_(c[:, None]).to(out_dtype)
