"""``transformers`` SigLIP / SigLIP2 vision folders <-> our vision tower (``cheers.tokenizer.siglip``).

Our names are the vision model's own without the ``vision_model.`` prefix; a full SigLIP
folder's text tower and logit scale / bias are left out.
"""

from __future__ import annotations

import torch

from cheers.config import SiglipConfig
from cheers.errors import CheckpointError

_SIGLIP_DROP = ("text_model.", "logit_scale", "logit_bias")


def config_from_siglip(data: dict, *, source: str = "config.json") -> SiglipConfig:
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


def siglip_to_ours(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """HF SigLIP names (``vision_model.*``, possibly inside a full SigLIP with a text tower) -> ours."""
    out = {}
    for name, t in state.items():
        if name.startswith(_SIGLIP_DROP) or name.endswith("position_ids"):
            continue
        out[name.removeprefix("vision_model.")] = t
    return out


def ours_to_siglip(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our SigLIP names -> the names ``transformers`` 5 writes for a ``SiglipVisionModel``, which
    are ours (older versions, and full SigLIP folders, add the ``vision_model.`` that
    :func:`siglip_to_ours` removes)."""
    return dict(state)
