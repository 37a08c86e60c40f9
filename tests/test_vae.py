"""VAE, latent normalisation and checkpoint translation (tokenizer/vae.py, latent.py, cheers/adapters/diffusers_vae.py).

Parity is against the official implementation's recorded outputs in
``tests/fixtures/official_cheers_tiny`` (fp32, CPU); tolerance |a - b| <= 1e-4 * max(1, max|b|).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL, AutoencoderKLFlux2
from safetensors.torch import load_file, save_file

from cheers.adapters.diffusers_vae import (
    OFFICIAL_PIXEL_DECODER_PREFIX,
    OFFICIAL_VAE_PREFIX,
    config_from_diffusers_vae,
    config_from_official_vae,
    load_vae_folder,
    official_vae_to_ours,
    ours_to_official_vae,
)
from cheers.adapters.official import config_to_official
from cheers.config import VAEConfig, flavour
from cheers.errors import CheckpointError, ConfigError, InputError
from cheers.safetensors_io import load_checked
from cheers.tokenizer.latent import LatentNorm, patchify, to_grid, to_tokens, unpatchify
from cheers.tokenizer.vae import VAE, PixelDecoder, VAEDecoder, VAEEncoder

FIXTURE = Path(__file__).parent / "fixtures" / "official_cheers_tiny"


def _sub(sd: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}


def _assert_parity(name: str, ours: torch.Tensor, ref: torch.Tensor) -> None:
    assert ours.shape == ref.shape, f"{name}: shape {tuple(ours.shape)} != {tuple(ref.shape)}"
    diff = (ours - ref).abs().max().item()
    tol = 1e-4 * max(1.0, ref.abs().max().item())
    print(f"{name}: max |ours - official| = {diff:.3e} (tol {tol:.1e})")
    assert diff <= tol, f"{name}: max abs diff {diff:.3e} > {tol:.1e}"


@pytest.fixture(scope="module")
def official() -> dict:
    """The fixture: config, official VAE / pixel-decoder state dicts, inputs, outputs."""
    full = load_file(str(FIXTURE / "model.safetensors"))
    return {
        "cfg": config_from_official_vae(json.loads((FIXTURE / "config.json").read_text())),
        "vae_sd": _sub(full, OFFICIAL_VAE_PREFIX),
        "pd_sd": _sub(full, OFFICIAL_PIXEL_DECODER_PREFIX),
        "inputs": load_file(str(FIXTURE / "inputs.safetensors")),
        "outputs": load_file(str(FIXTURE / "outputs.safetensors")),
    }


@pytest.fixture(scope="module")
def loaded(official) -> tuple[VAE, PixelDecoder]:
    cfg = official["cfg"]
    vae, pd = VAE(cfg).eval(), PixelDecoder(cfg).eval()
    load_checked(vae, official_vae_to_ours(official["vae_sd"], cfg), source="fixture vae_model")
    load_checked(pd, official_vae_to_ours(official["pd_sd"], cfg), source="fixture projector")
    return vae, pd


# ------------------------------------------------------------------------------ fixture parity


def test_config_from_official(official):
    cfg = official["cfg"]
    data = json.loads((FIXTURE / "config.json").read_text())
    enc, dec = data["vae_encoder_config"], data["vae_decoder_config"]
    assert (cfg.ch, cfg.ch_mult, cfg.num_res_blocks, cfg.z_channels) == (
        enc["ch"], enc["ch_mult"], enc["num_res_blocks"], enc["z_channels"])
    assert (cfg.decoder_ch, cfg.decoder_ch_mult, cfg.decoder_num_res_blocks) == (
        dec["ch"], dec["ch_mult"], dec["num_res_blocks"])
    # the 2x2 patchify: four times the channels, twice the encoder's downsampling
    assert cfg.latent_channels == 4 * enc["z_channels"]
    assert cfg.downsample == 2 * 2 ** (len(enc["ch_mult"]) - 1)
    # the released config.json only names the resolution: every field takes the default
    assert config_from_official_vae({"vae_encoder_config": {"resolution": 512}}) == VAEConfig()
    with pytest.raises(ConfigError, match="vae_decoder_config.double_z"):
        config_from_official_vae({"vae_decoder_config": {"double_z": True}})


@torch.no_grad()
def test_fixture_parity(official, loaded):
    vae, pd = loaded
    inp, out = official["inputs"], official["outputs"]
    x1 = vae.encode(torch.cat([inp["und.pixel_values"], inp["gen.pixel_values"]]))
    _assert_parity("und.x1_latent", x1[:1], out["und.x1_latent"])
    # t = 1 (understanding): the pixel decoder's input is the clean latent itself
    _assert_parity("und.x_t_latent", x1[:1], out["und.x_t_latent"])
    _assert_parity("gen.x1_latent", x1[1:], out["gen.x1_latent"])
    # the pixel decoder uses its own bn statistics (the VAE's would move this by 2.4)
    _assert_parity("gen.image_pixel_hat", pd(out["gen.x_t_latent"]), out["gen.image_pixel_hat"])
    _assert_parity(
        "gen.velocity_decoded_pixels",
        vae.decode(out["gen.velocity_bchw"]),
        out["gen.velocity_decoded_pixels"],
    )


def test_load_official_folder(official, loaded):
    """``load_vae_folder`` on a Cheers checkpoint folder reads the ``model.vae_model`` sub-tree."""
    sd = load_vae_folder(FIXTURE)
    ref = loaded[0].state_dict()
    assert sd.keys() == ref.keys()
    assert all(torch.equal(sd[k], ref[k]) for k in sd)


# ------------------------------------------------------------------------------ key translation


def test_official_round_trip_exact(official):
    cfg = official["cfg"]
    for part in ("vae_sd", "pd_sd"):
        sd = official[part]
        back = ours_to_official_vae(official_vae_to_ours(sd, cfg), cfg)
        assert back.keys() == sd.keys()
        for k, v in sd.items():
            assert back[k].shape == v.shape and torch.equal(back[k], v), k
    # ours -> official -> ours on a freshly initialised model
    vae = VAE(cfg)
    ours = vae.state_dict()
    again = official_vae_to_ours(ours_to_official_vae(ours, cfg), cfg)
    assert again.keys() == ours.keys() and all(torch.equal(again[k], ours[k]) for k in ours)
    # LDM `up.{level}` runs opposite to diffusers' up_blocks
    assert "decoder.net.up_blocks.3.resnets.0.conv_shortcut.weight" in official_vae_to_ours(
        {"decoder.up.0.block.0.nin_shortcut.weight": torch.zeros(1)}, cfg
    )


def test_single_original_file(official, loaded, tmp_path):
    """A bare original-layout file (FLUX.2 ``ae.safetensors`` style) with the cfg given."""
    file = tmp_path / "ae.safetensors"
    save_file(official["vae_sd"], str(file))
    sd = load_vae_folder(file, official["cfg"])
    ref = loaded[0].state_dict()
    assert all(torch.equal(sd[k], ref[k]) for k in ref)
    with pytest.raises(CheckpointError, match="needs a VAEConfig"):
        load_vae_folder(file)

    # SD-style: a prefix, quant convs at the top level, no BatchNorm (identity stand-in)
    sd_style = {}
    for k, v in official["vae_sd"].items():
        if k.startswith("bn."):
            continue
        k = k.replace("encoder.quant_conv", "quant_conv").replace(
            "decoder.post_quant_conv", "post_quant_conv"
        )
        sd_style["first_stage_model." + k] = v
    save_file({**sd_style, "model.diffusion_model.x.weight": torch.zeros(1)}, str(file))
    sd = load_vae_folder(file, official["cfg"])
    assert torch.equal(sd["encoder.quant_conv.weight"], ref["encoder.quant_conv.weight"])
    assert torch.allclose(sd["bn.running_var"] + 1e-4, torch.ones(official["cfg"].latent_channels))
    assert not sd["bn.running_mean"].any()


def test_bad_keys_named(official, tmp_path):
    cfg = official["cfg"]
    vae_sd = dict(official["vae_sd"])

    unknown = {**vae_sd, "encoder.mid.attn_2.q.weight": torch.zeros(32, 32, 1, 1)}
    with pytest.raises(CheckpointError, match=r"encoder\.mid\.attn_2\.q\.weight"):
        official_vae_to_ours(unknown, cfg)

    missing = dict(vae_sd)
    del missing["decoder.up.1.upsample.conv.bias"]
    with pytest.raises(CheckpointError, match=r"missing.*decoder\.net\.up_blocks\.2\.upsamplers"):
        load_checked(VAE(cfg), official_vae_to_ours(missing, cfg), source="test")
    file = tmp_path / "missing.safetensors"
    save_file(missing, str(file))
    # through the file loader the message also gives the checkpoint's own name
    with pytest.raises(CheckpointError, match=r"decoder\.up\.1\.upsample\.conv\.bias"):
        load_vae_folder(file, cfg)

    misshaped = {**vae_sd, "encoder.conv_in.weight": torch.zeros(32, 4, 3, 3)}
    with torch.device("meta"):
        shape_only = VAE(cfg)
    with pytest.raises(CheckpointError, match=r"mis-shaped.*encoder\.net\.conv_in\.weight"):
        load_checked(shape_only, official_vae_to_ours(misshaped, cfg), source="test")

    # a pixel-decoder state dict does not fit a whole VAE: the encoder is reported missing
    with pytest.raises(CheckpointError, match="missing"):
        load_checked(shape_only, official_vae_to_ours(official["pd_sd"], cfg), source="test")


# ------------------------------------------------------------------------------ diffusers folders


def _randomise(module: torch.nn.Module, seed: int) -> None:
    """Move every parameter off its init, so that a wrong mapping cannot hide."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))


