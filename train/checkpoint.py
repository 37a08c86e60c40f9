"""Sharded checkpoints with ``torch.distributed.checkpoint``, resume, and export.

A run folder::

    out_dir/
      config.json            resolved RunConfig of the run
      metrics.jsonl          one line per logged step (rank 0)
      step_0001000/          a complete checkpoint
        .metadata *.distcp   model + optimizer (+ EMA), sharded: each rank writes its shard
        rank00000.pt ...     per rank: data position, RNG states (torch, cuda, numpy, python)
        config.json          resolved RunConfig
        trainer.json         step, world size, data streams; written last = complete
      step_0001500.tmp/      being written (or killed while written): ignored, then removed

A checkpoint is written into ``step_XXXXXXX.tmp`` and renamed when every rank is done, so
a folder without ``.tmp`` is whole. ``export`` turns a checkpoint into the plain folder
inference loads: ``config.json`` (the ModelConfig) + ``model.safetensors``, the layout of
``cheers.checkpoint.save_pretrained``.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)

from cheers.config import to_dict
from cheers.errors import CheckpointError
from cheers.text_tokenizer import copy_tokenizer_files

from .config import RunConfig
from .ema import EMA
from .optim import clean_name
from .parallelize import DistEnv, barrier

log = logging.getLogger("cheers.train")

_STEP_DIR = re.compile(r"^step_(\d{7,})$")


def step_dir(out_dir: str | Path, step: int) -> Path:
    return Path(out_dir) / f"step_{step:07d}"


def list_checkpoints(out_dir: str | Path) -> list[Path]:
    """Complete checkpoints in ``out_dir``, oldest first."""
    out = Path(out_dir)
    if not out.is_dir():
        return []
    found = []
    for p in out.iterdir():
        m = _STEP_DIR.match(p.name)
        if m and p.is_dir() and (p / "trainer.json").is_file():
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder from a checkpoint path or a run folder (its latest checkpoint)."""
    p = Path(path)
    if (p / "trainer.json").is_file():
        return p
    found = list_checkpoints(p)
    if found:
        return found[-1]
    if not p.exists():
        raise CheckpointError(f"checkpoint not found: {p}")
    raise CheckpointError(f"{p} is neither a checkpoint (no trainer.json) nor a run folder with one")


# --------------------------------------------------------------------------- RNG


def rng_state(device: torch.device) -> dict[str, Any]:
    """This process's RNG states, in a form ``torch.load(weights_only=True)`` accepts."""
    np_state = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": {"key": torch.from_numpy(np_state[1].astype(np.int64)), "pos": np_state[2],
                       "has_gauss": np_state[3], "gauss": np_state[4]}}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    npst = state["numpy"]
    np.random.set_state(("MT19937", npst["key"].numpy().astype(np.uint32), npst["pos"],
                         npst["has_gauss"], npst["gauss"]))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


# --------------------------------------------------------------------------- save / load


def _state(model: nn.Module, optimizer: torch.optim.Optimizer, ema: EMA | None,
           trained_only: bool = False) -> dict[str, Any]:
    if trained_only:  # a LoRA run: the frozen base comes from train.init_from, not the checkpoint
        options = StateDictOptions(ignore_frozen_params=True)
        model_sd, optim_sd = get_state_dict(model, optimizer, options=options)
        trained = {clean_name(n) for n, p in model.named_parameters() if p.requires_grad}
        model_sd = {k: v for k, v in model_sd.items() if k in trained}  # frozen buffers too
    else:
        model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    if ema is not None:
        state["ema"] = ema.state_dict()
    return state


