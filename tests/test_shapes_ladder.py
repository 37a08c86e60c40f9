"""The shapes ladder (benchmarks/shapes_ladder_rungs.py): its rungs' geometry, the pixel latent,
and the step-budgeted harness."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cheers.config import flavour
from cheers.errors import ConfigError
from cheers.flow_head import transport
from cheers.sequence import expand_placeholders, null_prompt, pack

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))  # the ladder is research code, not installed
from shapes_ladder_rungs import (  # noqa: E402
    RUNGS,
    PixelLatent,
    build_rung,
    rung_config,
    sample,
    with_token_px,
)


def test_pixel_latent_is_lossless_and_scaled():
    pixels = torch.rand(2, 3, 64, 64)
    lat = PixelLatent(8, scale=3.0)
    x1 = lat.encode(pixels)
    assert x1.shape == (2, 192, 8, 8)
    torch.testing.assert_close(lat.decode(x1), pixels)
    # one latent cell holds exactly its 8x8 block of pixels
    torch.testing.assert_close(x1[0, :, 1, 2].reshape(8, 8, 3).permute(2, 0, 1),
                               (pixels[0, :, 8:16, 16:24] * 2 - 1) * 3.0)


def test_token_geometry():
    cfg = flavour("shapes")
    assert cfg.tokens_per_image == 16
    small = with_token_px(cfg, 8)
    assert small.tokens_per_image == 64 and small.latent_grid == 16
    with pytest.raises(ConfigError, match="token_px=6"):
        with_token_px(cfg, 6)
    with pytest.raises(ConfigError, match="unknown rung"):
        rung_config(cfg, "R9")
    with pytest.raises(ConfigError, match="token_px applies to R0-R3"):
        rung_config(cfg, "R4", token_px=8)
    # R3 at 8 px tokens: the cascaded head's grid and the pixel latent follow the geometry
    r3 = build_rung(rung_config(cfg, "R3", token_px=8), "R3", token_px=8)
    assert r3.n == 64 and r3.latent_shape == (48, 16, 16) and r3.head.grid == 16
    with pytest.raises(ConfigError, match="R2 / R3 only"):
        build_rung(rung_config(cfg, "R0"), "R0", llm_time=True)
    with pytest.raises(ConfigError, match="pretrained parts"):
        build_rung(rung_config(cfg, "R5"), "R5", parts={})


def _batch(cfg, prompts_ids: list[list[int]], images: torch.Tensor):
    seqs = [expand_placeholders(ids, None, cfg, [img], [True]) for ids, img in zip(prompts_ids, images)]
    return pack(seqs, cfg)


@pytest.mark.parametrize("rung, llm_time", [("R0", False), ("R1", False), ("R2", False), ("R3", False),
                                            ("R2", True)])
def test_pixel_rungs_train_and_sample(rung, llm_time):
    """Forward gives the loss dict with a gradient everywhere it should; the sampler's
    velocity is the one the training loss reads (same x1 prediction at the same xt, t)."""
    torch.manual_seed(0)
    cfg = rung_config(flavour("shapes"), rung, 8 if rung == "R0" else None)
    model = build_rung(cfg, rung, token_px=8 if rung == "R0" else None, pixel_scale=2.0, llm_time=llm_time)
    model.init_weights()
    for p in model.parameters():  # leave the zero-initialised outputs: the test needs signal
        if p.dim() > 1 and p.abs().sum() == 0:
            torch.nn.init.normal_(p, std=0.02)
    tk = cfg.tokens
    prompt = [tk.chat_start, 10, 11, 12, tk.eos, tk.chat_start, 13, tk.im_start, -300, tk.im_end, tk.eos]
    images = torch.rand(2, 3, 64, 64)
    batch = _batch(cfg, [prompt, [*prompt[:2], 14, *prompt[3:]]], images)
    batch.targets[:] = -100
    out = model(batch)
    assert set(out) == {"loss", "ce", "flow"} and out["loss"].isfinite()
    out["loss"].backward()
    unused = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not unused, f"{rung}: parameters without a gradient: {unused[:5]}"
    # the sampler: conditional then null rows; its latent has the model's latent shape
    cond = expand_placeholders(prompt, None, cfg, [images[0]], [True])
    null = expand_placeholders(null_prompt(prompt, cfg), None, cfg, [images[0]], [True])
    x0 = torch.randn(1, *model.latent_shape)
    lat = sample(model, pack([cond, null], cfg), x0, steps=3, cfg_scale=2.0)
    assert lat.shape == x0.shape and lat.isfinite().all()
    # velocity_at reads the same prediction the loss reads
    x1 = model.latent.encode(images)
    t = torch.tensor([0.3, 0.6])
    xt = transport.interpolate(x1, torch.randn_like(x1), t)
    x1_pred, _ = model.predict(batch, xt, t)
    torch.testing.assert_close(model.velocity_at(batch, xt, t),
                               transport.velocity_from_x1(x1_pred, xt, t, t_min=cfg.transport.x1_loss_t_min))


def test_every_rung_is_described():
    assert list(RUNGS) == ["R0", "R1", "R2", "R3", "R4", "R5"]


def test_harness_runs_r0_two_steps_and_writes_json(tmp_path):
    out = tmp_path / "R0"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "shapes_ladder.py"), "--rung", "R0", "--steps", "2",
           "--points", "1", "--prompts", "1", "--samples", "64", "--work", str(tmp_path / "work"),
           "--out", str(out), "--threads", "1", "train.global_batch=4", "train.micro_batch=4"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    record = json.loads((out / "ladder.json").read_text())
    assert record["rung"] == "R0" and [p["step"] for p in record["points"]] == [1, 2]
    for point in record["points"]:
        assert point["images"] == 12  # 1 prompt x 3 tags x 4 images
        for key in ("colors", "single_object", "two_object", "colour_right", "shape_right", "empty"):
            assert 0.0 <= point[key] <= 1.0
        assert point["seconds_per_step"] > 0
    assert (out / "curve.png").is_file() and (out / "grid-2.png").is_file()
    # run again: the points are there, nothing is redone; a different run is refused
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-2000:]
    assert len(json.loads((out / "ladder.json").read_text())["points"]) == 2
    other = subprocess.run([*cmd, "train.lr=1e-4"], capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert other.returncode != 0 and "holds another run" in other.stderr
    _sampling_batch_keeps_prompt_order(tmp_path / "work" / "tokenizer", record)
    # the error-by-time instrument reads the kept checkpoints and writes into the same rows
    timed = subprocess.run([*cmd, "--loss-by-time"], capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert timed.returncode == 0, timed.stderr[-2000:]
    for point in json.loads((out / "ladder.json").read_text())["points"]:
        assert len(point["error_by_time"]) == len(point["error_times"]) == 8
        assert all(0.0 < e < 4.0 for e in point["error_by_time"])  # pixels in [0, 1], predictions unclamped
    # compare: a row per point in each table, and the figure
    table = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "shapes_ladder.py"), "compare",
                            str(tmp_path / "cmp.png"), str(out)], capture_output=True, text=True, timeout=600)
    assert table.returncode == 0, table.stderr[-2000:]
    assert sum(line.startswith("| R0, train.global_batch=4") for line in table.stdout.splitlines()) == 4  # 2 x 2 tables
    assert (tmp_path / "cmp.png").is_file()
    # the colour probe reads the run's checkpoint
    probe = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "shapes_colour_probe.py"), "--run", str(out),
                            "--step", "2", "--scenes", "3", "--times", "0", "0.5", "--work", str(tmp_path / "work"),
                            "--threads", "1"], capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert probe.returncode == 0, probe.stderr[-2000:]
    rows = json.loads((out / "colour_probe-2.json").read_text())["rows"]
    assert [r["t"] for r in rows] == [0.0, 0.5]
    for row in rows:
        for key in ("true_prompt/cond/follows_prompt", "wrong_prompt/cfg/follows_image"):
            assert 0.0 <= row[key] <= 1.0


def _sampling_batch_keeps_prompt_order(tok_dir: Path, record: dict):
    """``sample`` reads the first half of a sampling batch's images as the prompts in order and
    the second half as their null prompts: the batch must keep that order, whatever the lengths."""
    import importlib.util

    from shapes_ladder_rungs import prompt_mask

    from cheers.text_tokenizer import TextTokenizer

    spec = importlib.util.spec_from_file_location("shapes_ladder", ROOT / "benchmarks" / "shapes_ladder.py")
    harness = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(harness)
    cfg = rung_config(flavour("shapes"), "R0")
    tok = TextTokenizer.from_dir(tok_dir)
    prompts = ["a photo of a red circle", "a photo of two blue squares and a green triangle",
               "a photo of a yellow star", "a photo of a purple heart and an orange cross"]
    meta = [{"prompt": p} for p in prompts]
    (chunk, batch), = harness.sampling_batches(cfg, tok, meta, 2, 64)
    rows, mask = prompt_mask(batch)
    got = [batch.input_ids[r][m].tolist() for r, m in zip(rows, mask)]
    want = []
    for null in (False, True):
        for _i, m, _k in chunk:
            ids, _ = tok.t2i_sample(m["prompt"])
            ids = null_prompt(ids, cfg) if null else ids
            want.append(ids[:len(got[len(want)])])
    assert got == want
