"""Checkpoint folders: our format, the official layout, `cheers init` from separate parts, bad files."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from cheers.checkpoint import convert, load_pretrained, save_pretrained
from cheers.cli import main as cli_main
from cheers.compose import compose
from cheers.config import FLAVOURS, flavour
from cheers.errors import CheckpointError
from cheers.safetensors_io import read_state_dict

OFFICIAL = Path(__file__).parent / "fixtures" / "official_cheers_tiny"


def test_our_folder_rebuilds_the_model_alone(debug_model, tmp_path):
    save_pretrained(debug_model, tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["flavour"] == "debug"
    again = load_pretrained(tmp_path)
    assert again.cfg == debug_model.cfg
    for k, v in debug_model.state_dict().items():
        assert torch.equal(again.state_dict()[k], v), k


def test_convert_official_to_ours_and_back_is_exact(tmp_path):
    convert(OFFICIAL, tmp_path / "ours", to="cheers")
    convert(tmp_path / "ours", tmp_path / "official", to="official")
    a, b = load_file(OFFICIAL / "model.safetensors"), load_file(tmp_path / "official" / "model.safetensors")
    assert set(a) == set(b)
    assert all(torch.equal(a[k], b[k]) for k in a)
    text, again = (json.loads((d / "config.json").read_text())["text_config"] for d in (OFFICIAL, tmp_path / "official"))
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "tie_word_embeddings"):
        assert again[key] == text[key], key


@pytest.mark.parametrize("name", sorted(FLAVOURS))
def test_convert_round_trips_each_flavour_it_accepts_and_refuses_the_others_before_writing(name, tmp_path):
    """A flavour the official config can name comes back from it with the same architecture;
    one it cannot (the debug flavour's block counts, the shapes world's options) is refused
    naming the setting, and no output folder is left behind."""
    from cheers.adapters.official import config_from_official, config_to_official
    from cheers.model import CheersModel

    cfg = flavour(name)
    try:
        official = config_to_official(cfg)
    except CheckpointError as e:
        assert "official" in str(e)
        torch.manual_seed(0)
        model = CheersModel(cfg)
        model.init_weights()
        save_pretrained(model, tmp_path / "ours")
        with pytest.raises(CheckpointError, match="official"):
            convert(tmp_path / "ours", tmp_path / "out", to="official")
        assert not (tmp_path / "out").exists()
        return
    back = config_from_official(json.loads(json.dumps(official)), tokens=cfg.tokens)
    same = dataclasses.replace(back, flavour=cfg.flavour, max_seq_len=cfg.max_seq_len)
    assert same == cfg


def test_convert_keeps_the_tokenizer_and_inference_loads_the_result(tmp_path):
    from cheers.debug_checkpoint import make_debug_checkpoint
    from cheers.pipeline import Pipeline

    model, tok = make_debug_checkpoint(tmp_path / "debug")
    cli_main(["convert", str(tmp_path / "debug"), str(tmp_path / "ours"), "--to", "cheers"])
    assert (tmp_path / "ours" / "tokenizer.json").read_bytes() == (tmp_path / "debug" / "tokenizer.json").read_bytes()
    pipe = Pipeline.from_pretrained(tmp_path / "ours")
    assert pipe.model.cfg == model.cfg
    for k, v in model.state_dict().items():
        assert torch.equal(pipe.model.state_dict()[k], v), k
    image = pipe.generate(["a red circle"], steps=1, seed=0)[0]
    assert image.size == (model.cfg.tokenizer.image_size,) * 2
    # the official fixture (no tokenizer of its own) round-trips with one put beside it
    tok.save(tmp_path / "fixture")
    for f in ("config.json", "model.safetensors"):
        (tmp_path / "fixture" / f).write_bytes((OFFICIAL / f).read_bytes())
    convert(tmp_path / "fixture", tmp_path / "fixture-ours", to="cheers")
    convert(tmp_path / "fixture-ours", tmp_path / "fixture-official", to="official")
    assert (tmp_path / "fixture-official" / "tokenizer.json").is_file()
    assert load_pretrained(tmp_path / "fixture-ours", tokens=tok.special).cfg.tokens == tok.special


def test_missing_and_misshaped_tensors_are_named(debug_model, tmp_path):
    save_pretrained(debug_model, tmp_path)
    sd = load_file(tmp_path / "model.safetensors")
    del sd["head.gate.layer_norm.weight"]
    sd["llm.norm.weight"] = torch.ones(7)
    save_file(sd, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError) as e:
        load_pretrained(tmp_path)
    msg = str(e.value)
    assert "head.gate.layer_norm.weight" in msg and "llm.norm.weight" in msg and "found [7]" in msg


def test_truncated_file_and_foreign_config(debug_model, tmp_path):
    save_pretrained(debug_model, tmp_path)
    data = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 8}))
    with pytest.raises(CheckpointError, match="model_type='llama'"):
        load_pretrained(tmp_path)


def test_cli_reports_bad_checkpoint_without_traceback(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        cli_main(["convert", str(tmp_path / "missing"), str(tmp_path / "out"), "--to", "cheers"])
    assert e.value.code == 2
    assert "checkpoint folder not found" in capsys.readouterr().err


# --------------------------------------------------------------------------- cheers init


def _tiny_parts(tmp_path: Path):
    """Tiny pretrained parts written by transformers and diffusers in their own formats."""
    from diffusers import AutoencoderKL
    from transformers import Qwen2Config, Qwen2ForCausalLM, SiglipVisionConfig, SiglipVisionModel

    torch.manual_seed(0)
    Qwen2ForCausalLM(Qwen2Config(vocab_size=320, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
                     ).save_pretrained(tmp_path / "llm")
    SiglipVisionModel(SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, patch_size=16, image_size=64)
                      ).save_pretrained(tmp_path / "siglip")
    AutoencoderKL(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 4,
                  up_block_types=["UpDecoderBlock2D"] * 4, block_out_channels=[32, 32, 32, 32],
                  layers_per_block=1, latent_channels=8, norm_num_groups=32).save_pretrained(tmp_path / "vae")
    return tmp_path / "llm", tmp_path / "siglip", tmp_path / "vae"


def test_init_composes_parts_unchanged(tmp_path):
    from transformers import Qwen2ForCausalLM, SiglipVisionModel

    llm_dir, sig_dir, vae_dir = _tiny_parts(tmp_path)
    base = dataclasses.replace(flavour("debug"), max_seq_len=512)
    model = compose(llm_dir, sig_dir, vae_dir, base=base)
    ids = torch.randint(0, 300, (1, 12))
    ref = Qwen2ForCausalLM.from_pretrained(llm_dir).eval()
    with torch.no_grad():
        torch.testing.assert_close(model.llm(ids), ref(ids).logits, atol=1e-5, rtol=1e-5)
        pixels = torch.rand(1, 3, 64, 64)
        ref_sig = SiglipVisionModel.from_pretrained(sig_dir).eval()
        torch.testing.assert_close(model.tokenizer.siglip(pixels)[0], ref_sig(pixel_values=pixels).last_hidden_state,
                                   atol=1e-5, rtol=1e-5)
    # the pixel decoder starts as the VAE decoder
    vae_dec = model.tokenizer.vae.decoder.state_dict()
    for k, v in model.tokenizer.pixel_decoder.decoder.state_dict().items():
        assert torch.equal(v, vae_dec[k])
    # the gate starts closed
    assert model.head.gate.gate[2].weight.abs().sum() == 0
    # and the CLI writes a folder that loads alone
    cli_main(["init", "--llm", str(llm_dir), "--siglip", str(sig_dir), "--vae", str(vae_dir),
              "--out", str(tmp_path / "init")])
    llm_config = json.loads((llm_dir / "config.json").read_text())
    assert load_pretrained(tmp_path / "init").cfg.llm.hidden_size == llm_config["hidden_size"]


def test_init_reads_the_vae_in_the_original_format(tmp_path):
    llm_dir, sig_dir, _ = _tiny_parts(tmp_path)
    official = read_state_dict(OFFICIAL)
    vae_file = tmp_path / "ae.safetensors"
    save_file({k.removeprefix("model.vae_model."): v for k, v in official.items()
               if k.startswith("model.vae_model.")}, vae_file)
    base = load_pretrained(OFFICIAL).cfg
    base = dataclasses.replace(flavour("debug"), tokenizer=dataclasses.replace(
        flavour("debug").tokenizer, vae=base.tokenizer.vae))
    model = compose(llm_dir, sig_dir, vae_file, base=base)
    assert torch.equal(model.tokenizer.vae.bn.running_var, official["model.vae_model.bn.running_var"])


def test_init_refuses_a_foreign_model(tmp_path):
    llm_dir, sig_dir, vae_dir = _tiny_parts(tmp_path)
    cfg = json.loads((llm_dir / "config.json").read_text())
    cfg["model_type"] = "llama"
    (llm_dir / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="llama"):
        compose(llm_dir, sig_dir, vae_dir, base=flavour("debug"))