_TINY = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 2,
    up_block_types=("UpDecoderBlock2D",) * 2,
    block_out_channels=(32, 64),
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=32,
)


@torch.no_grad()
def test_diffusers_autoencoder_kl(tmp_path):
    torch.manual_seed(0)
    ref = AutoencoderKL(**_TINY, scaling_factor=0.5, shift_factor=0.1).eval()
    _randomise(ref, 1)
    ref.save_pretrained(tmp_path / "ae")

    sd = load_vae_folder(tmp_path / "ae")
    cfg = config_from_diffusers_vae(json.loads((tmp_path / "ae" / "config.json").read_text()))
    assert (cfg.ch, cfg.ch_mult, cfg.num_res_blocks, cfg.z_channels) == (32, [1, 2], 1, 4)
    vae = VAE(cfg).eval()
    load_checked(vae, sd, source="diffusers AutoencoderKL")

    pixels = torch.rand(2, 3, 16, 16)
    mean = ref.encode(pixels).latent_dist.mean  # [2, 4, 8, 8]
    z = vae.encoder(pixels)
    assert (z - mean).abs().max() <= 1e-5
    latent = torch.randn(2, 4, 8, 8)
    assert (vae.decoder(latent) - ref.decode(latent).sample).abs().max() <= 1e-5
    # without a BatchNorm the stand-in statistics reproduce (z - shift) * scale
    x1 = vae.encode(pixels)
    assert (x1 - patchify((mean - 0.1) * 0.5)).abs().max() <= 1e-5


