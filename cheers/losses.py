"""Cross-entropy through the output projection without materialising the full logits.

``linear_cross_entropy(hidden, weight, targets)`` equals
``F.cross_entropy((hidden @ weight.T).float(), targets)`` but walks the tokens in chunks:
each chunk's logits ``[c, V]`` are made, reduced (log-sum-exp in fp32) and turned into
gradients for ``hidden`` and ``weight`` at once, inside the forward. At a 152k vocabulary
and 16k tokens a step, the fp32 logits alone would be 10 GB (plus their bf16 copy and their
gradient); here one chunk of them exists at a time, and the backward is a scaling of the
stored gradients. The price: the gradients are computed even when ``backward`` is never
called, so use it for training losses only (``torch.no_grad`` / evaluation takes the plain
path automatically).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from cheers.sequence import IGNORE


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, targets: Tensor, chunk: int, ignore_index: int) -> Tensor:
        # hidden [N, D], weight [V, D], targets [N]
        n = hidden.shape[0]
        valid = targets != ignore_index
        count = valid.sum().clamp_min(1).to(torch.float32)
        want_h, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h = torch.empty_like(hidden) if want_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_w else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for s in range(0, n, chunk):
            h, t, ok = hidden[s : s + chunk], targets[s : s + chunk], valid[s : s + chunk]
            logits = (h @ weight.T).float()  # [c, V]
            lse = torch.logsumexp(logits, dim=-1)  # [c]
            t_safe = torch.where(ok, t, 0)
            picked = logits.gather(1, t_safe[:, None]).squeeze(1)
            total += ((lse - picked) * ok).sum()
            if not (want_h or want_w):
                continue
            # d(mean loss)/d logits = (softmax - onehot) * valid / count
            probs = logits.sub_(lse[:, None]).exp_()
            probs[torch.arange(len(t), device=t.device), t_safe] -= 1.0
            probs.mul_((ok.to(probs.dtype) / count)[:, None])
            g = probs.to(hidden.dtype)  # [c, V]
            if want_h:
                grad_h[s : s + chunk] = g @ weight
            if want_w:
                grad_w += g.T @ h  # product in the input dtype, summed over chunks in fp32
        ctx.save_for_backward(*(x for x in (grad_h, grad_w) if x is not None))
        ctx.want = (want_h, want_w)
        ctx.weight_dtype = weight.dtype
        return total / count

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        saved = iter(ctx.saved_tensors)
        want_h, want_w = ctx.want
        grad_h = grad_w = None
        if want_h:
            stored = next(saved)
            grad_h = stored * grad_out.to(stored.dtype)
        if want_w:
            grad_w = (next(saved) * grad_out).to(ctx.weight_dtype)
        return grad_h, grad_w, None, None, None


def linear_cross_entropy(hidden: Tensor, weight: Tensor, targets: Tensor, *, chunk: int = 4096,
                         ignore_index: int = IGNORE) -> Tensor:
    """Mean CE of ``hidden [N, D] @ weight.T [D, V]`` against ``targets [N]`` (ignored ones skipped).

    Chunked and fused with its backward when gradients are wanted; the plain
    ``F.cross_entropy`` otherwise (same value). Logits are reduced in fp32 whatever the
    input dtype, as the plain path does with ``.float()``.
    """
    if hidden.dim() != 2 or targets.shape != hidden.shape[:1] or weight.shape[1] != hidden.shape[1]:
        raise ValueError(
            f"linear_cross_entropy: hidden {tuple(hidden.shape)}, weight {tuple(weight.shape)}, "
            f"targets {tuple(targets.shape)} (want [N, D], [V, D], [N])"
        )
    if not torch.is_grad_enabled() or not (hidden.requires_grad or weight.requires_grad):
        return F.cross_entropy((hidden @ weight.T).float(), targets, ignore_index=ignore_index)
    return _LinearCrossEntropy.apply(hidden, weight, targets, chunk, ignore_index)
