"""The ``cheers`` command line: --out handling, argument checks before any model work, help."""

from __future__ import annotations

import argparse
import json
import shutil

import numpy as np
import pytest
from PIL import Image

from cheers.cli import build_parser
from cheers.cli import main as cli_main
from cheers.debug_checkpoint import make_debug_checkpoint
from cheers.engine import Engine


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("debug")
    make_debug_checkpoint(path)
    return path


@pytest.fixture
def source(tmp_path):
    """A readable 64 px PNG to edit or ask about."""
    path = tmp_path / "src" / "scene.png"
    path.parent.mkdir()
    Image.fromarray(np.full((64, 64, 3), 128, dtype=np.uint8)).save(path)
    return path


def _refused(argv, capsys) -> str:
    """Run the CLI, expect exit status 2 with one line on stderr; return that line."""
    with pytest.raises(SystemExit) as e:
        cli_main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err


@pytest.fixture
def no_sampling(monkeypatch):
    """Fail the test if any image sampling starts (a bad argument must be refused before it)."""
    calls = []
    monkeypatch.setattr(Engine, "sample_images", lambda self, *a, **k: calls.append(1) or pytest.fail("sampled"))
    monkeypatch.setattr(Engine, "decode_text", lambda self, *a, **k: calls.append(1) or pytest.fail("decoded"))
    return calls


# --------------------------------------------------------------------------- --out


def test_generate_out_folder_gets_one_png_per_image(ckpt, tmp_path):
    out = tmp_path / "imgs"
    cli_main(["generate", "--ckpt", str(ckpt), "--prompt", "a red circle", "--prompt", "a blue square",
              "--n", "2", "--steps", "2", "--out", str(out)])
    assert sorted(p.name for p in out.glob("*.png")) == [f"{i:05d}.png" for i in range(4)]
    meta = json.loads((out / "00002.json").read_text())
    assert meta["prompt"] == "a blue square" and meta["steps"] == 2
    assert '"prompt": "a red circle"' in Image.open(out / "00000.png").text["cheers"]


def test_generate_out_png_is_the_single_image(ckpt, tmp_path):
    out = tmp_path / "deep" / "one.png"
    cli_main(["generate", "--ckpt", str(ckpt), "--prompt", "a red circle", "--steps", "2", "--out", str(out)])
    assert Image.open(out).size == (64, 64) and (tmp_path / "deep" / "one.json").is_file()
    assert list((tmp_path / "deep").glob("*.png")) == [out]


def test_generate_takes_unset_settings_from_the_checkpoint(ckpt, tmp_path):
    """No --cfg / --shift / --steps: the checkpoint's transport settings, not the released model's."""
    own = tmp_path / "ckpt"
    shutil.copytree(ckpt, own)
    config = json.loads((own / "config.json").read_text())
    config["transport"].update(cfg_scale=2.5, sample_shift=0.8, sample_steps=2)
    (own / "config.json").write_text(json.dumps(config))
    cli_main(["generate", "--ckpt", str(own), "--prompt", "a red circle", "--out", str(tmp_path / "out")])
    meta = json.loads((tmp_path / "out" / "00000.json").read_text())
    assert (meta["cfg"], meta["shift"], meta["steps"]) == (2.5, 0.8, 2)
    cli_main(["generate", "--ckpt", str(own), "--prompt", "a red circle", "--cfg", "4", "--out", str(tmp_path / "o2")])
    assert json.loads((tmp_path / "o2" / "00000.json").read_text())["cfg"] == 4.0


def test_edit_out_folder_gets_the_source_name(ckpt, source, tmp_path):
    out = tmp_path / "edits"
    cli_main(["edit", "--ckpt", str(ckpt), "--image", str(source), "--prompt", "a red circle", "--steps", "2",
              "--out", str(out)])
    assert Image.open(out / "scene.png").size == (64, 64)
    assert json.loads((out / "scene.json").read_text())["source"] == str(source)
    single = tmp_path / "single.png"
    cli_main(["edit", "--ckpt", str(ckpt), "--image", str(source), "--prompt", "a red circle", "--steps", "2",
              "--out", str(single)])
    assert single.is_file()