@torch.no_grad()
def test_diffusers_flux2(tmp_path):
    torch.manual_seed(0)
    ref = AutoencoderKLFlux2(**_TINY, decoder_block_out_channels=(32, 32)).eval()
    _randomise(ref, 2)
    ref.bn.running_mean.normal_(0, 0.3)
    ref.bn.running_var.uniform_(0.25, 4)
    ref.save_pretrained(tmp_path / "pipe" / "vae")

    sd = load_vae_folder(tmp_path / "pipe")  # a pipeline folder: its vae/ subfolder is used
    cfg = config_from_diffusers_vae(json.loads((tmp_path / "pipe/vae/config.json").read_text()))
    assert (cfg.decoder_ch, cfg.decoder_ch_mult) == (32, [1, 1])
    vae = VAE(cfg).eval()
    load_checked(vae, sd, source="diffusers AutoencoderKLFlux2")

    pixels = torch.rand(2, 3, 16, 16)
    want = ref.bn(patchify(ref.encode(pixels).latent_dist.mean))  # BatchNorm in eval mode
    assert (vae.encode(pixels) - want).abs().max() <= 1e-5
    x = torch.randn(2, 16, 4, 4)
    std = torch.sqrt(ref.bn.running_var + ref.config.batch_norm_eps).view(1, -1, 1, 1)
    z = unpatchify(x * std + ref.bn.running_mean.view(1, -1, 1, 1))
    assert (vae.decode(x) - ref.decode(z).sample).abs().max() <= 1e-5