def save_checkpoint(out_dir: str | Path, step: int, *, model: nn.Module,
                    optimizer: torch.optim.Optimizer, ema: EMA | None, rank_state: dict[str, Any],
                    run_cfg: RunConfig, env: DistEnv, keep_last: int, meta: dict[str, Any]) -> Path:
    """Write checkpoint ``step`` atomically and drop all but the newest ``keep_last``.

    Every rank calls this. ``rank_state`` is this rank's own (data position, RNG). A LoRA run
    (``run_cfg.lora.enabled``) saves only the parameters that train.
    """
    final = step_dir(out_dir, step)
    tmp = final.with_name(final.name + ".tmp")
    if env.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    dcp.save(_state(model, optimizer, ema, run_cfg.lora.enabled), checkpoint_id=str(tmp))
    torch.save(rank_state, tmp / f"rank{env.rank:05d}.pt")
    barrier()
    if env.is_main:
        (tmp / "config.json").write_text(json.dumps(run_cfg.to_dict(), indent=2) + "\n")
        # trainer.json last: its presence marks the folder complete
        (tmp / "trainer.json").write_text(json.dumps({"step": step, **meta}, indent=2) + "\n")
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in list_checkpoints(out_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    barrier()
    return final


def _config_diff(a: Any, b: Any, prefix: str = "model") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            out += _config_diff(a.get(k), b.get(k), f"{prefix}.{k}")
        return out
    return [] if a == b else [f"{prefix}: checkpoint {a!r}, config {b!r}"]


def _check_fits(path: Path, model_sd: dict[str, Any], run_cfg: RunConfig) -> None:
    """Raise CheckpointError when the checkpoint's model tensors do not fit the model."""
    meta = FileSystemReader(str(path)).read_metadata().state_dict_metadata
    saved = {k[len("model."):]: v.size for k, v in meta.items()
             if k.startswith("model.") and isinstance(v, TensorStorageMetadata)}
    problems = []
    for name, tensor in model_sd.items():
        if name not in saved:
            problems.append(f"{name}: not in the checkpoint")
        elif tuple(saved[name]) != tuple(tensor.shape):
            problems.append(f"{name}: checkpoint {tuple(saved[name])}, model {tuple(tensor.shape)}")
    problems += [f"{name}: in the checkpoint, not in the model" for name in saved if name not in model_sd]
    if problems:
        diff: list[str] = []
        cfg_file = path / "config.json"
        if cfg_file.is_file():
            saved_model = json.loads(cfg_file.read_text()).get("model", {})
            diff = _config_diff(saved_model, to_dict(run_cfg.model))
        raise CheckpointError(
            f"checkpoint {path} was written for another model config ({len(problems)} tensor(s) "
            f"differ: {'; '.join(problems[:3])}). Config differences: "
            f"{'; '.join(diff[:5]) or 'none recorded'}. Point train.resume / train.out_dir at a "
            "run of this config."
        )


def load_checkpoint(path: str | Path, *, model: nn.Module, optimizer: torch.optim.Optimizer,
                    ema: EMA | None, run_cfg: RunConfig, env: DistEnv) -> dict[str, Any]:
    """Load model, optimizer and EMA in place; return ``{"meta", "rank_states"}``.

    ``rank_states`` holds this rank's saved state when the world size is unchanged, else
    every rank's (the caller re-assigns data streams; RNG states are then reseeded).
    """
    path = resolve_checkpoint(path)
    meta = json.loads((path / "trainer.json").read_text())
    state = _state(model, optimizer, ema, run_cfg.lora.enabled)
    _check_fits(path, state["model"], run_cfg)
    saved_keys = FileSystemReader(str(path)).read_metadata().state_dict_metadata
    if ema is not None and not any(k.startswith("ema.") for k in saved_keys):
        log.warning("%s has no EMA: starting the EMA from the loaded weights", path)
        state.pop("ema")
    try:
        dcp.load(state, checkpoint_id=str(path))
    except Exception as e:  # DCP raises a CheckpointException listing every rank's error
        raise CheckpointError(
            f"cannot load {path}: {e}. The optimizer state must match train.trainable of the "
            "run that wrote it; to start a new stage from it, export it and use train.init_from"
        ) from e
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"],
                   options=StateDictOptions(strict=not run_cfg.lora.enabled))
    if ema is not None:
        if "ema" in state:
            ema.load_state_dict(state["ema"])
        else:
            ema.load_state_dict({n: p.detach() for n, p in ema.params.items()})
    if meta.get("world_size") == env.world_size:
        files = [path / f"rank{env.rank:05d}.pt"]
    else:
        files = sorted(path.glob("rank*.pt"))
    rank_states = [torch.load(f, weights_only=True) for f in files]
    return {"meta": meta, "rank_states": rank_states, "path": path}


# --------------------------------------------------------------------------- export