@pytest.mark.parametrize("cmd", ["generate", "edit"])
@pytest.mark.parametrize("bad, message", [
    ("{file}", "is a file, not a folder"),
    ("pic.jpg", "written as PNG"),
    ("{folder_png}", "is a folder"),
])
def test_a_bad_out_is_refused_before_sampling(ckpt, source, tmp_path, capsys, no_sampling, cmd, bad, message):
    (tmp_path / "file").write_text("x")
    (tmp_path / "dir.png").mkdir()
    out = bad.format(file=tmp_path / "file", folder_png=tmp_path / "dir.png")
    out = out if out.startswith("/") else str(tmp_path / out)
    args = ["--prompt", "a red circle"] + (["--image", str(source)] if cmd == "edit" else [])
    err = _refused([cmd, "--ckpt", str(ckpt), *args, "--out", out], capsys)
    assert message in err and not no_sampling


def test_a_png_out_for_several_images_is_refused(ckpt, tmp_path, capsys, no_sampling):
    err = _refused(["generate", "--ckpt", str(ckpt), "--prompt", "a", "--n", "2", "--out",
                    str(tmp_path / "x.png")], capsys)
    assert "2 images would be written" in err
    assert not (tmp_path / "x.png").exists()


def test_edit_never_overwrites_its_source(ckpt, source, capsys, no_sampling):
    err = _refused(["edit", "--ckpt", str(ckpt), "--image", str(source), "--prompt", "a red circle",
                    "--out", str(source.parent)], capsys)
    assert "would overwrite the input image" in err


@pytest.mark.parametrize("argv", [["demo"], ["init", "--llm", "a", "--siglip", "b", "--vae", "c"]])
def test_folder_commands_refuse_a_file_as_out(tmp_path, capsys, argv):
    (tmp_path / "file").write_text("x")
    err = _refused([*argv, "--out", str(tmp_path / "file")], capsys)
    assert "is a file, not a folder" in err


# --------------------------------------------------------------------------- bad values


@pytest.mark.parametrize("argv, message", [
    (["generate", "--prompt", "x", "--n", "-1"], "argument --n: -1 must be >= 1"),
    (["generate", "--prompt", "x", "--n", "0"], "argument --n: 0 must be >= 1"),
    (["generate", "--prompt", "x", "--cfg", "nan"], "argument --cfg: nan is not a finite number"),
    (["generate", "--prompt", "x", "--cfg", "-2"], "argument --cfg: -2: must be >= 0"),
    (["generate", "--prompt", "x", "--shift", "0"], "argument --shift: 0: must be > 0"),
    (["generate", "--prompt", "x", "--steps", "0"], "argument --steps: 0 must be >= 1"),
    (["generate", "--prompt", "x", "--batch-size", "0"], "argument --batch-size: 0 must be >= 1"),
    (["generate", "--prompt", "  "], "argument --prompt: must not be empty"),
    (["generate", "--prompt", "x", "--size", "72"], "--size 72"),
    (["edit", "--image", "{image}", "--prompt", "x", "--strength", "0"], "argument --strength: 0: must lie in (0, 1]"),
    (["edit", "--image", "{image}", "--prompt", "x", "--strength", "inf"], "not a finite number"),
    (["chat", "--image", "{text}"], "not a readable image"),
    (["understand", "--image", "{text}", "--question", "q"], "not a readable image"),
    (["understand", "--image", "{truncated}", "--question", "q"], "not a readable image"),
    (["understand", "--image", "{missing}", "--question", "q"], "no such image file"),
    (["understand", "--image", "{image}", "--question", "q", "--top-p", "0"], "argument --top-p: 0: must lie in (0, 1]"),
    (["understand", "--image", "{image}", "--question", "q", "--temperature", "-1"], "argument --temperature"),
    (["understand", "--image", "{image}", "--question", "q", "--max-new-tokens", "0"], "--max-new-tokens: 0"),
])
def test_bad_values_exit_2_with_one_line(ckpt, source, tmp_path, capsys, no_sampling, argv, message):
    (tmp_path / "notanimage.txt").write_text("plain text")
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    paths = {"image": source, "text": tmp_path / "notanimage.txt", "truncated": tmp_path / "bad.png",
             "missing": tmp_path / "none.png"}
    argv = [a.format(**paths) for a in argv]
    out = ["--out", str(tmp_path / "o")] if argv[0] in ("generate", "edit") else []
    err = _refused([argv[0], "--ckpt", str(ckpt), *argv[1:], *out], capsys)
    assert err.startswith(f"cheers {argv[0]}: error: ") and message in err, err
    assert not no_sampling