def test_diffusers_config_rejects_unsupported():
    with pytest.raises(ConfigError, match="act_fn"):
        config_from_diffusers_vae({"_class_name": "AutoencoderKL", "act_fn": "gelu"})
    with pytest.raises(ConfigError, match="_class_name"):
        config_from_diffusers_vae({"_class_name": "AutoencoderTiny"})


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="no config.json"):
        load_vae_folder(tmp_path)
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="bad.safetensors"):
        load_vae_folder(bad, VAEConfig())


# ------------------------------------------------------------------------------ latent


def test_patchify_layout_and_inverse():
    z = torch.randn(2, 3, 8, 6)
    x = patchify(z)  # [2, 12, 4, 3]
    assert x.shape == (2, 12, 4, 3)
    for c, pi, pj, h, w in [(0, 0, 0, 0, 0), (1, 0, 1, 2, 1), (2, 1, 0, 3, 2), (2, 1, 1, 1, 0)]:
        assert x[1, c * 4 + pi * 2 + pj, h, w] == z[1, c, 2 * h + pi, 2 * w + pj]
    assert torch.equal(unpatchify(x), z)
    assert torch.equal(to_grid(to_tokens(x), 4, 3), x)
    assert to_tokens(x)[0, 1 * 3 + 2, 5] == x[0, 5, 1, 2]  # raster order, channels last


def test_tokens_match_fixture_layout(official):
    out = official["outputs"]
    assert torch.equal(to_grid(out["gen.velocity"], 4, 4), out["gen.velocity_bchw"])


def test_latent_norm_inverse_and_eval_only():
    cfg = VAEConfig(z_channels=4)
    bn = LatentNorm(cfg)
    bn.running_mean.normal_(0, 0.3)
    bn.running_var.uniform_(0.25, 4)
    stats = (bn.running_mean.clone(), bn.running_var.clone())
    z = torch.randn(3, 4, 8, 8)
    x = bn.normalize(z)
    assert x.shape == (3, 16, 4, 4)
    assert (bn.denormalize(x) - z).abs().max() <= 1e-6
    bn.train()  # never batch statistics, never a running-stat update
    assert torch.equal(bn.normalize(z[:1]), x[:1])
    assert torch.equal(bn.running_mean, stats[0]) and torch.equal(bn.running_var, stats[1])
    with pytest.raises(InputError, match=r"\(3, 5, 8, 8\)"):
        bn.normalize(torch.randn(3, 5, 8, 8))


def test_fit_statistics():
    cfg = VAEConfig(z_channels=4)
    bn = LatentNorm(cfg)
    batches = [torch.randn(2, 4, 8, 8) * 3 + 1, torch.randn(5, 4, 8, 8) * 3 + 1]
    bn.fit_statistics(batches)
    all_x = torch.cat([patchify(b) for b in batches])  # [7, 16, 4, 4]
    var, mean = torch.var_mean(all_x.double(), dim=(0, 2, 3))
    assert torch.allclose(bn.running_mean.double(), mean, atol=1e-6)
    assert torch.allclose(bn.running_var.double(), var, atol=1e-5)
    assert bn.num_batches_tracked.item() == 2
    x = bn.normalize(torch.cat(batches))
    assert x.mean(dim=(0, 2, 3)).abs().max() < 1e-4


