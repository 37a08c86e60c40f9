"""LoRA adapters on the Cheers model through ``peft``: inject, initialise, save, load, merge.

Adapters go into the model in place (``peft.inject_adapter_in_model``), so the model keeps its
class, its ``forward(batch)`` and its FSDP units; an adapted linear ``llm.layers.0.mlp.up_proj``
becomes peft's ``lora.Linear`` with the original layer as ``base_layer`` and the low-rank pair
``lora_A.default`` [r, in] / ``lora_B.default`` [out, r] beside it:
``y = base(x) + (alpha / r) * B(A(dropout(x)))``.

An adapter folder (what ``cheers export`` writes for a LoRA run, what ``--lora DIR`` reads)::

    adapter_config.json        peft's LoraConfig (rank, alpha, dropout, target regex)
    adapter_model.safetensors  the lora_A / lora_B tensors, in peft's names
    trained.safetensors        the tensors the run trained fully beside the adapters (may be empty)
    lora_base.json             the base model's config, checked against the model it is applied to

LC-QAT layers (``LCQLinear`` while training, ``PackedLCQLinear`` packed at 2 bits) take
adapters too: peft's own ``lora.Linear`` wraps them through its custom-module registry (it
reads ``in_features`` / ``out_features`` and calls the layer), so a 2-bit model is fine-tuned
with its codes frozen. Such adapters cannot be merged into 2-bit codes.
"""

from __future__ import annotations

import fnmatch
import math
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cheers.errors import CheckpointError, ConfigError

ADAPTER_NAME = "default"
DEFAULT_TARGETS = ("llm.layers.*.self_attn.*_proj", "llm.layers.*.mlp.*_proj")
# parameter-name patterns (cheers.train.optim.select_trainable syntax) of the adapters
ADAPTER_PATTERNS = ("*.lora_A.*", "*.lora_B.*")
CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"
TRAINED_FILE, BASE_FILE = "trained.safetensors", "lora_base.json"
ARCHITECTURE = ("llm", "tokenizer", "head")  # model-config sections an adapter folder must match


def target_regex(patterns: list[str] | tuple[str, ...]) -> str:
    """One regex (peft matches it against whole module names) from ``fnmatch`` globs."""
    if not patterns:
        raise ConfigError("lora.target is empty: no layer would get an adapter")
    parts = []
    for p in patterns:
        rx = fnmatch.translate(p)  # '(?s:...)\\Z'
        parts.append("(?:" + rx.removeprefix("(?s:").removesuffix(")\\Z") + ")")
    return "|".join(parts)


def peft_config(*, rank: int, alpha: float, dropout: float, target: list[str] | tuple[str, ...]):
    """peft's ``LoraConfig`` for these settings, with the LC-QAT layers registered."""
    from peft import LoraConfig

    cfg = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=target_regex(target),
                     bias="none")
    _register_lcqat(cfg)
    return cfg


def _register_lcqat(cfg) -> None:
    from peft.tuners.lora.layer import Linear as LoraLinear

    from cheers.lcqat.lcq_linear import LCQLinear
    from cheers.lcqat.pack import PackedLCQLinear

    cfg._register_custom_module({LCQLinear: LoraLinear, PackedLCQLinear: LoraLinear})


def adapted_layers(model: nn.Module) -> dict[str, nn.Module]:
    """``{module name: peft LoRA layer}`` of the model (empty without adapters)."""
    from peft.tuners.lora import LoraLayer

    return {n: m for n, m in model.named_modules() if isinstance(m, LoraLayer)}


def add_adapters(model: nn.Module, cfg) -> list[str]:
    """Inject LoRA layers for ``cfg`` (a peft ``LoraConfig``) into ``model`` in place; returns the
    adapted module names. Every parameter but the adapters' is left frozen (peft's rule); the
    trainer then decides what else trains. Raises ConfigError when no layer matches."""
    from peft import inject_adapter_in_model

    if adapted_layers(model):
        raise ConfigError("the model already has LoRA adapters")
    try:
        with warnings.catch_warnings():  # peft warns of the LC-QAT layers registered above
            warnings.filterwarnings("ignore", message="Unsupported layer type", category=UserWarning)
            inject_adapter_in_model(cfg, model, adapter_name=ADAPTER_NAME)
    except ValueError as e:
        if "not found in the base model" in str(e) or "Target modules" in str(e):
            linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)][:6]
            raise ConfigError(f"lora.target {cfg.target_modules!r} matches no layer of the model "
                              f"(linears are named like {', '.join(linears)})") from e
        raise
    return sorted(adapted_layers(model))


def is_adapter_name(name: str) -> bool:
    """Whether a parameter name is an adapter's (``...lora_A.default.weight``)."""
    return ".lora_A." in name or ".lora_B." in name


