"""Checkpoint folders and the adapter between the official Cheers layout and ours.

Our folder: ``config.json`` (the resolved ``ModelConfig`` as JSON) + ``model.safetensors``;
``load_pretrained`` rebuilds the model from that alone. The official (released) folder:
``config.json`` with ``text_config`` / ``vision_representation_config`` / ``vae_encoder_config`` /
``vae_decoder_config`` and a state dict rooted at ``model.``; it loads through a name
translation with no numerical change.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from cheers.config import (
    FlowHeadConfig,
    LLMConfig,
    ModelConfig,
    SiglipConfig,
    SpecialTokens,
    TokenizerConfig,
    model_config_from_dict,
    to_dict,
)
from cheers.errors import CheckpointError, ConfigError
from cheers.model import CheersModel
from cheers.safetensors_io import (
    load_checked,
    read_json,
    read_state_dict,
    write_json,
    write_state_dict,
)
from cheers.tokenizer import vae_keys

# ours <-> official prefixes of the parts whose inner names are identical
_PREFIXES = [
    ("tokenizer.siglip.", "model.vision_representation."),
    ("tokenizer.compressor.", "model.und_projector."),
    ("llm.lm_head.", "lm_head."),
    ("llm.", "model.language_model."),
    ("head.time_embed.mlp_a.", "model.time_embed.mlp_1."),
    ("head.time_embed.mlp_b.", "model.time_embed.mlp_2."),
    ("head.stage_a.blocks.", "model.gen_projector.diffusion_head_a."),
    ("head.stage_a.final.", "model.gen_projector.diffusion_head_b."),
    ("head.gate.", "model.hi_gate."),
    ("head.stage_b.blocks.", "model.hi_projector.diffusion_head_a."),
    ("head.stage_b.final.", "model.hi_projector.diffusion_head_b."),
]
_VAE_PARTS = [("tokenizer.vae.", "model.vae_model."), ("tokenizer.pixel_decoder.", "model.vae_decoder_projector.")]


def is_official_config(data: dict[str, Any]) -> bool:
    return "text_config" in data and "vision_representation_config" in data


# --------------------------------------------------------------------------- configs


def config_from_official(data: dict[str, Any], *, source: str = "config.json",
                         tokens: SpecialTokens | None = None) -> ModelConfig:
    """Our ``ModelConfig`` from an official Cheers ``config.json`` (parsed)."""
    if data.get("model_type") not in ("umm", None):
        raise CheckpointError(f"{source}: model_type {data.get('model_type')!r} is not an official Cheers config ('umm')")
    try:
        text, vis = data["text_config"], data["vision_representation_config"]
        llm = LLMConfig(
            vocab_size=text.get("vocab_size", 151936),
            hidden_size=text.get("hidden_size", 1536),
            intermediate_size=text.get("intermediate_size", 8960),
            num_hidden_layers=text.get("num_hidden_layers", 28),
            num_attention_heads=text.get("num_attention_heads", 12),
            num_key_value_heads=text.get("num_key_value_heads", 2),
            rms_norm_eps=text.get("rms_norm_eps", 1e-6),
            rope_theta=float(text.get("rope_theta", 1e6)),
            max_position_embeddings=text.get("max_position_embeddings", 32768),
            tie_word_embeddings=text.get("tie_word_embeddings", True),
        )
        siglip = SiglipConfig(
            hidden_size=vis["hidden_size"], intermediate_size=vis["intermediate_size"],
            num_hidden_layers=vis["num_hidden_layers"], num_attention_heads=vis["num_attention_heads"],
            patch_size=vis["patch_size"], image_size=vis["image_size"],
            num_channels=vis.get("num_channels", 3), hidden_act=vis.get("hidden_act", "gelu_pytorch_tanh"),
            layer_norm_eps=vis.get("layer_norm_eps", 1e-6), use_head=True,
        )
        vae = vae_keys.vae_config_from_official(data)
    except KeyError as e:
        raise CheckpointError(f"{source}: official config lacks the key {e.args[0]!r}") from e
    head = FlowHeadConfig(
        stage_a_heads=llm.num_attention_heads, stage_a_kv_heads=llm.num_key_value_heads,
        stage_b_heads=siglip.num_attention_heads, stage_b_kv_heads=llm.num_key_value_heads,
    )
    return ModelConfig(
        flavour="custom",
        llm=llm,
        tokenizer=TokenizerConfig(vae=vae, siglip=siglip, image_size=siglip.image_size),
        head=head,
        tokens=tokens or SpecialTokens(),
        max_seq_len=llm.max_position_embeddings,
    )


def config_to_official(cfg: ModelConfig) -> dict[str, Any]:
    """An official-layout ``config.json`` dict for our config (inverse of ``config_from_official``)."""
    reads_xt = "the released model reads xt only through its pixel decoder and SigLIP2"
    shapes_world_options = (  # (option, set in cfg, why the released model has no place for it)
        ("tokenizer.compressor_out_rms", cfg.tokenizer.compressor_out_rms is not None,
         "the released model has no such norm"),
        (f"head.time_scale={cfg.head.time_scale}", cfg.head.time_scale != 1.0,
         "the released model embeds t in [0, 1] as is"),
        ("tokenizer.latent_to_llm", cfg.tokenizer.latent_to_llm, reads_xt),
        ("head.latent_to_stage_b", cfg.head.latent_to_stage_b, reads_xt),
        ("tokenizer.vae.pooled_rgb_latent", cfg.tokenizer.vae.pooled_rgb_latent,
         "the released VAE's latent channels are all learned"),
    )
    for name, on, why in shapes_world_options:
        if on:
            raise CheckpointError(f"{name} (a shapes-world option) has no place in the official layout: {why}")
    llm, sig, vae = cfg.llm, cfg.tokenizer.siglip, cfg.tokenizer.vae
    res = cfg.tokenizer.image_size
    return {
        "architectures": ["Cheers"],
        "model_type": "umm",
        "vae_encoder_config": {"resolution": res, "in_channels": vae.in_channels, "ch": vae.ch,
                               "ch_mult": list(vae.ch_mult), "num_res_blocks": vae.num_res_blocks,
                               "z_channels": vae.z_channels},
        "vae_decoder_config": {"resolution": res, "in_channels": vae.in_channels, "ch": vae.decoder_ch,
                               "out_ch": vae.out_channels, "ch_mult": list(vae.decoder_ch_mult),
                               "num_res_blocks": vae.decoder_num_res_blocks, "z_channels": vae.z_channels},
        "vision_representation_config": {
            "hidden_act": sig.hidden_act, "hidden_size": sig.hidden_size, "image_size": sig.image_size,
            "intermediate_size": sig.intermediate_size, "layer_norm_eps": sig.layer_norm_eps,
            "model_type": "umm", "num_attention_heads": sig.num_attention_heads,
            "num_channels": sig.num_channels, "num_hidden_layers": sig.num_hidden_layers,
            "num_patches": (sig.image_size // sig.patch_size) ** 2, "patch_size": sig.patch_size,
        },
        "text_config": {
            "hidden_size": llm.hidden_size, "intermediate_size": llm.intermediate_size,
            "num_hidden_layers": llm.num_hidden_layers, "num_attention_heads": llm.num_attention_heads,
            "num_key_value_heads": llm.num_key_value_heads, "hidden_act": "silu",
            "rms_norm_eps": llm.rms_norm_eps, "rope_theta": llm.rope_theta,
            "max_position_embeddings": llm.max_position_embeddings,
            "tie_word_embeddings": llm.tie_word_embeddings, "vocab_size": llm.vocab_size,
        },
        "torch_dtype": "float32",
    }


# --------------------------------------------------------------------------- state dicts


def _rename(key: str, pairs: list[tuple[str, str]], forward: bool) -> str | None:
    for ours, official in pairs:
        src, dst = (official, ours) if forward else (ours, official)
        if key.startswith(src):
            return dst + key[len(src):]
    return None


def official_to_ours(sd: dict[str, torch.Tensor], cfg: ModelConfig, *, source: str = "official checkpoint"
                     ) -> dict[str, torch.Tensor]:
    """Official state dict (``model.*`` + ``lm_head.weight``) -> our ``CheersModel`` names."""
    out: dict[str, torch.Tensor] = {}
    vae_parts: dict[str, dict[str, torch.Tensor]] = {ours: {} for ours, _ in _VAE_PARTS}
    unknown = []
    for key, value in sd.items():
        for ours, official in _VAE_PARTS:
            if key.startswith(official):
                vae_parts[ours][key[len(official):]] = value
                break
        else:
            new = _rename(key, _PREFIXES, forward=True)
            if new is None:
                unknown.append(key)
            else:
                out[new] = value
    if unknown:
        raise CheckpointError(f"{source}: tensors of no known part: {', '.join(unknown[:8])}")
    for ours, part in vae_parts.items():
        for k, v in vae_keys.official_to_ours(part, cfg.tokenizer.vae, source=source).items():
            out[ours + k] = v
    if cfg.llm.tie_word_embeddings and "llm.lm_head.weight" in out:
        emb = out.get("llm.embed_tokens.weight")
        if emb is not None and not torch.equal(emb, out["llm.lm_head.weight"]):
            raise CheckpointError(f"{source}: tied config but lm_head.weight differs from embed_tokens.weight")
    return out


def ours_to_official(sd: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Inverse of ``official_to_ours``; a tied ``lm_head.weight`` is written too, as released."""
    out: dict[str, torch.Tensor] = {}
    vae_parts: dict[str, dict[str, torch.Tensor]] = {official: {} for _, official in _VAE_PARTS}
    for key, value in sd.items():
        for ours, official in _VAE_PARTS:
            if key.startswith(ours):
                vae_parts[official][key[len(ours):]] = value
                break
        else:
            new = _rename(key, _PREFIXES, forward=False)
            if new is None:
                raise CheckpointError(f"no official name for our tensor {key!r}")
            out[new] = value
    for official, part in vae_parts.items():
        for k, v in vae_keys.ours_to_official(part, cfg.tokenizer.vae).items():
            out[official + k] = v
    if "lm_head.weight" not in out and "model.language_model.embed_tokens.weight" in out:
        out["lm_head.weight"] = out["model.language_model.embed_tokens.weight"]
    return out


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
    path.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach() for k, v in model.state_dict().items()}
    quantized = bool(lcq_layers(model))
    if quantized:
        if official:
            raise CheckpointError("the official layout has no packed 2-bit format; save in ours")
        state = packed_state_dict(model)
    if official:
        write_json(config_to_official(model.cfg), path / "config.json")
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
    """``cheers convert``: rewrite a checkpoint folder in the other layout."""
    if to not in ("official", "cheers"):
        raise ConfigError(f"--to must be 'official' or 'cheers', got {to!r}")
    model = load_pretrained(src)
    save_pretrained(model, dst, official=(to == "official"))