@torch.no_grad()
def test_pooled_rgb_latent():
    """Channels 0-2 of the posterior are the 4x4-pooled pixels in [-1, 1], noise-free, so a
    mix of two latents holds the mix of the two images there; the other channels and the
    parameter layout are the plain encoder's."""
    cfg = VAEConfig(ch=8, ch_mult=[1, 2, 4], num_res_blocks=1, decoder_ch=8, decoder_ch_mult=[1, 2, 4],
                    decoder_num_res_blocks=0, z_channels=4, norm_groups=4, pooled_rgb_latent=True)
    torch.manual_seed(0)
    enc = VAEEncoder(cfg)
    plain = VAEEncoder(dataclasses.replace(cfg, pooled_rgb_latent=False))
    plain.load_state_dict(enc.state_dict())  # same parameters: checkpoints are interchangeable
    a, b = torch.rand(2, 3, 32, 32), torch.rand(2, 3, 32, 32)
    m, ref = enc.moments(a), plain.moments(a)
    assert m.shape == ref.shape == (2, 8, 8, 8)
    pooled = a.unflatten(2, (8, 4)).unflatten(4, (8, 4)).mean(dim=(3, 5))  # [2, 3, 8, 8]
    assert torch.allclose(m[:, :3], 2 * pooled - 1, atol=1e-6)
    assert torch.equal(m[:, 4:7], torch.full_like(m[:, 4:7], -30.0))  # deterministic channels
    assert torch.equal(m[:, 3], ref[:, 3]) and torch.equal(m[:, 7], ref[:, 7])
    lam = 0.3
    assert torch.allclose(lam * enc(a)[:, :3] + (1 - lam) * enc(b)[:, :3], enc(lam * a + (1 - lam) * b)[:, :3],
                          atol=1e-6)
    with pytest.raises(ConfigError, match="z_channels=2"):
        VAEEncoder(dataclasses.replace(cfg, z_channels=2))
    assert flavour("shapes").tokenizer.vae.pooled_rgb_latent
    assert not flavour("cheers-1.5b").tokenizer.vae.pooled_rgb_latent
    debug = flavour("debug")
    pooled = dataclasses.replace(debug.tokenizer.vae, pooled_rgb_latent=True)
    with pytest.raises(CheckpointError, match="pooled_rgb_latent"):
        config_to_official(dataclasses.replace(debug, tokenizer=dataclasses.replace(debug.tokenizer, vae=pooled)))


@torch.no_grad()
def test_vae_bn_eval_in_train_mode(official, loaded):
    """In train mode the latent statistics are still the stored ones, never the batch's."""
    vae = loaded[0]
    stats = vae.bn.running_mean.clone()
    pixels = official["inputs"]["und.pixel_values"]
    vae.train()
    try:
        both = vae.encode(torch.cat([pixels, torch.rand_like(pixels)]))
    finally:
        vae.eval()
    _assert_parity(
        "und.x1_latent (train mode, batch 2)", both[:1], official["outputs"]["und.x1_latent"]
    )
    assert torch.equal(vae.bn.running_mean, stats)


# ------------------------------------------------------------------------------ build and inputs


def test_meta_build_and_init(official):
    cfg = official["cfg"]
    for cls in (VAE, PixelDecoder, VAEEncoder, VAEDecoder):
        with torch.device("meta"):
            m = cls(cfg)
        m.to_empty(device="cpu")
        m.init_weights()
        ref = cls(cfg)
        assert {k: v.shape for k, v in m.state_dict().items()} == {
            k: v.shape for k, v in ref.state_dict().items()
        }
        assert all(torch.isfinite(v.float()).all() for v in m.state_dict().values())
    with torch.device("meta"):
        meta = VAE(cfg)
    meta.to_empty(device="cpu")
    meta.init_weights()
    assert (
        torch.equal(meta.bn.running_var, torch.ones(32)) and meta.bn.running_mean.abs().sum() == 0
    )
    assert torch.equal(meta.encoder.net.conv_norm_out.weight, torch.ones(32))
    with torch.no_grad():
        assert meta.decode(meta.encode(torch.rand(1, 3, 16, 16))).shape == (1, 3, 16, 16)


def test_bad_images_named(official, loaded):
    vae = loaded[0]
    with pytest.raises(InputError, match=r"\(1, 4, 64, 64\)"):
        vae.encode(torch.rand(1, 4, 64, 64))
    with pytest.raises(InputError, match=r"\(1, 3, 72, 64\)"):
        vae.encode(torch.rand(1, 3, 72, 64))  # a multiple of 8 but not of 16
    with pytest.raises(InputError, match=r"\(3, 64, 64\)"):
        vae.encode(torch.rand(3, 64, 64))
    with pytest.raises(InputError, match=r"\(1, 8, 4, 4\)"):
        vae.decode(torch.randn(1, 8, 4, 4))
