"""The JSONL data format: `cheers data pack` / `check`, and the trainer reading JSONL directly."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from PIL import Image

from cheers.cli import main as cli_main
from cheers.collate import Collator
from cheers.config import flavour
from cheers.data_format import BadSample, LengthMeter, pack, parse_line, scan_jsonl, scan_shards
from cheers.errors import ConfigError
from cheers.text_tokenizer import train_bpe
from cheers.train.config import DataConfig, load_run_config
from cheers.train.data import SampleLoader, load_image

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220), "grey": (128, 128, 128)}


def _image(path: Path, colour: str, size=(80, 64), mode="RGB") -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.new("RGB", size, COLOURS[colour])
    im.paste((255, 255, 255), (5, 5, 20, 20))  # not flat: a resize that moved pixels would show
    (im.convert(mode) if mode != "RGB" else im).save(path)
    return str(path.relative_to(path.parent.parent))


def _write_jsonl(path: Path, lines: list) -> Path:
    path.write_text("".join((ln if isinstance(ln, str) else json.dumps(ln)) + "\n" for ln in lines))
    return path


@pytest.fixture
def good(tmp_path):
    """A JSONL with every kind of sample: t2i, i2t caption, VQA, a chat about three images
    (one a GIF, packed as PNG) in LLaVA style, a chat in role/content style with a system
    turn, plain text; and a tokenizer for the debug flavour."""
    img = tmp_path / "img"
    lines = [
        {"task": "t2i", "image": _image(img / "red.png", "red"), "text": "a red square"},
        {"task": "i2t", "image": _image(img / "green.jpg", "green"), "text": "a green square"},
        {"task": "i2t", "image": "img/red.png", "question": "What colour?", "answer": "red", "id": "vqa-1"},
        {"task": "i2t", "images": ["img/red.png", "img/green.jpg", _image(img / "blue.gif", "blue", mode="P")],
         "conversations": [{"from": "human", "value": "<image>\n<image>\n<image>\nWhich is blue?"},
                           {"from": "gpt", "value": "the third"},
                           {"from": "human", "value": "And red?"}, {"from": "gpt", "value": "the first"}],
         "meta": {"source": "hand-made"}},
        {"task": "i2t", "image": _image(img / "grey.webp", "grey"),
         "conversations": [{"role": "system", "content": "Be brief."},
                           {"role": "user", "content": "Colour?"}, {"role": "assistant", "content": "grey"}]},
        {"task": "text", "text": "two green crosses"},
        {"task": "t2i", "image": "img/green.jpg", "text": "a green square"},
    ]
    path = _write_jsonl(tmp_path / "data.jsonl", lines)
    corpus = ["a red square", "What colour?", "two green crosses", "Which is blue?", "Describe the image."] * 5
    train_bpe(corpus, vocab_size=300).save(tmp_path / "tok")
    return path, lines


def _loader(cfg: DataConfig, task: str, **kw) -> SampleLoader:
    """A loader that reads one task's samples in file order."""
    cfg.ratios = {t: float(t == task) for t in ("t2i", "i2t", "text")}
    cfg.shuffle_buffer, cfg.shuffle_shards, cfg.num_workers = 1, False, 0
    return SampleLoader(cfg, image_size=32, **kw)


def _expected(jsonl: Path, line: dict) -> list[torch.Tensor]:
    paths = [line["image"]] if "image" in line else line.get("images", [])
    return [load_image((jsonl.parent / p).read_bytes(), 32) for p in paths]


def _same_samples(got, jsonl: Path, lines: list[dict], numbers: list[int]) -> None:
    """``got`` (RawSamples) are lines ``numbers`` (1-based) of the JSONL, images included."""
    assert len(got) == len(numbers)
    for s, n in zip(got, numbers):
        line = lines[n - 1]
        assert s.key == line.get("id", f"{n:08d}") and s.task == line["task"]
        assert s.text == line.get("text", "")
        images = _expected(jsonl, line)
        assert len(s.images) == len(images)
        for a, b in zip(s.images, images):
            assert torch.equal(a, b)
        if "conversations" in line and line["conversations"][0].get("from") == "human":
            assert s.conversations == line["conversations"]  # written in the stored style: kept as is
        if "question" in line:
            assert [t["value"] for t in s.conversations] == ["<image>\n" + line["question"], line["answer"]]


