"""Hugging Face Qwen2 / Qwen2.5 / Qwen3 folders <-> our :class:`cheers.llm.LLM`.

A HF folder is ``config.json`` + safetensors (sharded or not); ``transformers`` loads what
:func:`save_hf_qwen` writes. The files themselves go through ``cheers.safetensors_io``.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from cheers.config import LLMConfig
from cheers.errors import CheckpointError, ConfigError
from cheers.llm import LLM
from cheers.safetensors_io import (
    load_checked,
    read_json,
    read_state_dict,
    write_json,
    write_state_dict,
)


def load_hf_qwen(
    path: str | Path,
    *,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    strict: bool = True,
) -> LLM:
    """Load a HF Qwen2 / Qwen2.5 / Qwen3 folder (``config.json`` + safetensors, sharded or not).

    ``dtype=None`` keeps the checkpoint's floating dtype. With ``strict=False`` tensors
    that do not fit are reported in a warning and the rest keeps its fresh initialisation.
    """
    path = Path(path)
    cfg = config_from_hf_qwen(read_json(path / "config.json"), source=str(path / "config.json"))
    state = read_state_dict(path)
    state = hf_qwen_to_ours(state, cfg, source=str(path))
    if dtype is None:
        dtype = next((t.dtype for t in state.values() if t.is_floating_point()), torch.float32)
    with torch.device("meta"):
        model = LLM(cfg).to(dtype)  # free on meta; to_empty then allocates in that dtype
    model.to_empty(device=device)
    if not strict:  # tensors missing from the file must still hold sane values
        model.init_weights()
    model.tie_weights()
    report = load_checked(model, state, source=str(path), strict=strict)
    if not report.ok:
        warnings.warn(report.describe("LLM"), stacklevel=2)
    return model


def save_hf_qwen(llm: LLM, path: str | Path, *, max_shard_bytes: int | None = None) -> None:
    """Write ``config.json`` and safetensors in the HF layout (``transformers`` loads it)."""
    path = Path(path)
    dtype = llm.embed_tokens.weight.dtype
    write_state_dict(ours_to_hf_qwen(llm.state_dict(), llm.cfg), path, max_shard_bytes=max_shard_bytes)
    write_json(config_to_hf_qwen(llm.cfg, dtype=dtype), path / "config.json")


def ours_to_hf_qwen(state: dict[str, Tensor], cfg: LLMConfig) -> dict[str, Tensor]:
    """Our names -> HF names (``model.`` prefix); a tied head is stored once, as the embedding."""
    out = {}
    for name, t in state.items():
        if name == "lm_head.weight":
            if cfg.tie_word_embeddings:
                continue
            out[name] = t
        else:
            out["model." + name] = t
    return out


def _rope_theta(data: dict[str, Any], source: str) -> float:
    """RoPE base from a HF config (transformers 5 nests it in ``rope_parameters``)."""
    params = data.get("rope_parameters") or data.get("rope_scaling") or {}
    if not isinstance(params, dict):
        raise CheckpointError(f"{source}: rope_parameters must be an object, got {params!r}")
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type != "default":
        raise CheckpointError(
            f"{source}: rope_type {rope_type!r} is not supported (only 'default' RoPE)"
        )
    theta = params.get("rope_theta", data.get("rope_theta", 10000.0))
    return float(theta)


def config_from_hf_qwen(data: dict[str, Any], *, source: str = "config.json") -> LLMConfig:
    """An :class:`LLMConfig` from a HF ``config.json`` dict (model_type ``qwen2`` or ``qwen3``)."""
    model_type = data.get("model_type")
    if model_type not in ("qwen2", "qwen3"):
        raise CheckpointError(
            f"{source}: model_type {model_type!r} is not supported (expected 'qwen2' or 'qwen3')"
        )
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads"):
        if key not in data:
            raise CheckpointError(f"{source}: required key {key!r} is missing")
    if data.get("use_sliding_window"):
        raise CheckpointError(f"{source}: use_sliding_window=true is not supported")
    act = data.get("hidden_act", "silu")
    if act != "silu":
        raise CheckpointError(f"{source}: hidden_act {act!r} is not supported (expected 'silu')")
    qwen3 = model_type == "qwen3"
    if qwen3 and data.get("attention_bias", False):
        # Qwen3 puts that bias on o_proj too, which our o_proj does not have.
        raise CheckpointError(f"{source}: qwen3 with attention_bias=true is not supported")
    try:
        return LLMConfig(
            vocab_size=data["vocab_size"],
            hidden_size=data["hidden_size"],
            intermediate_size=data["intermediate_size"],
            num_hidden_layers=data["num_hidden_layers"],
            num_attention_heads=data["num_attention_heads"],
            num_key_value_heads=data.get("num_key_value_heads") or data["num_attention_heads"],
            head_dim=data.get("head_dim", 128 if qwen3 else None),
            rms_norm_eps=float(data.get("rms_norm_eps", 1e-6)),
            rope_theta=_rope_theta(data, source),
            max_position_embeddings=data.get("max_position_embeddings", 32768),
            tie_word_embeddings=bool(data.get("tie_word_embeddings", False)),
            attention_bias=not qwen3,
            qk_norm=qwen3,
        )
    except ConfigError as e:
        raise CheckpointError(f"{source}: {e}") from e


def config_to_hf_qwen(cfg: LLMConfig, *, dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """The HF ``config.json`` dict for ``cfg`` (qwen3 when it has q/k norm, else qwen2)."""
    if cfg.qk_norm:
        if cfg.attention_bias:
            raise ConfigError("q/k norm with attention_bias has no HF equivalent (qwen3 biases o_proj)")
        model_type, arch = "qwen3", "Qwen3ForCausalLM"
    else:
        if not cfg.attention_bias:
            raise ConfigError("attention_bias=false without qk_norm has no HF qwen2/qwen3 equivalent")
        model_type, arch = "qwen2", "Qwen2ForCausalLM"
    out: dict[str, Any] = {
        "architectures": [arch],
        "model_type": model_type,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_hidden_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_key_value_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_position_embeddings,
        "rms_norm_eps": cfg.rms_norm_eps,
        # both spellings: transformers 5 reads rope_parameters, 4.x reads rope_theta
        "rope_theta": cfg.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "use_sliding_window": False,
        "dtype": str(dtype).removeprefix("torch."),
    }
    if model_type == "qwen3":
        out["attention_bias"] = False
    return out


def hf_qwen_to_ours(
    state: dict[str, Tensor], cfg: LLMConfig, *, source: str
) -> dict[str, Tensor]:
    """Map HF names (``model.layers.0...``, ``lm_head.weight``) to ours.

    Old checkpoints' ``rotary_emb.inv_freq`` buffers are dropped (we compute RoPE). A tied
    model takes its head from the embedding, so a stored ``lm_head.weight`` is dropped; it is
    only checked to agree.
    """
    out: dict[str, Tensor] = {}
    for name, t in state.items():
        if name.endswith("rotary_emb.inv_freq"):
            continue
        out[name.removeprefix("model.")] = t
    head = out.get("lm_head.weight")
    if cfg.tie_word_embeddings and head is not None:
        emb = out.get("embed_tokens.weight")
        if emb is not None and (emb.shape != head.shape or not torch.equal(emb, head)):
            warnings.warn(
                f"{source}: tie_word_embeddings is true but lm_head.weight differs from "
                "embed_tokens.weight; using embed_tokens.weight for both",
                stacklevel=3,
            )
        del out["lm_head.weight"]
    return out