@pytest.mark.parametrize("cmd", ["generate", "edit", "understand"])
def test_a_prompt_over_the_models_length_is_refused_before_sampling(ckpt, source, tmp_path, capsys, no_sampling,
                                                                    cmd):
    long = "word " * 600  # the debug model takes 512 tokens
    args = {"generate": ["--prompt", long, "--out", str(tmp_path / "o")],
            "edit": ["--image", str(source), "--prompt", long, "--out", str(tmp_path / "o")],
            "understand": ["--image", str(source), "--question", long]}[cmd]
    err = _refused([cmd, "--ckpt", str(ckpt), *args], capsys)
    assert "too long" in err and ("maximum of 512" in err or "maximum is 512" in err), err
    assert not no_sampling


def test_demo_refuses_bad_values_before_any_work(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("CHEERS_HOME", str(tmp_path / "home"))  # the shipped model unpacks there
    for argv, message in [(["--steps", "-1"], "argument --steps: -1 must be >= 1"),
                          (["--curriculum", "1"], "must lie in [0, 1)"),
                          (["--samples", "0"], "--samples: 0 must be >= 1"),
                          (["--finetune-samples", "0"], "--finetune-samples: 0 must be >= 1"),
                          (["--object-size", "huge"], "invalid choice: 'huge'"),
                          (["--from-scratch", "model.flavour=shape"], "unknown flavour 'shape'"),
                          (["lora.rank=0"], "lora.rank must be >= 1")]:
        out = tmp_path / "demo"
        err = _refused(["demo", "--out", str(out), *argv], capsys)
        assert message in err, err
        assert not out.exists()


def test_info_refuses_an_unknown_flavour(capsys):
    assert "invalid choice: 'shape'" in _refused(["info", "--flavour", "shape"], capsys)


def test_eval_refuses_a_bad_value_before_loading_the_model(ckpt, tmp_path, capsys, no_sampling):
    (tmp_path / "meta.jsonl").write_text('{"prompt": "a photo of a red circle", "tag": "single_object"}\n')
    err = _refused(["eval", "geneval", "generate", "--metadata", str(tmp_path / "meta.jsonl"),
                    "--out", str(tmp_path / "o"), "--ckpt", str(ckpt), "--n", "0"], capsys)
    assert err.startswith("cheers eval geneval generate: error: argument --n: 0 must be >= 1"), err
    assert not (tmp_path / "o").exists()


def test_quantize_refuses_a_bad_value_before_loading_the_model(ckpt, tmp_path, capsys, monkeypatch):
    import cheers.quantize

    monkeypatch.setattr(cheers.quantize, "quantize_checkpoint", lambda *a, **k: pytest.fail("quantized"))
    err = _refused(["quantize", "--ckpt", str(ckpt), "--method", "rtn", "--sweeps", "2",
                    "--out", str(tmp_path / "q")], capsys)
    assert err == "cheers quantize: error: --sweeps applies to --method lcqat only\n", err
    err = _refused(["quantize", "--ckpt", str(ckpt), "--group-size", "0"], capsys)
    assert "argument --group-size: 0 must be >= 1" in err, err


def test_train_refuses_a_bad_override_before_any_work(tmp_path, capsys, monkeypatch):
    import cheers.train.trainer

    monkeypatch.setattr(cheers.train.trainer, "train", lambda *a, **k: pytest.fail("trained"))
    err = _refused(["train", "--config", "configs/debug.yaml", "train.lr=fast",
                    f"train.out_dir={tmp_path / 'run'}"], capsys)
    assert err.startswith("cheers train: error: train.lr: expected a number, got 'fast'"), err
    assert not (tmp_path / "run").exists()


# --------------------------------------------------------------------------- help


def test_help_gives_every_command_a_plain_one_line_description():
    ap = build_parser()
    (sub,) = [a for a in ap._actions if isinstance(a, argparse._SubParsersAction)]
    helps = {a.dest: a.help for a in sub._choices_actions}
    assert set(helps) == set(sub.choices)
    for name, text in helps.items():
        assert text and "\n" not in text and "``" not in text and "see `" not in text, (name, text)
        assert len(text) <= 60, (name, text)
    assert "``" not in ap.format_help()