def test_pack_then_check_round_trips_every_task(good, tmp_path, capsys):
    jsonl, lines = good
    out = tmp_path / "shards"
    cli_main(["data", "pack", "--jsonl", str(jsonl), "--out", str(out), "--shard-size", "3",
              "--workers", "2", "--flavour", "debug", "--tokenizer", str(tmp_path / "tok")])
    printed = capsys.readouterr().out
    assert "7 read, 7 usable, 0 skipped" in printed and "system_turn" in printed
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["tasks"] == {"t2i": 2, "i2t": 4, "text": 1}
    assert [s["samples"] for s in manifest["shards"]] == [3, 3, 1]
    assert manifest["tokens"]["all"]["max"] < flavour("debug").max_seq_len
    cli_main(["data", "check", str(out), "--flavour", "debug", "--tokenizer", str(tmp_path / "tok")])  # status 0
    assert "7 read, 7 usable, 0 skipped" in capsys.readouterr().out
    # the trainer's loader reads back the same samples, in line order, task by task
    by_task = {t: [i + 1 for i, ln in enumerate(lines) if ln["task"] == t] for t in ("t2i", "i2t", "text")}
    for task, numbers in by_task.items():
        loader = _loader(DataConfig(shards=[manifest["pattern"]]), task)
        _same_samples(loader.next_batch(len(numbers)), jsonl, lines, numbers)
        loader.close()
        direct = _loader(DataConfig(jsonl=[str(jsonl)]), task)  # and the JSONL read directly, the same
        _same_samples(direct.next_batch(len(numbers)), jsonl, lines, numbers)
        direct.close()
    # the GIF was packed as PNG: a member every WebDataset reader knows
    scan = scan_shards(out)
    assert scan.counts() == manifest["tasks"] and not scan.problems


def test_bad_lines_are_reported_by_line_and_the_rest_packed(good, tmp_path, capsys):
    jsonl, lines = good
    (tmp_path / "img" / "corrupt.png").write_bytes((tmp_path / "img" / "red.png").read_bytes()[:60])
    _image(tmp_path / "img" / "tiny.png", "red", size=(12, 40))
    bad = [
        {"task": "t2i", "image": "img/nowhere.png", "text": "a red square"},     # line 8: missing image
        {"task": "t2i", "image": "img/corrupt.png", "text": "a red square"},     # 9: truncated PNG
        {"task": "t2i", "image": "img/red.png", "caption": "a red square"},      # 10: unknown key
        {"task": "t2i", "image": "img/red.png", "text": "red square " * 400},    # 11: image past max_seq_len
        {"task": "i2t", "image": "img/tiny.png", "text": "tiny"},                # 12: too small
        '{"task": "text", "text": ',                                            # 13: not JSON
        {"task": "i2t", "image": "img/red.png", "question": "Colour?", "answer": "red", "id": "vqa-1"},  # 14
        {"task": "text", "text": "green " * 600},                               # 15: cut, but kept
    ]
    _write_jsonl(jsonl, lines + bad)
    tok = tmp_path / "tok"
    out = tmp_path / "shards"
    cli_main(["data", "pack", "--jsonl", str(jsonl), "--out", str(out), "--flavour", "debug", "--tokenizer", str(tok)])
    printed = capsys.readouterr().out
    for where, reason, words in [(8, "missing_image", "img/nowhere.png does not exist"),
                                 (9, "bad_image", "img/corrupt.png does not decode"),
                                 (10, "bad_field", "unknown key 'caption'"),
                                 (11, "too_long", "with an image past max_seq_len=512"),
                                 (12, "small_image", "12x40 px"),
                                 (13, "bad_json", "not JSON"),
                                 (14, "duplicate_id", "'vqa-1' is also line 3's"),
                                 (15, "truncated", "training cuts the text at 512")]:
        assert f"data.jsonl:{where}: {reason}: " in printed and words in printed, (where, printed)
    manifest = json.loads((out / "manifest.json").read_text())
    assert [s["where"] for s in manifest["skipped"]] == [f"data.jsonl:{n}" for n in range(8, 15)]
    assert manifest["samples"] == len(lines) + 1  # every good line, and the cut text
    # what was packed is exactly the good lines, whole
    keys = [key for rec in scan_shards(out).samples for key in [rec.key]]
    assert keys == [f"{n:08d}" if n != 3 else "vqa-1" for n in [*range(1, 8), 15]]
    # check on the JSONL names the same lines and fails; on the shards it passes
    with pytest.raises(SystemExit) as e:
        cli_main(["data", "check", str(jsonl), "--flavour", "debug", "--tokenizer", str(tok)])
    assert e.value.code == 1
    assert "data.jsonl:9: bad_image" in capsys.readouterr().out


