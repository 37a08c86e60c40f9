"""Exponential moving average of the trainable weights."""

from __future__ import annotations

import torch
from torch import nn

from .optim import clean_name


class EMA:
    """``shadow = decay * shadow + (1 - decay) * param`` after every optimiser step.

    Shadows are kept for trainable parameters only (frozen ones never move), in the
    parameters' own dtype and layout: under FSDP2 each rank holds the EMA of its shard,
    so the EMA costs one extra copy of the trainable shard and is saved sharded like the
    model. Keys are clean parameter names, as in the model's state dict.
    """

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.params = {clean_name(n): p for n, p in model.named_parameters() if p.requires_grad}
        self.shadow = {n: p.detach().clone() for n, p in self.params.items()}

    @torch.no_grad()
    def update(self) -> None:
        for name, param in self.params.items():
            self.shadow[name].lerp_(param.detach(), 1.0 - self.decay)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The shadow tensors themselves (``torch.distributed.checkpoint`` loads in place)."""
        return self.shadow

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        missing = sorted(set(self.shadow) - set(state))
        if missing:
            raise KeyError(f"EMA state lacks {missing[:3]}")
        for name, value in state.items():
            if value is not self.shadow[name]:
                self.shadow[name].copy_(value)
