"""Process group set-up and the model's parallel wrapping (FSDP2, checkpointing, compile).

Order, as in every FSDP2 recipe: activation checkpointing wraps each unit first, then
``torch.compile`` compiles each (wrapped) unit, then ``fully_shard`` shards each unit and
finally the root. Units come from ``model.fsdp_units()`` (the LLM blocks and the flow
head blocks); whatever is not in a unit (embeddings, tokenizer, norms) belongs to the
root's group.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
    CheckpointImpl,
    checkpoint_wrapper,
)
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from cheers.errors import ConfigError

log = logging.getLogger("cheers.train")


@dataclass
class DistEnv:
    """Where this process sits: rank, world size, its device, and whether we made the group."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    owns_group: bool

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return dist.is_available() and dist.is_initialized()


def init_distributed(device: str = "auto", need_group: bool = True) -> DistEnv:
    """Join the torchrun job described by the environment, or run as one process.

    Under ``torchrun`` (``RANK``/``WORLD_SIZE`` set) this joins the rendezvous: NCCL on
    GPUs, gloo on CPUs; multi-node needs nothing else. Alone, it makes a one-rank group
    in memory when ``need_group`` (FSDP2 wants a mesh), so the same code path runs.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    if use_cuda and not torch.cuda.is_available():
        raise ConfigError("train.device=cuda but no CUDA device is visible")
    dev = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    backend = "nccl" if use_cuda else "gloo"
    owns = False
    if dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
    elif world > 1:
        dist.init_process_group(backend, device_id=dev if use_cuda else None)
        owns = True
    elif need_group:
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
        owns = True
    return DistEnv(rank=rank, world_size=world, local_rank=local_rank, device=dev, owns_group=owns)


def shutdown_distributed(env: DistEnv) -> None:
    """Leave the group we made (after a barrier: gloo aborts if a peer is still talking)."""
    if env.owns_group and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _replace(root: nn.Module, old: nn.Module, new: nn.Module) -> None:
    for module in root.modules():
        for name, child in module.named_children():
            if child is old:
                module.register_module(name, new)
                return
    raise ValueError("fsdp unit is not a submodule of the model")


def parallelize(model: nn.Module, env: DistEnv, *, dtype: str, fsdp: bool,
                activation_checkpointing: bool, compile: bool,
                reshard_after_forward: bool = True, frozen_units_in_root: bool = False) -> nn.Module:
    """Wrap ``model`` for training on ``env.device``; returns the (same) root module.

    ``dtype="bf16"`` on a GPU: FSDP2 keeps fp32 parameters and optimizer state, computes
    in bf16 and reduces gradients in fp32. On a CPU everything stays fp32 (CPU bf16 is
    slow and the CPU runs are for checking numerics).

    ``frozen_units_in_root`` (LoRA runs): units without a trainable parameter join the root's
    group instead of being sharded alone. Whether a frozen unit runs a backward depends on the
    batch (the flow head only when the rank's batch has generation images reaching it with a
    gradient), so ranks would disagree on its backward all-gathers and hang; the root's group is
    gathered once per forward and kept until the backward ends.
    """
    units = list(model.fsdp_units()) if hasattr(model, "fsdp_units") else []
    if fsdp and frozen_units_in_root:
        units = [u for u in units if any(p.requires_grad for p in u.parameters())]
    if activation_checkpointing:
        wrapped = []
        for unit in units:
            new = checkpoint_wrapper(unit, checkpoint_impl=CheckpointImpl.NO_REENTRANT,
                                     preserve_rng_state=True)
            _replace(model, unit, new)
            wrapped.append(new)
        units = wrapped
    if compile:
        compiled = []
        for unit in units:
            new = torch.compile(unit)
            _replace(model, unit, new)
            compiled.append(new)
        units = compiled
    if fsdp:
        if not env.distributed:
            raise ConfigError("train.fsdp=true needs a process group (init_distributed)")
        bf16 = dtype == "bf16" and env.device.type == "cuda"
        if dtype == "bf16" and not bf16:
            log.info("train.dtype=bf16 ignored on %s: training in fp32", env.device.type)
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if bf16 else None,
                                      reduce_dtype=torch.float32 if bf16 else None)
        for unit in units:
            fully_shard(unit, mp_policy=policy, reshard_after_forward=reshard_after_forward)
        # the root's parameters are used again at the end of the forward (lm_head, tied
        # to embed_tokens): resharding them after forward would only gather them twice
        fully_shard(model, mp_policy=policy, reshard_after_forward=False)
    elif env.world_size > 1:
        raise ConfigError("train.fsdp=false runs one process only; use FSDP with torchrun")
    return model


def autocast(env: DistEnv, dtype: str, fsdp: bool):
    """bf16 autocast for a GPU run without FSDP (FSDP's policy casts parameters itself)."""
    enabled = dtype == "bf16" and env.device.type == "cuda" and not fsdp
    return torch.autocast(device_type=env.device.type, dtype=torch.bfloat16, enabled=enabled)
