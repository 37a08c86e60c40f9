"""The one training loop of the shapes world's pretrained parts: its VAE and semantic encoder.

The released model starts from a pretrained VAE and SigLIP2; the shapes world trains small
ones of its own first (``cheers.shapes.autoencoder``, ``cheers.shapes.semantic``), both through
:func:`pretrain`: AdamW without weight decay, gradient clipping, and a cosine decay of the
learning rate to 0 over the budget.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable

import torch
from torch import Tensor, nn
from tqdm import tqdm

from cheers.errors import InputError


def pretrain(loss_fn: Callable[[int], Tensor | tuple[Tensor, Tensor]], params: Iterable[nn.Parameter], *,
             lr: float, steps: int | None = None, seconds: float | None = None, max_grad_norm: float = 1.0,
             desc: str | None = None) -> list[float]:
    """Minimise ``loss_fn(step)`` (``step`` counts optimiser steps from 0); return the curve.

    The budget is ``steps`` optimiser steps, ``seconds`` of wall clock, or both (whichever
    ends first). The learning rate decays over the steps when they are given, so a run of a
    fixed step count is the same on any machine; otherwise over the seconds. ``loss_fn`` may
    return ``(loss, logged)``: the curve then holds ``logged`` (e.g. a reconstruction term
    without its regulariser). ``desc`` shows a progress bar under that name.
    """
    if steps is None and seconds is None:
        raise InputError("pretrain needs a budget: steps, seconds or both")
    if steps is not None and steps < 1:
        raise InputError(f"steps={steps}; must be >= 1")
    if seconds is not None and not (math.isfinite(seconds) and seconds > 0):
        raise InputError(f"seconds={seconds}; must be a finite number > 0")
    params = list(params)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    bar = tqdm(total=steps, desc=desc, unit="step", leave=False) if desc else None
    losses: list[float] = []
    start = time.monotonic()
    step = 0
    while (steps is None or step < steps) and (seconds is None or time.monotonic() - start < seconds):
        done = step / steps if steps is not None else (time.monotonic() - start) / seconds
        for g in opt.param_groups:
            g["lr"] = lr * 0.5 * (1 + math.cos(math.pi * min(1.0, done)))
        out = loss_fn(step)
        loss, logged = out if isinstance(out, tuple) else (out, out)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(params, max_grad_norm)
        opt.step()
        losses.append(logged.item())
        step += 1
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.4f}")
    if bar is not None:
        bar.close()
    return losses
