"""Every weight adapter (cheers/adapters/) round-trips: a checkpoint written by its own library
loads into our module through load_checked, and our state dict maps back to the same names and
values; a tensor of no known name is refused by name."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from cheers.adapters import diffusers_vae, hf_qwen, official, siglip
from cheers.errors import CheckpointError
from cheers.llm import LLM
from cheers.model import CheersModel
from cheers.safetensors_io import load_checked, read_state_dict
from cheers.tokenizer.siglip import SiglipVision
from cheers.tokenizer.vae import VAE

FIXTURE = Path(__file__).parent / "fixtures" / "official_cheers_tiny"


def _randomised(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The module's state dict with every floating tensor moved off its init, so that a swapped
    or dropped name cannot hide behind equal initial values."""
    g = torch.Generator().manual_seed(0)
    return {k: v + torch.randn(v.shape, generator=g) if v.is_floating_point() else v
            for k, v in module.state_dict().items()}


def _qwen():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    hf = Qwen2ForCausalLM(Qwen2Config(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False))
    return _randomised(hf), hf.config.to_dict()


def _siglip():
    from transformers import SiglipVisionConfig, SiglipVisionModel

    hf = SiglipVisionModel(SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                              num_attention_heads=4, patch_size=8, image_size=32))
    return _randomised(hf), {"model_type": "siglip_vision_model", **hf.config.to_dict()}


def _diffusers_vae():
    from diffusers import AutoencoderKL

    ae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 2,
                       up_block_types=["UpDecoderBlock2D"] * 2, block_out_channels=[32, 64], layers_per_block=1,
                       latent_channels=4, norm_num_groups=32)
    return _randomised(ae), dict(ae.config)


def _official():
    return read_state_dict(FIXTURE), json.loads((FIXTURE / "config.json").read_text())


def _official_vae():
    state, config = _official()
    prefix = diffusers_vae.OFFICIAL_VAE_PREFIX
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}, config


def _init(module: torch.nn.Module) -> torch.nn.Module:
    module.init_weights()
    return module


@dataclass
class Adapter:
    name: str
    theirs: Callable[[], tuple[dict, dict]]  # (state dict in their names, their config.json)
    config: Callable[[dict], object]  # config_from_<layout>
    build: Callable[[object], torch.nn.Module]  # our module for that config
    to_ours: Callable[[dict, object], dict]  # <layout>_to_ours
    to_theirs: Callable[[dict, object], dict]  # ours_to_<layout>


ADAPTERS = [
    Adapter("official", _official, lambda c: official.config_from_official(c, source="fixture"), lambda cfg: _init(CheersModel(cfg)),
            lambda sd, cfg: official.official_to_ours(sd, cfg), official.ours_to_official),
    Adapter("hf_qwen", _qwen, lambda c: hf_qwen.config_from_hf_qwen(c, source="qwen"),
            lambda cfg: _init(LLM(cfg)),
            lambda sd, cfg: hf_qwen.hf_qwen_to_ours(sd, cfg, source="qwen"), hf_qwen.ours_to_hf_qwen),
    Adapter("siglip", _siglip, lambda c: siglip.config_from_siglip(c, source="siglip"), SiglipVision,
            lambda sd, cfg: siglip.siglip_to_ours(sd), lambda sd, cfg: siglip.ours_to_siglip(sd)),
    Adapter("diffusers_vae", _diffusers_vae, diffusers_vae.config_from_diffusers_vae, VAE,
            lambda sd, cfg: diffusers_vae.diffusers_vae_to_ours(sd),
            lambda sd, cfg: diffusers_vae.ours_to_diffusers_vae(sd)),
    Adapter("official_vae", _official_vae, diffusers_vae.config_from_official_vae, VAE,
            lambda sd, cfg: diffusers_vae.official_vae_to_ours(sd, cfg),
            lambda sd, cfg: diffusers_vae.ours_to_official_vae(sd, cfg)),
]


@pytest.mark.parametrize("adapter", ADAPTERS, ids=lambda a: a.name)
def test_their_checkpoint_loads_and_maps_back_exactly(adapter: Adapter):
    state, config = adapter.theirs()
    cfg = adapter.config(config)
    module = adapter.build(cfg)
    ours = adapter.to_ours(state, cfg)
    # names and shapes all checked: a checkpoint of our own library's config fits whole,
    # apart from parts ours has and theirs lacks (the VAE's latent statistics)
    report = load_checked(module, ours, source=adapter.name, strict=False)
    assert not report.unexpected and not report.mismatched, report.describe()
    assert all(name.startswith("bn.") for name in report.missing), report.describe()
    mine = {k: v for k, v in module.state_dict().items() if not k.startswith("bn.") or k in ours}
    back = adapter.to_theirs(mine, cfg)
    assert set(back) == set(state), sorted(set(back) ^ set(state))[:8]
    for name in state:
        assert torch.equal(back[name], state[name]), name


@pytest.mark.parametrize("adapter", ADAPTERS, ids=lambda a: a.name)
def test_unknown_or_mis_shaped_tensors_are_refused_by_name(adapter: Adapter):
    state, config = adapter.theirs()
    cfg = adapter.config(config)
    module = adapter.build(cfg)
    bad = {**state, "no_such.part.weight": torch.zeros(1)}
    with pytest.raises(CheckpointError, match=r"(?s)no_such\.part\.weight"):  # by the adapter or the load
        load_checked(module, adapter.to_ours(bad, cfg), source=adapter.name)
    first = next(k for k, v in state.items() if v.ndim == 1)
    wrong = {**state, first: torch.zeros(state[first].shape[0] + 1)}
    with pytest.raises(CheckpointError, match=rf"(?s){adapter.name}: .*1 mis-shaped.*mis-shaped: .*{first.split('.')[-2]}"):
        load_checked(module, adapter.to_ours(wrong, cfg), source=adapter.name)