@pytest.mark.parametrize("line, reason, words", [
    ({"task": "t2i", "images": ["a.png", "b.png"], "text": "x"}, "bad_field", "exactly one image, got 2"),
    ({"task": "t2i", "image": "a.png"}, "bad_field", "needs a non-empty text"),
    ({"task": "i2t", "text": "a caption"}, "bad_field", "needs an image"),
    ({"task": "text", "text": "x", "image": "a.png"}, "bad_field", "takes no image"),
    ({"task": "t2v", "text": "x"}, "bad_field", "task 't2v' is not one of"),
    ({"text": "x"}, "bad_field", "no task"),
    ({"task": "i2t", "image": "a.png", "images": ["a.png"], "text": "x"}, "bad_field", "both image and images"),
    ({"task": "i2t", "image": "a.png", "question": "q?"}, "bad_field", "answer is missing"),
    ({"task": "t2i", "image": "a.png", "text": "x", "answer": "y"}, "bad_field", "answer belongs to i2t"),
    ({"task": "i2t", "image": "a.png", "conversations": [{"role": "assistant", "content": "hi"}]},
     "bad_field", "where a user turn belongs"),
    ({"task": "i2t", "image": "a.png", "conversations": [{"role": "user", "content": "q"}]},
     "bad_field", "does not end with an assistant turn"),
    ({"task": "i2t", "image": "a.png", "conversations": [
        {"role": "user", "content": "q"}, {"role": "assistant", "content": "a"},
        {"role": "user", "content": "<image> q2"}, {"role": "assistant", "content": "a2"}]},
     "bad_field", "outside the first user turn"),
    ({"task": "i2t", "images": ["a.png", "b.png"], "conversations": [
        {"from": "human", "value": "<image> q"}, {"from": "gpt", "value": "a"}]}, "bad_field", "1 <image> marks for 2"),
    ({"task": "i2t", "image": "a.png", "conversations": [{"role": "user", "content": [{"type": "text"}]},
                                                         {"role": "assistant", "content": "a"}]},
     "bad_field", "content is list, not a string"),
    ({"task": "i2t", "image": "a.png", "conversations": [{"role": "user", "text": "q"}]},
     "bad_field", "expected role + content or from + value"),
    ({"task": "text", "text": "x", "id": "a/b"}, "bad_field", "id 'a/b' is not"),
    ({"task": "text", "text": "x", "meta": [1]}, "bad_field", "meta is list"),
    ("[1, 2]", "bad_json", "a list, not an object"),
])
def test_each_schema_error_is_named(line, reason, words, tmp_path):
    with pytest.raises(BadSample) as e:
        parse_line(line if isinstance(line, str) else json.dumps(line), 4, tmp_path, "d.jsonl:4")
    assert e.value.reason == reason and words in e.value.detail, e.value.detail


def test_captions_and_chats_collate_as_the_model_lays_them_out(good, tmp_path):
    """A bare caption answers the caption prompt; a chat about three images puts three image
    blocks in one sequence; token counts from ``LengthMeter`` are the collate's."""
    jsonl, lines = good
    cfg = flavour("debug")
    from cheers.text_tokenizer import TextTokenizer

    tok = TextTokenizer.from_dir(tmp_path / "tok")
    scan = scan_jsonl(jsonl, meter=LengthMeter(cfg, tok))
    loader = _loader(DataConfig(jsonl=[str(jsonl)]), "i2t")
    samples = loader.next_batch(4)
    loader.close()
    assert samples[0].conversations == [{"from": "human", "value": "<image>\nDescribe the image."},
                                        {"from": "gpt", "value": "a green square"}]
    collate = Collator(cfg, tok, cfg_drop_rate=0.0)
    batch = collate(samples[2:3])
    assert batch.num_images == 3 and (batch.image_index >= 0).sum() == 3 * cfg.tokens_per_image
    assert scan.lengths["i2t"] == [len(collate.sequence(s)) for s in samples]


def test_jsonl_stream_resumes_exactly(good):
    jsonl, _ = good
    cfg = DataConfig(jsonl=[str(jsonl)], ratios={"t2i": 1, "i2t": 1, "text": 1}, shuffle_buffer=4, num_workers=0)
    a = SampleLoader(cfg, image_size=32, seed=3)
    a.next_batch(5)
    state = a.state_dict()
    want = [s.key for s in a.next_batch(9)]
    b = SampleLoader(cfg, image_size=32, seed=3)
    b.load_state_dict(state)
    assert [s.key for s in b.next_batch(9)] == want
    a.close()
    b.close()


