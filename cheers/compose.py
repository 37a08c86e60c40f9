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

from cheers.adapters.diffusers_vae import config_from_diffusers_vae, load_vae_folder
from cheers.adapters.hf_qwen import config_from_hf_qwen, hf_qwen_to_ours
from cheers.adapters.siglip import config_from_siglip, siglip_to_ours
from cheers.config import ModelConfig, TokenizerConfig, flavour
from cheers.errors import CheckpointError
from cheers.safetensors_io import load_checked, read_json, read_state_dict


def compose_config(llm_dir: Path, siglip_dir: Path, vae_dir: Path, base: ModelConfig) -> ModelConfig:
    """``base`` with the dimensions the three folders dictate."""
    llm = config_from_hf_qwen(read_json(llm_dir / "config.json"), source=str(llm_dir / "config.json"))
    sig = config_from_siglip(read_json(siglip_dir / "config.json"), source=str(siglip_dir / "config.json"))
    vae_cfg_path = (vae_dir / "vae" if (vae_dir / "vae").is_dir() else vae_dir) / "config.json"
    vae = config_from_diffusers_vae(read_json(vae_cfg_path)) if vae_cfg_path.is_file() else base.tokenizer.vae
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

    llm_state = hf_qwen_to_ours(read_state_dict(llm_dir), cfg.llm, source=str(llm_dir))
    load_checked(model.llm, llm_state, source=str(llm_dir), strict=strict)
    model.llm.tie_weights()
    load_checked(model.tokenizer.siglip, siglip_to_ours(read_state_dict(siglip_dir)),
                 source=str(siglip_dir), strict=strict)
    vae_state = load_vae_folder(vae_dir, cfg.tokenizer.vae)
    load_checked(model.tokenizer.vae, vae_state, source=str(vae_dir), strict=strict)
    # the pixel decoder starts as the VAE decoder (and its latent statistics)
    pixel_state = {k: v for k, v in vae_state.items() if k.startswith(("decoder.", "bn."))}
    load_checked(model.tokenizer.pixel_decoder, pixel_state, source=f"{vae_dir} (pixel decoder copy)",
                 strict=strict)
    return model
