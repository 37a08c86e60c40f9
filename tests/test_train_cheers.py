"""The whole path with the real model: shapes shards -> tokenizer -> trainer -> export -> pipeline."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from cheers.cli import main as cli_main
from cheers.collate import Collator, _turns
from cheers.config import flavour
from cheers.errors import InputError
from cheers.pipeline import Pipeline
from cheers.sequence import IGNORE
from cheers.shapes.dataset import write_shards
from cheers.text_tokenizer import train_bpe
from cheers.train.data import RawSample

ROOT = Path(__file__).resolve().parent.parent


def _tokenizer(path):
    corpus = ["a red circle above a blue square", "How many stars are there?", "two green crosses",
              "What colour is the triangle?", "A. red B. blue C. green D. yellow"] * 10
    tok = train_bpe(corpus, vocab_size=300)
    tok.save(path)
    return tok


def test_collate_builds_mixed_batches(tmp_path):
    cfg = flavour("debug")
    tok = _tokenizer(tmp_path)
    img = torch.rand(3, 64, 64)
    samples = [RawSample("a", "t2i", "a red circle", [], img),
               RawSample("b", "i2t", "", [{"from": "human", "value": "<image>\nWhat colour?"},
                                          {"from": "gpt", "value": "red"}], img),
               RawSample("c", "text", "two green crosses", [], None)]
    batch = Collator(cfg, tok, cfg_drop_rate=0.0)(samples)
    assert batch.num_images == 2 and batch.is_gen.tolist() == [True, False]
    assert (batch.image_index >= 0).sum() == 2 * cfg.tokens_per_image
    dropped = Collator(cfg, tok, cfg_drop_rate=1.0)(samples[:1])
    assert (dropped.input_ids == cfg.tokens.no_mean).sum() > 5  # the prompt became the null prompt


def test_collate_keeps_every_turn_of_a_chat(tmp_path):
    """LLaVA-style chats: every (question, answer) pair becomes a turn with a labelled answer."""
    cfg = flavour("debug")
    tok = _tokenizer(tmp_path)
    img = torch.rand(3, 64, 64)
    chat = [{"from": "system", "value": "ignored"},
            {"from": "human", "value": "<image>\nWhat colour?"}, {"from": "gpt", "value": "red"},
            {"role": "user", "content": "What shape?"}, {"role": "assistant", "content": "circle"},
            {"from": "human", "value": "left unanswered"}]
    assert _turns(chat) == [("What colour?", "red"), ("What shape?", "circle")]
    collate = Collator(cfg, tok, cfg_drop_rate=0.0)
    both = collate([RawSample("b", "i2t", "", chat, img)])
    first = collate([RawSample("b", "i2t", "", chat[:3], img)])
    assert both.num_images == first.num_images == 1
    targets = both.targets[both.targets != IGNORE].tolist()
    assert targets[: int((first.targets != IGNORE).sum())] == first.targets[first.targets != IGNORE].tolist()
    assert tok.decode(targets).count("circle") == 1 and tok.decode(targets).count("red") == 1
    with pytest.raises(InputError, match="lack a user/assistant pair"):
        collate([RawSample("c", "i2t", "", [{"from": "gpt", "value": "red"}], img)])


def test_train_export_and_generate(tmp_path):
    shards = write_shards(tmp_path / "data", n_samples=32, seed=0, image_size=64, samples_per_shard=16)
    assert len(shards) == 2
    _tokenizer(tmp_path / "tok")
    run = tmp_path / "run"
    cli_main(["train", "--config", "configs/debug.yaml", f"data.shards=['{tmp_path}/data/*.tar']",
              f"data.text_tokenizer_dir={tmp_path / 'tok'}", f"train.out_dir={run}", "train.steps=3",
              "train.ckpt_every=3", "train.log_every=1", "data.num_workers=0", "train.fsdp=false"])
    cli_main(["export", str(run), str(tmp_path / "export")])  # the run's tokenizer goes with it
    assert (tmp_path / "export" / "tokenizer.json").read_bytes() == (tmp_path / "tok" / "tokenizer.json").read_bytes()
    assert json.loads((tmp_path / "export" / "config.json").read_text())["flavour"] == "debug"
    pipe = Pipeline.from_pretrained(tmp_path / "export")
    images = pipe.generate(["a red circle"], steps=2, cfg_scale=2.0)
    assert images[0].size == (64, 64)


@pytest.mark.slow
def test_two_process_fsdp_with_the_real_model(tmp_path):
    """Ranks see different task mixes; every FSDP unit must still run once per step on each."""
    import subprocess
    import sys

    write_shards(tmp_path / "data", n_samples=48, seed=0, image_size=64, samples_per_shard=16)
    _tokenizer(tmp_path / "tok")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "-m", "cheers.train",
           "--config", "configs/debug.yaml", f"data.shards=['{tmp_path}/data/*.tar']",
           f"data.text_tokenizer_dir={tmp_path / 'tok'}", f"train.out_dir={tmp_path / 'run'}", "train.steps=4",
           "data.num_streams=2", "train.global_batch=4", "train.progress=false", "train.ckpt_every=4"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert (tmp_path / "run" / "step_0000004").is_dir()


def _train_error(argv, caplog) -> str:
    """The one-line error a refused ``cheers train`` logs (exit status 2)."""
    caplog.clear()
    with pytest.raises(SystemExit) as e:
        cli_main(["train", "--config", str(ROOT / "configs" / "debug.yaml"), *argv])
    assert e.value.code == 2
    return caplog.text


def test_debug_recipe_names_the_command_that_makes_its_data(tmp_path, monkeypatch, caplog):
    """``configs/debug.yaml`` reads data/shapes/; without it the error names the command that
    writes it, and that command writes shards and a tokenizer the debug flavour fits."""
    from cheers.shapes.dataset import main as make_data
    from cheers.text_tokenizer import TextTokenizer

    monkeypatch.chdir(tmp_path)
    assert "python -m cheers.shapes.dataset --out DIR" in _train_error([], caplog)
    make_data(["--out", "data/shapes", "--flavour", "debug", "--samples", "24", "--samples-per-shard", "12"])
    assert len(list((tmp_path / "data" / "shapes").glob("shapes-*.tar"))) == 2
    tok = TextTokenizer.from_dir(tmp_path / "data" / "shapes" / "tokenizer")
    assert tok.vocab_size <= flavour("debug").llm.vocab_size
    assert tok.special == flavour("debug").tokens


def test_tokenizer_problems_are_refused_before_training(tmp_path, caplog):
    write_shards(tmp_path / "data", n_samples=8, seed=0, image_size=64, samples_per_shard=8)
    common = [f"data.shards=['{tmp_path}/data/*.tar']", f"train.out_dir={tmp_path / 'run'}", "train.steps=1",
              "data.num_workers=0", "train.fsdp=false"]
    assert "data.text_tokenizer_dir is empty" in _train_error([*common, "data.text_tokenizer_dir=''"], caplog)
    words = [f"{a}{b} {b}{a}{a}" for a in ("red", "blue", "green", "cyan", "grey") for b in range(80)]
    big = train_bpe(words * 3, vocab_size=600)
    limit = flavour("debug").llm.vocab_size
    assert big.vocab_size > limit
    big.save(tmp_path / "big")
    err = _train_error([*common, f"data.text_tokenizer_dir={tmp_path / 'big'}"], caplog)
    assert f"has {big.vocab_size} tokens, more than the model's llm.vocab_size={limit}" in err
    assert not (tmp_path / "run" / "step_0000001").exists()
