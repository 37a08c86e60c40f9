"""Checkpoint folders: ours and the official Cheers one (``cheers.adapters.official``).

Our folder: ``config.json`` (the resolved ``ModelConfig`` as JSON) + ``model.safetensors``;
``load_pretrained`` rebuilds the model from that alone. An official (released) folder loads
through the official adapter's name translation, with no numerical change.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from cheers.adapters.official import (
    config_from_official,
    config_to_official,
    is_official_config,
    official_to_ours,
    ours_to_official,
)
from cheers.config import ModelConfig, SpecialTokens, model_config_from_dict, to_dict
from cheers.errors import CheckpointError, ConfigError
from cheers.model import CheersModel
from cheers.safetensors_io import (
    load_checked,
    read_json,
    read_state_dict,
    write_json,
    write_state_dict,
)

# --------------------------------------------------------------------------- folders


def _build(cfg: ModelConfig, dtype: torch.dtype, device) -> CheersModel:
    with torch.device("meta"):
        model = CheersModel(cfg).to(dtype)
    model.to_empty(device=device)
    model.init_weights()
    return model


def load_config(path: str | Path, *, tokens: SpecialTokens | None = None) -> tuple[ModelConfig, bool]:
    """(config, is_official) of a checkpoint folder."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint folder not found: {path}")
    data = read_json(path / "config.json")
    data.pop("quantization", None)  # read by quantization_of; the model config is the rest
    if is_official_config(data):
        return config_from_official(data, source=str(path / "config.json"), tokens=tokens), True
    if "model" in data and isinstance(data["model"], dict):  # a training run's resolved config
        data = data["model"]
    if "llm" not in data:
        raise CheckpointError(
            f"{path / 'config.json'}: neither a cheers config (no 'llm' key) nor an official Cheers "
            f"config (no 'text_config'); model_type={data.get('model_type')!r}"
        )
    try:
        return model_config_from_dict(data), False
    except ConfigError as e:
        raise CheckpointError(f"{path / 'config.json'}: {e}") from e


QUANT_METHODS = ("lcqat", "rtn", "gptq")


def quantization_of(path: str | Path) -> dict[str, Any] | None:
    """The ``quantization`` section of a checkpoint folder's ``config.json`` (None: full precision).

    ``lcqat``: the LLM's linears are packed (``cheers.lcqat.pack``); ``rtn`` / ``gptq``: the
    weights are stored dense, already on their 2-bit grid (fake-quantized), and load as usual.
    """
    cfg_path = Path(path) / "config.json"
    section = read_json(cfg_path).get("quantization")
    if section is None:
        return None
    if not isinstance(section, dict) or section.get("quant_method") not in QUANT_METHODS:
        method = section.get("quant_method") if isinstance(section, dict) else section
        raise CheckpointError(f"{cfg_path}: unknown quantization method {method!r}; this code reads {QUANT_METHODS}")
    return section


def load_pretrained(path: str | Path, *, dtype: torch.dtype = torch.float32, device="cpu",
                    strict: bool = True, tokens: SpecialTokens | None = None):
    """``CheersModel`` from our folder or an official one (detected from ``config.json``).

    A folder with an LC-QAT ``quantization`` section gets ``PackedLCQLinear`` layers in its LLM
    (reference decode on the CPU, the Triton kernels on a GPU).
    """
    path = Path(path)
    cfg, official = load_config(path, tokens=tokens)
    state = read_state_dict(path)
    if official:
        state = official_to_ours(state, cfg, source=str(path))
    model = _build(cfg, dtype, device)
    section = quantization_of(path)
    if section is not None and section["quant_method"] == "lcqat":
        from cheers.lcqat.pack import install_packed

        install_packed(model, section, state, str(path), device=device)
    load_checked(model, state, source=str(path), strict=strict)
    model.llm.tie_weights()
    return model.eval()


def save_pretrained(model, path: str | Path, *, official: bool = False) -> None:
    """Write ``config.json`` + ``model.safetensors`` (ours, or the official layout).

    LC-QAT layers (trainable or packed) are written packed, with a ``quantization`` section.
    """
    from cheers.lcqat.pack import lcq_layers, packed_state_dict, quantization_section

    path = Path(path)
    quantized = bool(lcq_layers(model))
    if quantized and official:
        raise CheckpointError("the official layout has no packed 2-bit format; save in ours")
    official_config = config_to_official(model.cfg) if official else None  # refused before writing
    state = packed_state_dict(model) if quantized else {k: v.detach() for k, v in model.state_dict().items()}
    path.mkdir(parents=True, exist_ok=True)
    if official:
        write_json(official_config, path / "config.json")
        write_state_dict(ours_to_official(state, model.cfg), path)
    else:
        if model.cfg.llm.tie_word_embeddings:
            state.pop("llm.lm_head.weight", None)
        write_state_dict(state, path)
        config = to_dict(model.cfg)
        if quantized:
            config["quantization"] = quantization_section(model)
        write_json(config, path / "config.json")


def convert(src: str | Path, dst: str | Path, *, to: str) -> None:
    """``cheers convert``: rewrite a checkpoint folder in the other layout, its tokenizer files
    beside it. A model the target layout cannot hold is refused before anything is written."""
    from cheers.text_tokenizer import TextTokenizer, copy_tokenizer_files

    if to not in ("official", "cheers"):
        raise ConfigError(f"to must be 'official' or 'cheers', got {to!r}")
    src = Path(src)
    # the special-token ids of an official folder come from its tokenizer, as inference reads them
    tokens = TextTokenizer.from_dir(src).special if (src / "tokenizer.json").is_file() else None
    if to == "official":
        if (quantization_of(src) or {}).get("quant_method") == "lcqat":
            raise CheckpointError(f"{src} holds packed 2-bit weights; the official layout has no packed format")
        config_to_official(load_config(src, tokens=tokens)[0])
    model = load_pretrained(src, tokens=tokens)
    save_pretrained(model, dst, official=(to == "official"))
    copy_tokenizer_files(src, dst)
