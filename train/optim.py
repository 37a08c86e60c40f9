"""Which parameters train, the AdamW parameter groups, and learning-rate schedules."""

from __future__ import annotations

import fnmatch
import math

import torch
from torch import nn

from cheers.errors import ConfigError

from .config import TrainConfig

# wrappers that parallelize.py puts around modules; the names users write never have them
_WRAPPER_PARTS = ("_checkpoint_wrapped_module.", "_orig_mod.", "_fsdp_wrapped_module.")


def clean_name(name: str) -> str:
    """A parameter name without activation-checkpoint / compile wrapper components."""
    for part in _WRAPPER_PARTS:
        name = name.replace(part, "")
    return name


def _matches(name: str, pattern: str) -> bool:
    return name == pattern or name.startswith(pattern + ".") or fnmatch.fnmatchcase(name, pattern)


def select_trainable(model: nn.Module, patterns: list[str]) -> list[str]:
    """Set ``requires_grad`` by name patterns; return the trainable names, sorted.

    A pattern is a module or parameter path (``head``, ``llm.embed_tokens``: the path and
    everything under it) or an ``fnmatch`` glob (``*``, ``llm.layers.*.mlp.*``). A ``!``
    prefix excludes (``["*", "!tokenizer.vae"]``). A parameter trains when it matches an
    including pattern and no excluding one; a tied tensor answers to each of its names
    (``llm.lm_head`` selects the tied ``llm.embed_tokens.weight``), and all of them are
    returned. A pattern that matches nothing is an error: a typo must not silently freeze
    or train a module.
    """
    include = [p for p in patterns if not p.startswith("!")]
    exclude = [p[1:] for p in patterns if p.startswith("!")]
    if not include:
        raise ConfigError(f"train.trainable={patterns} has no including pattern")
    # a tied tensor (lm_head = embed_tokens) answers to all of its names
    aliases: dict[int, list[str]] = {}
    params: dict[int, nn.Parameter] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(param), []).append(clean_name(name))
        params[id(param)] = param
    names = [n for ns in aliases.values() for n in ns]
    for pattern in include + exclude:
        if not any(_matches(n, pattern) for n in names):
            raise ConfigError(
                f"train.trainable pattern {pattern!r} matches no parameter of the model "
                f"(top-level modules: {', '.join(n for n, _ in model.named_children())})"
            )
    trainable = []
    for key, param in params.items():
        ns = aliases[key]
        on = (any(_matches(n, p) for n in ns for p in include)
              and not any(_matches(n, p) for n in ns for p in exclude))
        param.requires_grad_(on)
        if on:
            trainable.extend(ns)
    if not trainable:
        raise ConfigError(f"train.trainable={patterns} leaves no parameter to train")
    return sorted(trainable)


def frozen_modules(model: nn.Module) -> list[nn.Module]:
    """Modules with parameters, none of them trainable, and no such ancestor.

    The trainer keeps these in eval mode so that dropout and batch-norm statistics of a
    frozen module stay as they are.
    """
    out: list[nn.Module] = []

    def visit(module: nn.Module) -> None:
        params = list(module.parameters())
        if params and not any(p.requires_grad for p in params):
            out.append(module)
            return
        for child in module.children():
            visit(child)

    visit(model)
    return out


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW over the trainable parameters in two groups.

    No weight decay on vectors (norm scales, biases) and on embedding tables: decay there
    pulls scales and rare-token rows to zero without regularising anything useful.
    """
    decay, no_decay = [], []
    seen: set[int] = set()
    for module in model.modules():
        for param in module.parameters(recurse=False):
            if not param.requires_grad or id(param) in seen:
                continue
            seen.add(id(param))
            if param.ndim < 2 or isinstance(module, nn.Embedding):
                no_decay.append(param)
            else:
                decay.append(param)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    params = [p for g in groups for p in g["params"]]
    fused = bool(params) and all(p.device.type == "cuda" for p in params)  # one kernel for all tensors
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr,
                             betas=(cfg.betas[0], cfg.betas[1]), eps=cfg.eps, fused=fused or None)


def lr_at(step: int, cfg: TrainConfig, time_frac: float = 0.0) -> float:
    """Learning rate of optimiser step ``step`` (0-based).

    ``time_frac`` (the spent fraction of ``max_seconds``) moves the decay on as if
    ``time_frac * steps`` steps had been taken, when that is further than ``step``. The
    warm-up always counts optimiser steps: it steadies Adam's first moments, and a
    time-budgeted run of 4,000 nominal steps would otherwise leave it after 1% of the time
    (4 steps of the shapes demo; its first curriculum phase then never used the prompt).

    Linear warm-up over ``cfg.warmup`` steps (the first step gets lr / warmup), then:
    ``constant``; ``cosine`` down to ``lr * min_lr_ratio`` at the last step; ``wsd``
    (warmup-stable-decay) flat until the last ``decay_frac`` of the steps, then linear
    down to ``lr * min_lr_ratio``.
    """
    warmup, total, floor = cfg.warmup, cfg.steps, cfg.min_lr_ratio
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    step = max(step, int(time_frac * total))
    if cfg.schedule == "constant":
        factor = 1.0
    elif cfg.schedule == "cosine":
        progress = min(1.0, (step - warmup) / max(1, total - 1 - warmup))
        factor = floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
    else:  # wsd
        decay_steps = max(1, round(cfg.decay_frac * total))
        start = total - decay_steps
        progress = min(1.0, max(0.0, (step - start + 1) / decay_steps))
        factor = 1.0 - (1.0 - floor) * progress
    return cfg.lr * factor


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
