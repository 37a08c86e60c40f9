"""LoRA fine-tuning through peft: what trains, what is saved, exact resume, export and --lora.

The base is a random debug-flavour checkpoint whose zero-initialised layers are filled, so that
every output depends on the LLM's adapted projections.
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import pytest
import torch
import webdataset as wds
from PIL import Image

from cheers.checkpoint import save_pretrained
from cheers.debug_checkpoint import make_debug_checkpoint
from cheers.errors import CheckpointError, ConfigError
from cheers.lora import adapted_layers, is_adapter_name
from cheers.pipeline import Pipeline
from cheers.train.checkpoint import export, full_state_from_checkpoint, list_checkpoints
from cheers.train.config import lora_run_config
from cheers.train.parallelize import init_distributed
from cheers.train.trainer import Trainer, finetune_lora, train

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "configs" / "lora-shapes.yaml"
QUESTION, ANSWER = "What is the code word?", "zebra"


def _png(colour: tuple[int, int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), colour).save(buf, format="PNG")
    return buf.getvalue()


def write_code_word_shards(folder: Path, n: int = 16) -> list[str]:
    """i2t samples: an image of some colour, the question ``QUESTION``, the answer ``ANSWER``
    (a word the base model never answers), plus t2i samples of the same images."""
    folder.mkdir(parents=True, exist_ok=True)
    sinks = [wds.TarWriter(str(folder / f"code-{s:03d}.tar")) for s in range(2)]  # two data streams
    for i in range(n):
        colour = (40 + 12 * i, 200 - 9 * i, 30 * i % 256)
        conv = [{"from": "human", "value": f"<image>\n{QUESTION}"}, {"from": "gpt", "value": ANSWER}]
        task = "i2t" if i % 4 else "t2i"
        meta = {"task": task, "text": "a red circle", "width": 64, "height": 64,
                "conversations": conv if task == "i2t" else []}
        sinks[i % 2].write({"__key__": f"s{i:04d}", "json": json.dumps(meta).encode(), "png": _png(colour)})
    for sink in sinks:
        sink.close()
    return [str(folder / "*.tar")]


@pytest.fixture(scope="module")
def base(tmp_path_factory, fill_zero_layers) -> Path:
    folder = tmp_path_factory.mktemp("lora") / "base"
    model, _ = make_debug_checkpoint(folder)
    fill_zero_layers(model)  # the flow head's zero layers would hide the LLM from the images
    save_pretrained(model, folder)
    return folder


@pytest.fixture(scope="module")
def shards(base) -> list[str]:
    return write_code_word_shards(base.parent / "data")


def cfg_for(base: Path, shards: list[str], out: Path, *extra: str, steps: int = 4):
    return lora_run_config(base, shards=shards, out_dir=out, steps=steps, recipe=RECIPE, overrides=[
        "train.global_batch=4", "train.micro_batch=2", "train.lr=1e-2", "train.warmup_steps=1",
        "train.log_every=1", "train.progress=false", "lora.rank=4", "data.shuffle_buffer=8",
        "data.ratios={t2i: 1, i2t: 3, text: 0}", *extra])


def _logits(pipe: Pipeline) -> torch.Tensor:
    ids = torch.tensor([pipe.text_tokenizer.encode("a red circle above a blue square")])
    with torch.no_grad():
        return pipe.model.llm.logits(pipe.model.llm.hidden_states(ids))


def test_only_adapters_and_declared_parts_train(tmp_path, base, shards):
    cfg = cfg_for(base, shards, tmp_path / "run", 'lora.train_fully=["head.gate"]', "train.fsdp=false")
    env = init_distributed("cpu", need_group=False)
    trainer = Trainer(cfg, env)
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    result = trainer.run()
    after = trainer.model.state_dict()
    trained = set(result.trainable)
    assert trained and all(is_adapter_name(n) or n.startswith("head.gate.") for n in trained)
    assert {n.rsplit(".", 3)[0] for n in trained if is_adapter_name(n)} == set(adapted_layers(trainer.model))
    for name, value in before.items():
        if name in trained:
            assert not torch.equal(after[name], value), f"{name} did not train"
        else:  # the base, frozen buffers included, bit for bit
            assert torch.equal(after[name], value), f"{name} changed"
    # the checkpoint holds the trained tensors only, a small fraction of the model
    _, saved = full_state_from_checkpoint(result.checkpoint)
    assert set(saved) == trained
    n_model = sum(v.numel() for k, v in after.items() if not is_adapter_name(k))
    assert sum(v.numel() for v in saved.values()) < 0.05 * n_model
    adapter = export(result.checkpoint, tmp_path / "adapter")
    size = sum(f.stat().st_size for f in adapter.iterdir())
    assert size < 0.05 * (base / "model.safetensors").stat().st_size


def test_merged_equals_unmerged_and_differs_from_the_base(tmp_path, base, shards):
    result = train(cfg_for(base, shards, tmp_path / "run", "train.fsdp=false", steps=2))
    from cheers.cli import main as cli_main

    cli_main(["export", str(result.out_dir), str(tmp_path / "merged"), "--merge"])
    cli_main(["export", str(result.out_dir), str(tmp_path / "adapter")])
    merged = Pipeline.from_pretrained(tmp_path / "merged")
    unmerged = Pipeline.from_pretrained(base, lora=tmp_path / "adapter")
    plain = Pipeline.from_pretrained(base)
    assert not adapted_layers(merged.model) and adapted_layers(unmerged.model)
    a, b, c = _logits(merged), _logits(unmerged), _logits(plain)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)  # fp32 summation order only
    assert (a - c).abs().max() > 1e-3
    kw = {"seeds": [0], "steps": 2, "cfg_scale": 2.0}
    torch.testing.assert_close(merged.generate_latents(["a red circle"], **kw),
                               unmerged.generate_latents(["a red circle"], **kw), rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_lora_learns_a_new_answer(tmp_path, base, shards):
    """The base never answers the code word; after 30 adapter steps it does, on an image the
    fine-tuning never saw (a memorised answer: the quickest task a test can check)."""
    held_out = Image.new("RGB", (64, 64), (250, 250, 0))
    plain = Pipeline.from_pretrained(base)
    assert ANSWER not in plain.understand(held_out, QUESTION, max_new_tokens=6)
    finetune_lora(base, shards, tmp_path / "run", steps=30, recipe=RECIPE, export_to=tmp_path / "adapter",
                  overrides=["train.global_batch=4", "train.micro_batch=4", "train.lr=1e-2",
                             "train.warmup_steps=2", "train.progress=false", "data.shuffle_buffer=8",
                             "data.ratios={t2i: 0, i2t: 1, text: 0}", "lora.rank=8"])
    tuned = Pipeline.from_pretrained(base, lora=tmp_path / "adapter")
    assert ANSWER in tuned.understand(held_out, QUESTION, max_new_tokens=12)


def _metrics(out: Path) -> dict[int, dict]:
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x]
    return {r["step"]: r for r in rows}


@pytest.mark.slow
def test_resume_equals_an_uninterrupted_run(tmp_path, base, shards):
    """Stopped after step 2 (a killed run resumes from its last checkpoint the same way) and
    resumed in a fresh trainer: every logged number and the adapters equal one run's."""
    extra = ("lora.dropout=0.1", "train.ckpt_every=2", "train.fsdp=true")  # dropout: RNG state matters
    train(cfg_for(base, shards, tmp_path / "cut", *extra, "train.stop_after=2", steps=4))
    assert [p.name for p in list_checkpoints(tmp_path / "cut")] == ["step_0000002"]
    train(cfg_for(base, shards, tmp_path / "cut", *extra, steps=4))
    train(cfg_for(base, shards, tmp_path / "ref", *extra, steps=4))
    cut, ref = _metrics(tmp_path / "cut"), _metrics(tmp_path / "ref")
    assert sorted(cut) == sorted(ref) == [1, 2, 3, 4]
    for step in ref:
        for key in ("loss", "ce", "flow", "grad_norm", "lr"):
            assert cut[step][key] == ref[step][key], (step, key)
    a = full_state_from_checkpoint(tmp_path / "cut")[1]
    b = full_state_from_checkpoint(tmp_path / "ref")[1]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_bad_lora_settings_are_refused(tmp_path, base, shards):
    with pytest.raises(ConfigError, match="lora.rank must be >= 1"):
        cfg_for(base, shards, tmp_path / "r", "lora.rank=0")
    with pytest.raises(ConfigError, match="unknown config key lora.ranks"):
        cfg_for(base, shards, tmp_path / "r", "lora.ranks=4")
    with pytest.raises(ConfigError, match="leave train.trainable unset"):
        cfg_for(base, shards, tmp_path / "r", 'train.trainable=["head"]')
    with pytest.raises(ConfigError, match="needs the base model"):
        cfg_for(base, shards, tmp_path / "r", "train.init_from=null")
    with pytest.raises(ConfigError, match="matches no layer"):
        train(cfg_for(base, shards, tmp_path / "r", 'lora.target=["llm.nothing.*"]', "train.fsdp=false"))
    with pytest.raises(CheckpointError, match="not a LoRA adapter folder"):
        Pipeline.from_pretrained(base, lora=base)