def full_state_from_checkpoint(path: str | Path, *, ema: bool = False) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """``(run config dict, full model state dict)`` of a checkpoint, read in this process.

    With ``ema`` the EMA weights replace the trainable ones. Needs no model class: the
    tensors' shapes come from the checkpoint's metadata.
    """
    path = resolve_checkpoint(path)
    run = json.loads((path / "config.json").read_text())
    meta = FileSystemReader(str(path)).read_metadata().state_dict_metadata

    def empty(prefix: str) -> dict[str, torch.Tensor]:
        return {k[len(prefix):]: torch.empty(v.size, dtype=v.properties.dtype)
                for k, v in meta.items() if k.startswith(prefix) and isinstance(v, TensorStorageMetadata)}

    state = {"model": empty("model.")}
    if ema:
        state["ema"] = empty("ema.")
        if not state["ema"]:
            raise CheckpointError(f"{path} has no EMA weights (train.ema_decay was 0)")
    dcp.load(state, checkpoint_id=str(path), no_dist=True)
    weights = state["model"]
    if ema:
        weights.update(state["ema"])
    return run, weights


def export(checkpoint: str | Path, out_dir: str | Path, *, ema: bool = False, merge: bool = False) -> Path:
    """Write ``out_dir/config.json`` (the ModelConfig) + ``model.safetensors`` (or shards).

    The layout of ``cheers.checkpoint.save_pretrained``: a tied ``lm_head`` is left out,
    ``cheers.checkpoint.load_pretrained`` and ``train.init_from`` read the folder. A LoRA run
    exports its adapter folder (``cheers.lora``), or with ``merge`` the base with the adapters
    folded in, as a plain folder.
    """
    from cheers.safetensors_io import write_json, write_state_dict

    run, weights = full_state_from_checkpoint(checkpoint, ema=ema)
    if run.get("lora", {}).get("enabled"):
        return _export_lora(run, weights, Path(out_dir), merge=merge, source=str(checkpoint))
    if merge:
        raise CheckpointError(f"{checkpoint} is not a LoRA run (lora.enabled is false): --merge has "
                              "no adapters to merge")
    head, embed = weights.get("llm.lm_head.weight"), weights.get("llm.embed_tokens.weight")
    if head is not None and embed is not None and torch.equal(head, embed):
        del weights["llm.lm_head.weight"]  # tied: the loader ties it again
    config = dict(run["model"])
    lcqat = run.get("lcqat", {})
    if lcqat.get("enabled"):  # a QAT run: LCQLinear parameters -> the packed 2-bit format
        from cheers.lcqat.pack import pack_lcq_state, section_for

        hadamard = lcqat.get("layer", {}).get("hadamard", "full")
        weights, names = pack_lcq_state(weights, hadamard)
        config["quantization"] = section_for(names, hadamard)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_state_dict(weights, out, max_shard_bytes=5 * 2**30)
    write_json(config, out / "config.json")
    _copy_run_tokenizer(run, out, source=str(checkpoint))
    log.info("exported %s (%d tensors%s) to %s", checkpoint, len(weights), ", EMA" if ema else "", out)
    return out


def _copy_run_tokenizer(run: dict[str, Any], out: Path, *, source: str) -> None:
    """Put the run's tokenizer (``data.text_tokenizer_dir``) beside an exported model, so the
    folder loads alone for inference; a tokenizer that has since gone is named in a warning."""
    folder = run.get("data", {}).get("text_tokenizer_dir") or ""
    if not (folder and copy_tokenizer_files(folder, out)):
        log.warning("%s: the run's tokenizer (data.text_tokenizer_dir=%r) has no tokenizer.json; copy one "
                    "into %s before using it for inference", source, folder, out)


