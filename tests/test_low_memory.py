"""Inference in less memory: int8 / fp8 weight-only linears (torchao) and CPU offload (accelerate)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from cheers.checkpoint import save_pretrained
from cheers.cli import main as cli_main
from cheers.debug_checkpoint import make_debug_checkpoint
from cheers.engine import Engine
from cheers.errors import InputError
from cheers.low_memory import linears_to_quantize, offload, quantize_weights, weight_bytes
from cheers.pipeline import Pipeline

NO_GPU = not torch.cuda.is_available()
PROMPT = "a red circle above a blue square"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, fill_zero_layers) -> Path:
    folder = tmp_path_factory.mktemp("lowmem") / "debug"
    model, _ = make_debug_checkpoint(folder)
    fill_zero_layers(model)  # zero-initialised layers would make every velocity 0
    save_pretrained(model, folder)
    return folder


def _logits(pipe: Pipeline) -> torch.Tensor:
    ids = torch.tensor([pipe.text_tokenizer.encode(PROMPT)], device=pipe.engine.device)
    with torch.no_grad():
        return pipe.model.llm.logits(pipe.model.llm.hidden_states(ids)).cpu()


def _latents(pipe: Pipeline) -> torch.Tensor:
    return pipe.generate_latents([PROMPT], seeds=[3], steps=2, cfg_scale=2.0).cpu()


@pytest.fixture(scope="module")
def reference(ckpt) -> tuple[Pipeline, torch.Tensor, torch.Tensor]:
    """The fp32 pipeline, its logits and its latents."""
    pipe = Pipeline.from_pretrained(ckpt)
    return pipe, _logits(pipe), _latents(pipe)


def test_int8_linears_hold_int8_and_stay_close_to_fp32(ckpt, reference):
    ref, a, x = reference
    q = Pipeline.from_pretrained(ckpt, weights="int8")
    names = linears_to_quantize(ref.model)
    assert any(n.startswith("llm.layers.") for n in names) and any(n.startswith("head.") for n in names)
    for name in names:
        w = q.model.get_submodule(name).weight
        assert type(w).__name__ == "Int8Tensor" and w.qdata.dtype == torch.int8, name
        assert w.qdata.shape == ref.model.get_submodule(name).weight.shape
    assert type(q.model.llm.lm_head.weight) is nn.Parameter  # the tied embedding stays as it is
    assert q.model.llm.lm_head.weight is q.model.llm.embed_tokens.weight
    saved = sum(ref.model.get_submodule(n).weight.numel() * 3 for n in names)  # 4 -> 1 byte per weight
    assert weight_bytes(ref.model) - weight_bytes(q.model) > 0.9 * saved
    # bound: per-row int8 rounding (step max|w| / 127) moves the logits by under 2% of their range
    b = _logits(q)
    assert (a - b).abs().max() < 0.02 * a.abs().max()
    y = _latents(q)
    assert (x - y).norm() / x.norm() < 0.02
    assert not torch.equal(x, y)  # the weights did change


def test_int8_runs_every_command_on_the_cpu(ckpt, tmp_path, capsys):
    from PIL import Image

    img = tmp_path / "in.png"
    Image.new("RGB", (64, 64), (200, 30, 30)).save(img)
    cli_main(["generate", "--ckpt", str(ckpt), "--weights", "int8", "--prompt", PROMPT, "--steps", "1",
              "--out", str(tmp_path / "one.png")])
    assert (tmp_path / "one.png").is_file()
    capsys.readouterr()
    cli_main(["understand", "--ckpt", str(ckpt), "--weights", "int8", "--image", str(img),
              "--question", "What colour is it?", "--max-new-tokens", "3"])
    out = capsys.readouterr()
    assert out.out.endswith("\n") and "error" not in out.err


@pytest.mark.skipif(not NO_GPU, reason="checks the refusal on a machine without a GPU")
@pytest.mark.parametrize("command", [
    ["generate", "--prompt", "x"], ["understand", "--image", "IMG", "--question", "x"], ["chat"], ["serve"],
    ["eval", "geneval", "generate", "--metadata", "META", "--out", "OUT"]])
@pytest.mark.parametrize("flag", [["--offload", "model"], ["--offload", "sequential"], ["--weights", "fp8"]])
def test_gpu_only_flags_are_refused_without_a_gpu(ckpt, tmp_path, capsys, command, flag):
    from PIL import Image

    Image.new("RGB", (64, 64)).save(tmp_path / "in.png")
    meta = '{"tag": "single_object", "include": [{"class": "circle", "count": 1}], "prompt": "a photo of a circle"}'
    (tmp_path / "meta.jsonl").write_text(meta + "\n")
    paths = {"IMG": tmp_path / "in.png", "OUT": tmp_path / "out", "META": tmp_path / "meta.jsonl"}
    argv = [str(paths.get(a, a)) for a in command]
    with pytest.raises(SystemExit) as exit_info:
        cli_main([*argv, "--ckpt", str(ckpt), *flag])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"{flag[0]} {flag[1]}" in err and "GPU" in err and len(err.strip().splitlines()) == 1


def test_weights_and_offload_refuse_bad_values(ckpt):
    with pytest.raises(InputError, match="--weights 'int4'"):
        Pipeline.from_pretrained(ckpt, weights="int4")
    with pytest.raises(InputError, match="--offload 'disk'"):
        Pipeline.from_pretrained(ckpt, offload="disk")
    with pytest.raises(SystemExit):
        cli_main(["generate", "--ckpt", str(ckpt), "--prompt", "x", "--weights", "int4"])


@pytest.mark.parametrize("mode", ["model", "sequential"])
def test_offload_hooks_move_every_tensor_a_module_reads(ckpt, reference, mode):
    """The hooks' grouping, checked on the CPU: inactive groups are left empty (``hollow``), so a
    tensor read outside its group's hooks fails; outputs equal the plain model's exactly."""
    _, logits, latents = reference
    pipe = Pipeline.from_pretrained(ckpt)
    offload(pipe.model, mode, "cpu", hollow=True)
    pipe.engine = Engine(pipe.model, static=False)
    assert torch.equal(_logits(pipe), logits)
    assert torch.equal(_latents(pipe), latents)
    empty = sum(p.numel() == 0 for p in pipe.model.parameters())
    assert empty > 0  # the groups not in use hold no data


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["model", "sequential"])
def test_offload_on_a_gpu_matches_the_model_on_the_gpu(ckpt, mode):
    ref = Pipeline.from_pretrained(ckpt, device="cuda")
    pipe = Pipeline.from_pretrained(ckpt, device="cuda", offload=mode)
    assert next(pipe.model.llm.layers[0].parameters()).device.type == "cpu"
    torch.testing.assert_close(_logits(pipe), _logits(ref), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(_latents(pipe), _latents(ref), rtol=1e-3, atol=1e-3)


@pytest.mark.gpu
def test_fp8_weights_on_a_gpu(ckpt):
    if torch.cuda.get_device_capability() < (8, 9):
        with pytest.raises(InputError, match="compute capability 8.9"):
            Pipeline.from_pretrained(ckpt, device="cuda", weights="fp8")
        return
    ref = Pipeline.from_pretrained(ckpt, device="cuda")
    q = Pipeline.from_pretrained(ckpt, device="cuda", weights="fp8")
    a, b = _logits(ref), _logits(q)
    assert (a - b).abs().max() < 0.1 * a.abs().max()  # e4m3: 3 mantissa bits


def test_int8_under_lora_adapters_keeps_the_adapters_in_full_precision(ckpt):
    from peft.tuners.lora import LoraLayer

    from cheers.lora import add_adapters, peft_config

    pipe = Pipeline.from_pretrained(ckpt)
    add_adapters(pipe.model, peft_config(rank=2, alpha=4, dropout=0.0, target=["llm.layers.*.mlp.*_proj"]))
    names = quantize_weights(pipe.model, "int8")
    layer = pipe.model.llm.layers[0].mlp.up_proj
    assert isinstance(layer, LoraLayer) and "llm.layers.0.mlp.up_proj.base_layer" in names
    assert type(layer.base_layer.weight).__name__ == "Int8Tensor"
    assert layer.lora_A["default"].weight.dtype == torch.float32
    assert torch.isfinite(_logits(pipe)).all()
