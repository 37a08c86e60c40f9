"""The one initialisation rule most of the model's small MLPs share."""

from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def normal_linears_(*modules: nn.Module | None, std: float = 0.02) -> None:
    """Every ``nn.Linear`` in ``modules`` and their submodules, in order: weight ~ N(0, std),
    bias 0. ``None`` entries (optional layers that are off) are skipped."""
    for module in modules:
        if module is None:
            continue
        for m in module.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=std)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
