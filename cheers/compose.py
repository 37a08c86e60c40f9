"""``cheers init``: a Cheers starting point composed from separate pretrained folders.

The LLM (a ``transformers`` Qwen2 / Qwen2.5 / Qwen3 folder), SigLIP2 (a ``transformers``
SigLIP vision or full SigLIP folder) and the VAE (``diffusers`` folder or an original-format
file) load unchanged; the pixel decoder starts as a copy of the VAE decoder and its latent
statistics; the compressor, flow head and gate are initialised as the paper does (the gate
at zero), ready for the stage-I recipe.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from cheers.config import ModelConfig, SiglipConfig, TokenizerConfig, flavour
from cheers.errors import CheckpointError
from cheers.llm_hf_adapter import hf_to_llm_state_dict, llm_config_from_hf
from cheers.safetensors_io import load_checked, read_json, read_state_dict
from cheers.tokenizer.vae_keys import load_vae_folder, vae_config_from_diffusers

_SIGLIP_DROP = ("text_model.", "logit_scale", "logit_bias")


def siglip_config_from_hf(data: dict, source: str) -> SiglipConfig:
    """``SiglipConfig`` from a SigLIP / SigLIP2 (fixed resolution) ``config.json``."""
    vision = data.get("vision_config", data)
    if data.get("model_type") not in ("siglip", "siglip_vision_model", "siglip2", "siglip2_vision_model"):
        raise CheckpointError(f"{source}: model_type {data.get('model_type')!r} is not a SigLIP vision model")
    if "num_patches" in vision and "image_size" not in vision:
        raise CheckpointError(f"{source}: a NaFlex SigLIP2 (no fixed image_size) is not supported; "
                              "use the fixed-resolution checkpoint (e.g. so400m-patch16-512)")
    try:
        return SiglipConfig(
            hidden_size=vision["hidden_size"], intermediate_size=vision["intermediate_size"],
            num_hidden_layers=vision["num_hidden_layers"], num_attention_heads=vision["num_attention_heads"],
            patch_size=vision["patch_size"], image_size=vision["image_size"],
            num_channels=vision.get("num_channels", 3), hidden_act=vision.get("hidden_act", "gelu_pytorch_tanh"),
            layer_norm_eps=vision.get("layer_norm_eps", 1e-6), use_head=vision.get("vision_use_head", True),
        )
    except KeyError as e:
        raise CheckpointError(f"{source}: SigLIP config lacks {e.args[0]!r}") from e


def siglip_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """HF SigLIP names (``vision_model.*``, possibly inside a full SigLIP with a text tower) -> ours."""
    out = {}
    for name, t in state.items():
        if name.startswith(_SIGLIP_DROP) or name.endswith("position_ids"):
            continue
        out[name.removeprefix("vision_model.")] = t
    return out


def compose_config(llm_dir: Path, siglip_dir: Path, vae_dir: Path, base: ModelConfig) -> ModelConfig:
    """``base`` with the dimensions the three folders dictate."""
    llm = llm_config_from_hf(read_json(llm_dir / "config.json"), source=str(llm_dir / "config.json"))
    sig = siglip_config_from_hf(read_json(siglip_dir / "config.json"), str(siglip_dir / "config.json"))
    vae_cfg_path = (vae_dir / "vae" if (vae_dir / "vae").is_dir() else vae_dir) / "config.json"
    vae = vae_config_from_diffusers(read_json(vae_cfg_path)) if vae_cfg_path.is_file() else base.tokenizer.vae
    head = dataclasses.replace(base.head, stage_a_heads=llm.num_attention_heads,
                               stage_a_kv_heads=llm.num_key_value_heads,
                               stage_b_heads=sig.num_attention_heads,
                               stage_b_kv_heads=llm.num_key_value_heads)
    tok = TokenizerConfig(vae=vae, siglip=sig, image_size=sig.image_size,
                          compressor_hidden=base.tokenizer.compressor_hidden,
                          compressor_ln_eps=base.tokenizer.compressor_ln_eps)
    return dataclasses.replace(base, flavour="custom", llm=llm, tokenizer=tok, head=head,
                               max_seq_len=min(base.max_seq_len, llm.max_position_embeddings))


def compose(llm_dir: str | Path, siglip_dir: str | Path, vae_dir: str | Path, *,
            base: ModelConfig | None = None, strict: bool = True, dtype: torch.dtype = torch.float32):
    """A ``CheersModel`` whose pretrained parts come from the three folders."""
    from cheers.model import CheersModel

    llm_dir, siglip_dir, vae_dir = Path(llm_dir), Path(siglip_dir), Path(vae_dir)
    for what, p in (("--llm", llm_dir), ("--siglip", siglip_dir), ("--vae", vae_dir)):
        if not p.exists():
            raise CheckpointError(f"{what}: {p} does not exist")
    cfg = compose_config(llm_dir, siglip_dir, vae_dir, base or flavour("cheers-1.5b"))
    with torch.device("meta"):
        model = CheersModel(cfg).to(dtype)
    model.to_empty(device="cpu")
    model.init_weights()

    llm_state = hf_to_llm_state_dict(read_state_dict(llm_dir), cfg.llm, source=str(llm_dir))
    load_checked(model.llm, llm_state, source=str(llm_dir), strict=strict)
    model.llm.tie_weights()
    load_checked(model.tokenizer.siglip, siglip_state_dict(read_state_dict(siglip_dir)),
                 source=str(siglip_dir), strict=strict)
    vae_state = load_vae_folder(vae_dir, cfg.tokenizer.vae)
    load_checked(model.tokenizer.vae, vae_state, source=str(vae_dir), strict=strict)
    # the pixel decoder starts as the VAE decoder (and its latent statistics)
    pixel_state = {k: v for k, v in vae_state.items() if k.startswith(("decoder.", "bn."))}
    load_checked(model.tokenizer.pixel_decoder, pixel_state, source=f"{vae_dir} (pixel decoder copy)",
                 strict=strict)
    return model