def test_train_a_few_steps_on_jsonl_directly(good, tmp_path, caplog):
    jsonl, lines = good
    _write_jsonl(jsonl, [*lines, {"task": "t2i", "image": "img/gone.png", "text": "x"}])
    run = tmp_path / "run"
    with caplog.at_level(logging.WARNING, logger="cheers.train.data"):
        cli_main(["train", "--config", "configs/debug.yaml", "data.shards=[]", f"data.jsonl=['{jsonl}']",
                  f"data.text_tokenizer_dir={tmp_path / 'tok'}", f"train.out_dir={run}", "train.steps=2",
                  "train.ckpt_every=2", "train.log_every=1", "data.num_workers=0", "train.fsdp=false",
                  "train.progress=false"])
    assert "data.jsonl:8: missing_image: image img/gone.png does not exist" in caplog.text
    assert (run / "step_0000002").is_dir()
    metrics = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
    losses = [m["loss"] for m in metrics if "loss" in m]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(v)) for v in losses)
    assert json.loads((run / "config.json").read_text())["data"]["jsonl"] == [str(jsonl)]


def test_bad_arguments_and_configs_are_refused(good, tmp_path, capsys):
    jsonl, _ = good
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "old.tar").write_bytes(b"")
    for argv, words in [(["pack", "--jsonl", str(jsonl), "--out", str(tmp_path / "full")], "not empty"),
                        (["pack", "--jsonl", str(tmp_path / "none.jsonl"), "--out", str(tmp_path / "o")], "no such file"),
                        (["check", str(jsonl), "--tokenizer", str(tmp_path / "tok")], "add --flavour or --config"),
                        (["check", str(jsonl), "--flavour", "debug"], "add --tokenizer"),
                        (["pack", "--jsonl", str(jsonl), "--out", str(tmp_path / "o"), "--shard-size", "0"], "must be >= 1")]:
        with pytest.raises(SystemExit) as e:
            cli_main(["data", *argv])
        assert e.value.code == 2 and words in capsys.readouterr().err, argv
    assert not (tmp_path / "o").exists()  # nothing written before the arguments were checked
    nothing = _write_jsonl(tmp_path / "bad.jsonl", [{"task": "t2i", "text": "x", "image": "none.png"}])
    with pytest.raises(Exception, match="no usable line of 1; nothing written"):
        pack(nothing, tmp_path / "empty")
    assert not (tmp_path / "empty").exists()
    with pytest.raises(ConfigError, match="unknown config key data.jsonll"):
        load_run_config(None, ["data.jsonll=['x.jsonl']"])
    with pytest.raises(ConfigError, match="data.jsonl"):
        load_run_config(None, ["data.jsonl=x.jsonl"])


def test_check_names_bad_records_of_any_shard(tmp_path, capsys):
    """Shards not written by `pack` are checked record by record too: each problem names the
    shard and key; a manifest whose counts differ from the shards is noted."""
    import webdataset as wds

    png = tmp_path / "x.png"
    _image(png, "red")
    good = {"task": "i2t", "text": "", "conversations": [{"from": "human", "value": "<image>\nq"},
                                                         {"from": "gpt", "value": "a"}]}
    records = [("k0", good, {"png": png.read_bytes()}),
               ("k1", {"task": "i2t", "text": "a caption only"}, {"png": png.read_bytes()}),
               ("k2", {"task": "t2i", "text": "a red square"}, {}),
               ("k3", {**good, "images": ["0.png", "1.png"]}, {"0.png": png.read_bytes()}),
               ("k4", {"task": "t2i", "text": "x"}, {"jpg": b"not a jpeg"})]
    with wds.TarWriter(str(tmp_path / "s-000.tar"), encoder=False) as sink:
        for key, meta, images in records:
            sink.write({"__key__": key, "json": json.dumps(meta).encode(), **images})
        sink.write({"__key__": "k5", "json": b'{"task": '})
    (tmp_path / "manifest.json").write_text(json.dumps({"shards": ["s-000.tar"], "tasks": {"i2t": 3}}))
    scan = scan_shards(tmp_path)
    assert scan.counts() == {"t2i": 0, "i2t": 1, "text": 0}
    assert [(i.where, i.reason) for i in scan.problems] == [
        ("s-000.tar:k1", "bad_field"), ("s-000.tar:k2", "missing_image"), ("s-000.tar:k3", "missing_image"),
        ("s-000.tar:k4", "bad_image"), ("s-000.tar:k5", "bad_json")]
    assert "the manifest counts 3 i2t samples; the shards hold 1 usable" in scan.report()
    with pytest.raises(SystemExit) as e:  # a single .tar is checked the same way
        cli_main(["data", "check", str(tmp_path / "s-000.tar")])
    assert e.value.code == 1 and "s-000.tar:k3: missing_image: no '1.png' member" in capsys.readouterr().out
