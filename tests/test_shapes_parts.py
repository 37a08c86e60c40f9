"""The shapes world's pretrained parts: made for a fixed number of steps, stored with their
training figures, checked against the config when loaded, and shipped in the package."""

from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from cheers.config import flavour
from cheers.errors import CheersError
from cheers.shapes.parts import (
    PARTS_FILE,
    load_parts,
    main,
    read_parts_log,
    save_parts,
    train_parts,
)


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """Made without --out: the file lands in outputs/ of the working folder, not over the shipped one."""
    folder, shipped = tmp_path_factory.mktemp("parts"), PARTS_FILE.read_bytes()
    cwd = os.getcwd()
    os.chdir(folder)
    try:
        assert main(["--vae-steps", "2", "--semantic-steps", "2", "--threads", "1"]) == 0
    finally:
        os.chdir(cwd)
    assert PARTS_FILE.read_bytes() == shipped
    return folder / "outputs" / "shapes_parts.safetensors"


@pytest.mark.slow
def test_parts_round_trip_with_their_log(made):
    cfg = flavour("shapes").tokenizer
    parts = load_parts(made, cfg)
    log = read_parts_log(made)
    assert log["vae_steps"] == 2 and log["semantic_steps"] == 2
    assert set(log["semantic_patch_accuracy"]) == {"colour", "shape", "background"}
    # a fixed step count and seed make the same parts again
    again, _ = train_parts(cfg, vae_steps=2, semantic_steps=2, seed=0, progress=False)
    for name in ("vae", "siglip"):
        assert parts[name].keys() == again[name].keys()
        for key, value in again[name].items():
            torch.testing.assert_close(parts[name][key], value, msg=f"{name}.{key}")


def test_parts_that_do_not_fit_are_refused_by_name(tmp_path):
    from cheers.tokenizer.siglip import SiglipVision
    from cheers.tokenizer.vae import VAE

    cfg = flavour("shapes").tokenizer
    made = tmp_path / "fresh.safetensors"
    save_parts(made, {"vae": VAE(cfg.vae).state_dict(), "siglip": SiglipVision(cfg.siglip).state_dict()}, {})
    load_parts(made, cfg)
    flat = load_file(str(made))
    key = next(k for k in flat if k.startswith("siglip.") and flat[k].dim() == 2)
    bad = dict(flat)
    bad[key] = torch.zeros(3, 3)
    save_file(bad, str(tmp_path / "shape.safetensors"))
    with pytest.raises(CheersError, match=rf"{key} has shape \(3, 3\)"):
        load_parts(tmp_path / "shape.safetensors", cfg)
    missing = {k: v for k, v in flat.items() if k != key}
    save_file(missing, str(tmp_path / "missing.safetensors"))
    with pytest.raises(CheersError, match=f"missing {key}"):
        load_parts(tmp_path / "missing.safetensors", cfg)
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CheersError, match="junk.safetensors: not a readable"):
        load_parts(tmp_path / "junk.safetensors", cfg)
    with pytest.raises(SystemExit) as e:
        main(["--out", str(tmp_path / "parts.bin")])
    assert e.value.code == 2


def test_shipped_parts_fit_the_shapes_flavour():
    assert PARTS_FILE.is_file(), f"{PARTS_FILE} is missing: python -m cheers.shapes.parts"
    assert PARTS_FILE.stat().st_size < 5 * 2**20
    load_parts(PARTS_FILE, flavour("shapes").tokenizer)
    log = read_parts_log(PARTS_FILE)
    assert log["vae_steps"] >= 1000 and log["semantic_steps"] >= 1000


def test_save_parts_writes_both(tmp_path):
    parts = {"vae": {"w": torch.ones(2)}, "siglip": {"w": torch.zeros(2)}}
    save_parts(tmp_path / "p.safetensors", parts, {"note": 1})
    flat = load_file(str(tmp_path / "p.safetensors"))
    assert set(flat) == {"vae.w", "siglip.w"} and read_parts_log(tmp_path / "p.safetensors") == {"note": 1}