def _export_lora(run: dict[str, Any], weights: dict[str, torch.Tensor], out: Path, *, merge: bool,
                 source: str) -> Path:
    """A LoRA run's export: its base model (``train.init_from`` / ``lcqat.init``) with the
    checkpoint's adapters and fully-trained tensors, written as an adapter folder or merged."""
    from cheers import lora
    from cheers.checkpoint import load_pretrained, save_pretrained

    base = run["train"].get("init_from") or run.get("lcqat", {}).get("init")
    if base is None or not Path(base).is_dir():
        raise CheckpointError(f"{source}: the LoRA run's base model {base!r} (train.init_from) is not a "
                              "folder; the adapters can only be exported with the base they were trained on")
    model = load_pretrained(base)
    diff = _config_diff(to_dict(model.cfg), run["model"])
    if diff:
        raise CheckpointError(f"{source}: the base {base} differs from the run's model config: {'; '.join(diff[:4])}")
    spec = run["lora"]
    cfg = lora.peft_config(rank=spec["rank"], alpha=spec["alpha"], dropout=spec["dropout"], target=spec["target"])
    lora.add_adapters(model, cfg)
    missing = sorted(set(lora.adapter_shapes(model)) - set(weights))
    if missing:
        raise CheckpointError(f"{source} lacks adapter tensors the run's lora section implies: {missing[:3]}")
    lora.load_into(model, weights, source=source)
    out.mkdir(parents=True, exist_ok=True)
    if merge:
        save_pretrained(lora.merge_adapters(model), out)
        if not copy_tokenizer_files(base, out):  # the base's tokenizer, or the run's
            _copy_run_tokenizer(run, out, source=source)
    else:
        trained = {k: v for k, v in weights.items() if not lora.is_adapter_name(k)}
        lora.save_adapter(model, out, cfg=cfg, trained=trained, base_config=to_dict(model.cfg), base=str(base))
    log.info("exported %s (LoRA, %s) to %s", source, "merged" if merge else "adapters", out)
    return out


def load_exported(folder: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """``(model config dict, state dict in our names)`` of a checkpoint folder.

    Reads our exported folders and released (official-layout) ones alike.
    """
    from cheers.adapters.official import official_to_ours
    from cheers.checkpoint import load_config
    from cheers.safetensors_io import read_state_dict

    cfg, official = load_config(folder)
    weights = read_state_dict(folder)
    if official:
        weights = official_to_ours(weights, cfg, source=str(folder))
    return to_dict(cfg), weights


def init_from_export(model: nn.Module, folder: str | Path, run_cfg: RunConfig, env: DistEnv,
                     convert: Callable[[dict[str, torch.Tensor], Path], dict[str, torch.Tensor]] | None = None
                     ) -> None:
    """Load a checkpoint folder into a (possibly sharded) model; rank 0 reads, all receive.

    ``convert(weights, folder)`` rewrites the folder's tensors first (LC-QAT: packed or dense
    layers -> ``LCQLinear`` parameters)."""
    own = get_model_state_dict(model)  # sharded tensors with their global shapes
    # tied tensors are stored once: fill the other names from the stored one
    aliases: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(param), []).append(clean_name(name))
    weights: dict[str, torch.Tensor] = {}
    error = ""
    if env.is_main:
        try:
            cfg_dict, weights = load_exported(folder)
            if convert is not None:
                weights = convert(weights, Path(folder))
        except CheckpointError as e:
            error = f"train.init_from: {e}"
        else:
            for names in aliases.values():
                have = next((n for n in names if n in weights), None)
                for n in names:
                    if have is not None and n not in weights:
                        weights[n] = weights[have]
            bad = [f"{k}: file {tuple(v.shape)}, model {tuple(own[k].shape)}"
                   for k, v in weights.items() if k in own and tuple(v.shape) != tuple(own[k].shape)]
            bad += [f"{m}: missing" for m in sorted(set(own) - set(weights))]
            bad += [f"{m}: not in the model" for m in sorted(set(weights) - set(own))]
            if bad:
                diff = _config_diff(cfg_dict, to_dict(run_cfg.model))
                error = (f"train.init_from={folder} does not fit the model: {'; '.join(bad[:3])}. "
                         f"Config differences: {'; '.join(diff[:5]) or 'none'}")
                if convert is None and any(k.endswith(".codes") for k in weights):
                    error += (". It is a packed LC-QAT checkpoint: train it with lcqat.enabled=true "
                              f"lcqat.init={folder}")
    distributed = dist.is_available() and dist.is_initialized()
    if distributed:  # every rank must raise, or the others wait in the broadcast forever
        box = [error]
        dist.broadcast_object_list(box, src=0)
        error = box[0]
    if error:
        raise CheckpointError(error)
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=distributed, strict=True)
    set_model_state_dict(model, weights, options=options)