@pytest.mark.slow
def test_two_process_fsdp2_lora(tmp_path, base, shards):
    """peft adapters under FSDP2 on 2 ranks whose batches differ in task (frozen flow-head blocks
    run a backward on one rank only): the run finishes and checkpoints the adapters."""
    import subprocess
    import sys

    import yaml

    cfg = cfg_for(base, shards, tmp_path / "run", "train.fsdp=true", "data.num_streams=2", "train.micro_batch=1")
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(cfg.to_dict()))
    torchrun = Path(sys.executable).with_name("torchrun")
    res = subprocess.run([str(torchrun), "--standalone", "--nproc_per_node=2", "-m", "cheers.train",
                          "--config", str(tmp_path / "run.yaml")], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-3000:]
    _, saved = full_state_from_checkpoint(tmp_path / "run")
    assert saved and all(is_adapter_name(k) for k in saved)


def test_adapters_over_packed_2bit_linears(debug_model):
    """LC-QAT's packed 2-bit layers take peft adapters: the adapters get gradients, the codes
    (buffers) stay, and the output moves once the adapters are non-zero."""
    from cheers.lcqat.lcq_linear import LCQConfig, apply_lcqat, set_submodule
    from cheers.lcqat.pack import PackedLCQLinear
    from cheers.lora import add_adapters, peft_config

    model = debug_model
    for name in apply_lcqat(model.llm, LCQConfig()):  # data-free rounding, then packing
        set_submodule(model.llm, name, PackedLCQLinear.from_lcq(model.llm.get_submodule(name)))
    ids = torch.arange(1, 12)[None]
    before = model.llm.hidden_states(ids).detach()
    names = add_adapters(model, peft_config(rank=2, alpha=4, dropout=0.0, target=["llm.layers.*.mlp.*_proj"]))
    layer = model.get_submodule(names[0])
    assert isinstance(layer.base_layer, PackedLCQLinear)
    codes = layer.base_layer.codes.clone()
    for n, p in model.named_parameters():
        p.requires_grad_(is_adapter_name(n))
    torch.testing.assert_close(model.llm.hidden_states(ids), before)  # lora_B starts at zero
    model.llm.hidden_states(ids).pow(2).mean().backward()
    assert layer.lora_B["default"].weight.grad.abs().sum() > 0
    with torch.no_grad():
        layer.lora_B["default"].weight.fill_(0.1)
    assert not torch.allclose(model.llm.hidden_states(ids), before)
    assert torch.equal(layer.base_layer.codes, codes)