def initial_adapter_state(shapes: dict[str, torch.Size], seed: int) -> dict[str, torch.Tensor]:
    """Starting values of adapter parameters by name: ``lora_A`` Kaiming-uniform (peft's default,
    a = sqrt(5)), ``lora_B`` zero, so the adapted model starts equal to the base. Drawn from a
    generator seeded by ``seed`` in sorted name order: the same on every rank and every build."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name in sorted(shapes):
        if ".lora_B." in name:
            out[name] = torch.zeros(shapes[name])
        else:
            fan_in = shapes[name][1]
            bound = math.sqrt(6.0 / ((1 + 5.0) * fan_in))  # kaiming_uniform_(a=sqrt(5))
            out[name] = (torch.rand(shapes[name], generator=g) * 2 - 1) * bound
    return out


def adapter_shapes(model: nn.Module) -> dict[str, torch.Size]:
    return {n: p.shape for n, p in model.named_parameters() if is_adapter_name(n)}


def base_names(model: nn.Module) -> dict[str, str]:
    """``{name in a plain checkpoint: name in the adapted model}`` of the wrapped layers' tensors
    (``...up_proj.weight`` -> ``...up_proj.base_layer.weight``)."""
    return {k.replace(".base_layer.", "."): k for k in model.state_dict() if ".base_layer." in k}


def to_adapted_names(weights: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """A plain state dict renamed for the adapted ``model`` (adapters not included)."""
    rename = base_names(model)
    return {rename.get(k, k): v for k, v in weights.items()}


def merge_adapters(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base layer's weight (peft's ``merge``) and put the base layer
    back in its place: the model is then a plain model again. In place; returns it."""
    layers = adapted_layers(model)
    for name, layer in layers.items():
        base = layer.get_base_layer()
        if not isinstance(base, nn.Linear):
            raise CheckpointError(
                f"cannot merge the adapter of {name}: its base is a {type(base).__name__} (2-bit LC-QAT "
                "codes cannot absorb a dense update); export without --merge and load it with --lora")
        layer.merge(safe_merge=True, adapter_names=[ADAPTER_NAME])
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, base)
    return model


# --------------------------------------------------------------------------- adapter folders


def save_adapter(model: nn.Module, folder: str | Path, *, cfg, trained: dict[str, torch.Tensor],
                 base_config: dict[str, Any], base: str | None) -> Path:
    """Write the adapter folder of ``model`` (adapters injected with peft config ``cfg``);
    ``trained`` holds the fully-trained tensors by model name, ``base_config`` the base model's
    config dict (``base`` its folder, recorded as a hint)."""
    from peft import get_peft_model_state_dict

    from cheers.safetensors_io import write_json, write_safetensors

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    cfg.save_pretrained(str(folder))
    state = {k: v.detach().contiguous() for k, v in get_peft_model_state_dict(model, adapter_name=ADAPTER_NAME).items()}
    write_safetensors(state, folder / WEIGHTS_FILE)
    write_safetensors({k: v.detach().contiguous() for k, v in trained.items()}, folder / TRAINED_FILE)
    write_json({"base": base, "model": base_config}, folder / BASE_FILE)
    return folder


def is_adapter_folder(folder: str | Path) -> bool:
    return (Path(folder) / CONFIG_FILE).is_file()


def load_adapter(model: nn.Module, folder: str | Path, *, model_config: dict[str, Any] | None = None) -> list[str]:
    """Inject the adapters of ``folder`` into ``model`` and load them (and the fully-trained
    tensors) without merging; returns the adapted layer names. ``model_config`` (the model's
    config dict) is checked against the base the adapters were trained on."""
    from peft import LoraConfig, set_peft_model_state_dict

    from cheers.safetensors_io import read_json, read_safetensors

    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"LoRA folder not found: {folder}")
    for name in (CONFIG_FILE, WEIGHTS_FILE, BASE_FILE):
        if not (folder / name).is_file():
            raise CheckpointError(f"{folder} is not a LoRA adapter folder: {name} is missing "
                                  "(write one with `cheers export RUN OUT` of a LoRA run)")
    recorded = read_json(folder / BASE_FILE).get("model") or {}
    # the parts that shape the weights must match; sampling and loss settings may differ
    diff = sorted(d for part in ARCHITECTURE if model_config is not None and part in recorded
                  for d in _differences(recorded[part], model_config.get(part), f"model.{part}"))
    if diff:
        raise CheckpointError(f"{folder}: the adapters were trained on another base model "
                              f"({'; '.join(diff[:4])})")
    try:
        cfg = LoraConfig.from_pretrained(str(folder))
    except Exception as e:  # peft raises plain exceptions for unreadable or foreign configs
        raise CheckpointError(f"{folder / CONFIG_FILE}: not a readable LoRA config ({e})") from e
    _register_lcqat(cfg)
    names = add_adapters(model, cfg)
    state = read_safetensors(folder / WEIGHTS_FILE)
    result = set_peft_model_state_dict(model, state, adapter_name=ADAPTER_NAME)
    expected = set(adapter_shapes(model))
    loaded = {k for k in model.state_dict() if is_adapter_name(k)} - set(result.missing_keys)
    if result.unexpected_keys or loaded != expected:
        missing = sorted(expected - loaded)
        raise CheckpointError(f"{folder / WEIGHTS_FILE} does not fit the model's adapters (missing "
                              f"{missing[:3]}, unexpected {list(result.unexpected_keys)[:3]})")
    trained = read_safetensors(folder / TRAINED_FILE) if (folder / TRAINED_FILE).is_file() else {}
    load_into(model, trained, source=str(folder / TRAINED_FILE))
    return names


def load_into(model: nn.Module, tensors: dict[str, torch.Tensor], *, source: str) -> None:
    """Copy ``tensors`` (model names, exact shapes) into ``model``; an unknown name or a
    shape that differs is a CheckpointError naming it."""
    own = model.state_dict()
    bad = [f"{k}: not in the model" for k in tensors if k not in own]
    bad += [f"{k}: file {tuple(v.shape)}, model {tuple(own[k].shape)}"
            for k, v in tensors.items() if k in own and own[k].shape != v.shape]
    if bad:
        raise CheckpointError(f"{source} does not fit the model: {'; '.join(bad[:3])}")
    with torch.no_grad():
        for k, v in tensors.items():
            own[k].copy_(v)


def _differences(a: Any, b: Any, prefix: str = "model") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for k in set(a) | set(b) for d in _differences(a.get(k), b.get(k), f"{prefix}.{k}")]
    return [] if a == b else [f"{prefix}: adapters' base {a!r}, this model {b!r}"]
