"""LC-QAT with the Cheers model: `cheers quantize`, packed checkpoints in the Pipeline, resume,
QAT through the trainer and its export, bad packed folders. CPU, fp32, the debug flavour."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from cheers.cli import main as cli_main
from cheers.debug_checkpoint import make_debug_checkpoint
from cheers.errors import CheckpointError
from cheers.lcqat import LCQLinear, PackedLCQLinear, unpack_codes
from cheers.pipeline import Pipeline
from cheers.quantize import quantize_checkpoint

QUICK = ["--samples", "8", "--batch-size", "4", "--no-progress"]
LCQ_QUICK = QUICK + ["--finetune-steps", "3"]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    folder = tmp_path_factory.mktemp("debug-ckpt")
    make_debug_checkpoint(folder)
    return folder


@pytest.fixture(scope="module")
def quantized(ckpt, tmp_path_factory):
    """(fake-quantized model in memory, its packed folder, summary)."""
    out = tmp_path_factory.mktemp("packed")
    model, summary = quantize_checkpoint(
        ckpt, out, samples=8, batch_size=4, finetune_steps=3, progress=False
    )
    return model, out, summary


def _red_square():
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (64, 64), "white")
    ImageDraw.Draw(img).rectangle([16, 16, 48, 48], fill="red")
    return img


@pytest.mark.slow
@torch.no_grad()
def test_packed_folder_runs_in_the_pipeline_like_the_fake_quantized_model(quantized):
    model, out, summary = quantized
    section = json.loads((out / "config.json").read_text())["quantization"]
    assert (
        section["quant_method"] == "lcqat" and len(section["layers"]) == 14
    )  # 2 blocks x 7 linears
    tensors = load_file(out / "model.safetensors")
    codes = tensors["llm.layers.0.mlp.down_proj.codes"]
    assert codes.dtype == torch.uint8 and tuple(codes.shape) == (32, 64 // 4)  # 4 codes per byte
    assert "llm.layers.0.mlp.down_proj.weight" not in tensors
    # 32-wide layers pay more for SU / SV than the 2.01 of a 4096-wide one
    assert 2.0 < summary["bits_per_weight"] < 3.5

    packed = Pipeline.from_pretrained(out)
    layer = packed.model.llm.layers[1].self_attn.q_proj
    assert isinstance(layer, PackedLCQLinear)
    # the stored scales are float16: round the twin's the same way, then the two must agree
    # to float32 precision
    for mod in model.modules():
        if isinstance(mod, LCQLinear):
            for p in (mod.SU, mod.SV) + ((mod.bias,) if mod.bias is not None else ()):
                p.copy_(p.half().float())
    fake = Pipeline(model, packed.text_tokenizer)
    ids = torch.tensor([packed.text_tokenizer.i2t_prompt("What colour is the square?", 0)])
    torch.testing.assert_close(packed.model.llm(ids), fake.model.llm(ids), rtol=1e-4, atol=1e-4)

    kw = dict(seeds=[3], steps=2, cfg_scale=2.0)
    torch.testing.assert_close(
        packed.generate_latents(["a red circle"], **kw),
        fake.generate_latents(["a red circle"], **kw),
        rtol=1e-3,
        atol=1e-3,
    )
    image = packed.generate("a red circle", steps=2, cfg_scale=2.0)[0]
    assert image.size == (64, 64)
    answer = packed.understand(_red_square(), "What colour is the square?", max_new_tokens=4)
    assert answer == fake.understand(_red_square(), "What colour is the square?", max_new_tokens=4)


def test_cli_reports_bits_and_resumes_after_a_partial_run(ckpt, tmp_path, capsys):
    state = tmp_path / "state"
    cli_main(
        ["quantize", "--ckpt", str(ckpt), "--out", str(tmp_path / "a"), "--state-dir", str(state)]
        + LCQ_QUICK
    )
    first = capsys.readouterr().out
    assert "bits/weight" in first and "0 block(s) resumed" in first
    bits = json.loads((tmp_path / "a" / "quantize.json").read_text())["bits_per_weight"]
    assert f"{bits:.3f} bits/weight" in first
    # as if the first run had stopped after block 0: block 1 is done again
    (state / "block_0001.pt").unlink()
    cli_main(
        ["quantize", "--ckpt", str(ckpt), "--out", str(tmp_path / "b"), "--state-dir", str(state)]
        + LCQ_QUICK
    )
    assert "1 block(s) resumed" in capsys.readouterr().out
    a, b = (
        load_file(tmp_path / "a" / "model.safetensors"),
        load_file(tmp_path / "b" / "model.safetensors"),
    )
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_gptq_writes_fake_quantized_weights(ckpt, tmp_path, capsys):
    out = tmp_path / "gptq"
    cli_main(
        [
            "quantize",
            "--ckpt",
            str(ckpt),
            "--method",
            "gptq",
            "--group-size",
            "32",
            "--out",
            str(out),
        ]
        + QUICK
    )
    assert "fake-quantized" in capsys.readouterr().out
    section = json.loads((out / "config.json").read_text())["quantization"]
    assert section["quant_method"] == "gptq" and section["storage"] == "fake-quantized"
    pipe = Pipeline.from_pretrained(out)
    w = pipe.model.llm.layers[0].mlp.down_proj.weight.detach()  # [32, 64]: groups of 32 inputs
    levels = [len(torch.unique(g)) for g in w.reshape(32, 2, 32).reshape(-1, 32)]
    assert max(levels) <= 4  # every group on its 4-level grid
    assert pipe.understand(_red_square(), "What colour?", max_new_tokens=2) is not None


def test_qat_through_the_trainer_and_its_packed_export(ckpt, quantized, tmp_path):
    from cheers.shapes.dataset import write_shards
    from cheers.train.checkpoint import full_state_from_checkpoint

    _, ptq, _ = quantized
    write_shards(str(tmp_path / "data"), n_samples=16, seed=0, image_size=64, samples_per_shard=16)
    run = tmp_path / "run"
    cli_main(
        [
            "train",
            "--config",
            "configs/debug.yaml",
            f"data.shards=['{tmp_path}/data/*.tar']",
            f"data.text_tokenizer_dir={ckpt}",
            f"train.out_dir={run}",
            "train.steps=3",
            "train.ckpt_every=3",
            "train.log_every=1",
            "data.num_workers=0",
            "train.fsdp=false",
            "train.progress=false",
            "train.lr=5e-2",
            "train.warmup_steps=0",
            "train.schedule=constant",
            f"train.init_from={ckpt}",
            "lcqat.enabled=true",
            f"lcqat.init={ptq}",
            "lcqat.distill_weight=1.0",
            "train.trainable=[llm.layers]",
        ]
    )
    rows = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows]
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] != losses[0] and "kl" in rows[0]

    _, weights = full_state_from_checkpoint(run)
    name = "llm.layers.0.self_attn.q_proj"
    theta = weights[f"{name}.theta"]
    s = (theta.shape[0] + theta.shape[1]) ** 0.5 / 2
    u = s * theta + 1.5
    codes = torch.clamp(torch.round(u), 0, 3)
    start = unpack_codes(load_file(ptq / "model.safetensors")[f"{name}.codes"]).float()
    assert (codes != start).any()  # QAT moved codes, and they stay in 0..3 whatever the latent
    assert set(codes.unique().tolist()) <= {0.0, 1.0, 2.0, 3.0}

    cli_main(["export", str(run), str(tmp_path / "export")])
    shutil.copy(ckpt / "tokenizer.json", tmp_path / "export" / "tokenizer.json")
    exported = load_file(tmp_path / "export" / "model.safetensors")
    assert torch.equal(unpack_codes(exported[f"{name}.codes"]).float(), codes)
    pipe = Pipeline.from_pretrained(tmp_path / "export")
    assert isinstance(pipe.model.llm.layers[0].self_attn.q_proj, PackedLCQLinear)
    assert pipe.generate("a red circle", steps=1, cfg_scale=1.0)[0].size == (64, 64)


def _broken_copy(src, dst, edit) -> None:
    shutil.copytree(src, dst)
    tensors = load_file(dst / "model.safetensors")
    edit(tensors)
    save_file(tensors, dst / "model.safetensors")


def test_bad_packed_checkpoints_name_the_key(quantized, tmp_path):
    _, out, _ = quantized
    key = "llm.layers.1.mlp.up_proj"
    _broken_copy(out, tmp_path / "missing", lambda t: t.pop(f"{key}.SV"))
    with pytest.raises(CheckpointError, match=rf"{key}\.SV is missing"):
        Pipeline.from_pretrained(tmp_path / "missing")

    def wrong_shape(t):
        t[f"{key}.codes"] = t[f"{key}.codes"][:, :-1].contiguous()

    _broken_copy(out, tmp_path / "shape", wrong_shape)
    with pytest.raises(CheckpointError, match=rf"{key}\.codes has shape \(64, 7\)"):
        Pipeline.from_pretrained(tmp_path / "shape")

    shutil.copytree(out, tmp_path / "method")
    cfg = json.loads((tmp_path / "method" / "config.json").read_text())
    cfg["quantization"]["quant_method"] = "awq"
    (tmp_path / "method" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="unknown quantization method 'awq'"):
        Pipeline.from_pretrained(tmp_path / "method")
