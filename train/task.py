"""The seam between the trainer and the model: what to build and how to batch samples.

A task is any object with::

    build_model(cfg: ModelConfig) -> nn.Module
        # model(batch) -> {"loss": scalar, ...components}; optional model.fsdp_units()
        # (modules sharded one by one before the root) and model.init_weights()
    build_collate(cfg: RunConfig) -> Callable[[list[RawSample]], Batch]
        # Batch: .to(device) -> Batch and .num_tokens (int, for tokens/s)

``train.task`` names it as ``"module:attribute"`` (a class is instantiated), so a run
started by ``torchrun`` in a fresh process finds it too. The default is the Cheers model.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any, Protocol

from torch import nn

from cheers.config import ModelConfig
from cheers.errors import ConfigError

from .config import RunConfig
from .data import RawSample


class Task(Protocol):
    def build_model(self, cfg: ModelConfig) -> nn.Module: ...

    def build_collate(self, cfg: RunConfig) -> Callable[[list[RawSample]], Any]: ...


class CheersTask:
    """The Cheers model (``cheers.model``) and its collate (``cheers.collate``)."""

    def build_model(self, cfg: ModelConfig) -> nn.Module:
        from cheers.model import CheersModel  # heavy; only when a run starts

        return CheersModel(cfg)

    def build_collate(self, cfg: RunConfig) -> Callable[[list[RawSample]], Any]:
        from cheers.collate import make_collate

        return make_collate(cfg.model, cfg.data.text_tokenizer_dir)


def load_task(spec: str) -> Task:
    """Import ``"package.module:Attribute"``; instantiate it when it is a class."""
    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ConfigError(f"train.task={spec!r}: cannot import {module_name!r}: {e}") from e
    if not hasattr(module, attr):
        raise ConfigError(f"train.task={spec!r}: {module_name} has no attribute {attr!r}")
    obj = getattr(module, attr)
    return obj() if isinstance(obj, type) else obj
