"""The official (released) Cheers layout <-> ours: its ``config.json`` and its tensor names.

The official folder holds ``config.json`` with ``text_config`` / ``vision_representation_config``
/ ``vae_encoder_config`` / ``vae_decoder_config`` and a state dict rooted at ``model.``; it
loads through a name translation with no numerical change.
"""

from __future__ import annotations

from typing import Any

import torch

from cheers.adapters import diffusers_vae
from cheers.config import (
    FlowHeadConfig,
    LLMConfig,
    ModelConfig,
    SiglipConfig,
    SpecialTokens,
    TokenizerConfig,
    to_dict,
)
from cheers.errors import CheckpointError

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
_VAE_PARTS = [("tokenizer.vae.", diffusers_vae.OFFICIAL_VAE_PREFIX),
              ("tokenizer.pixel_decoder.", diffusers_vae.OFFICIAL_PIXEL_DECODER_PREFIX)]


def is_official_config(data: dict[str, Any]) -> bool:
    """Whether a parsed ``config.json`` is in the official layout."""
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
        vae = diffusers_vae.config_from_official_vae(data)
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
    official = {
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
    lost = _settings_lost(to_dict(cfg), to_dict(config_from_official(official, tokens=cfg.tokens)))
    if lost:
        raise CheckpointError(f"the official layout cannot hold this model: {'; '.join(lost[:6])} (the "
                              "released code fixes what its config.json does not name); keep our layout")
    return official


# what a model folder may lose in the official layout: the flavour's name, and the sequence
# limit, which the official config takes from the LLM's max_position_embeddings
_NOT_ARCHITECTURE = ("flavour", "max_seq_len", "tokens")


def _settings_lost(ours: dict[str, Any], back: dict[str, Any], prefix: str = "") -> list[str]:
    """``key=ours (official: theirs)`` for every setting a trip through the official config changes."""
    lost = []
    for key, value in ours.items():
        if not prefix and key in _NOT_ARCHITECTURE:
            continue
        if isinstance(value, dict):
            lost += _settings_lost(value, back[key], f"{prefix}{key}.")
        elif back.get(key) != value:
            lost.append(f"{prefix}{key}={value!r} (official: {back.get(key)!r})")
    return lost


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
        for k, v in diffusers_vae.official_vae_to_ours(part, cfg.tokenizer.vae, source=source).items():
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
        for k, v in diffusers_vae.ours_to_official_vae(part, cfg.tokenizer.vae).items():
            out[official + k] = v
    if "lm_head.weight" not in out and "model.language_model.embed_tokens.weight" in out:
        out["lm_head.weight"] = out["model.language_model.embed_tokens.weight"]
    return out
