"""GenEval end to end: layout, resumption, summary, metadata errors, the external models."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from cheers.errors import CheersError, InputError
from cheers.eval import geneval
from cheers.eval.external import MissingModelError

META = [
    {
        "tag": "single_object",
        "include": [{"class": "circle", "count": 1}],
        "prompt": "a photo of a circle",
    },
    {
        "tag": "colors",
        "include": [{"class": "square", "count": 1, "color": "red"}],
        "prompt": "a photo of a red square",
    },
]


@pytest.fixture(scope="module")
def tiny_pipe(tmp_path_factory):
    from cheers.debug_checkpoint import make_debug_checkpoint
    from cheers.pipeline import Pipeline

    ckpt = tmp_path_factory.mktemp("ckpt")
    make_debug_checkpoint(ckpt)
    return Pipeline.from_pretrained(ckpt)


def _write_meta(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.mark.slow
def test_layout_and_resumption(tiny_pipe, tmp_path):
    meta = geneval.read_metadata(_write_meta(tmp_path / "meta.jsonl", META))
    out = tmp_path / "gen"
    res = geneval.generate(tiny_pipe, meta, out, n=2, seed=5, batch_size=4, steps=1, progress=False)
    assert res == {"written": 2, "skipped": 0}
    for i, m in enumerate(META):
        assert json.loads((out / f"{i:05d}" / "metadata.jsonl").read_text()) == m
        names = sorted(p.name for p in (out / f"{i:05d}" / "samples").iterdir())
        assert names == ["0000.png", "0001.png"]
    first = out / "00000" / "samples" / "0000.png"
    stamp = first.stat().st_mtime_ns
    lost = out / "00001" / "samples" / "0001.png"
    before = np.asarray(Image.open(lost), dtype=np.int16)
    lost.unlink()
    res = geneval.generate(tiny_pipe, meta, out, n=2, seed=5, batch_size=4, steps=1, progress=False)
    assert res == {"written": 1, "skipped": 1}
    assert first.stat().st_mtime_ns == stamp  # the finished prompt was not regenerated
    after = np.asarray(Image.open(lost), dtype=np.int16)
    assert np.abs(after - before).max() <= 2  # same seed (seed + n i + k) -> same image
    assert not list(out.rglob("*.tmp.png"))
    # a folder of another metadata file is refused, not silently mixed
    other = [dict(META[0], prompt="a photo of a star")] + META[1:]
    with pytest.raises(InputError, match="holds another prompt"):
        geneval.generate(tiny_pipe, other, out, n=2, steps=1, progress=False)


def test_metadata_schema_errors_name_the_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(META[0]) + "\n" + json.dumps({"tag": "colors", "prompt": "x"}) + "\n")
    with pytest.raises(InputError, match=r"bad.jsonl:2: 'include' must be a list"):
        geneval.read_metadata(bad)
    bad.write_text(json.dumps(META[0]) + "\n\n{not json\n")
    with pytest.raises(InputError, match=r"bad.jsonl:3: not JSON"):
        geneval.read_metadata(bad)
    bad.write_text(json.dumps({"tag": "x", "prompt": "p", "include": [{"class": "cat"}]}) + "\n")
    with pytest.raises(InputError, match=r"bad.jsonl:1: each 'include' clause needs"):
        geneval.read_metadata(bad)


def test_summary_equals_hand_computed(tmp_path):
    def rec(tag, ok, prompt):
        return {
            "filename": "x.png",
            "tag": tag,
            "prompt": prompt,
            "correct": ok,
            "reason": "",
            "metadata": json.dumps({"tag": tag, "prompt": prompt}),
            "details": "{}",
        }

    records = (
        [rec("single_object", ok, "p1") for ok in (True, True, True, False)]
        + [rec("counting", ok, "p2") for ok in (False, False, False, False)]
        + [rec("counting", ok, "p3") for ok in (True, False, False, False)]
        + [rec("position", ok, "p4") for ok in (True, False, True, False)]
    )
    results = tmp_path / "results.jsonl"
    results.write_text("".join(json.dumps(r) + "\n" for r in records))
    scores = geneval.write_summary(results, tmp_path / "sum")
    summary = json.loads((tmp_path / "sum" / "summary.json").read_text())
    # per tag: 3/4, 1/8, 2/4; overall = their unweighted mean
    assert summary == pytest.approx(
        {
            "single_object": 0.75,
            "counting": 0.125,
            "position": 0.5,
            "overall": (0.75 + 0.125 + 0.5) / 3,
        }
    )
    assert list(summary)[0] == "overall"
    assert scores["n_images"] == 16 and scores["n_prompts"] == 4
    assert scores["prompt_accuracy"] == pytest.approx(3 / 4)  # p2 never right
    table = (tmp_path / "sum" / "summary.txt").read_text()
    assert "counting         = 12.50% (1 / 8)" in table
    assert "Overall score (avg. over tasks): 0.45833" in table


def test_shapes_scorer_on_reference_images(tmp_path):
    from cheers.shapes.dataset import write_geneval_metadata, write_geneval_reference

    meta = write_geneval_metadata(str(tmp_path / "m.jsonl"), 1)
    write_geneval_reference(str(tmp_path / "ref"), meta, n_images=1)
    detector, colours = geneval.shapes_scorer()
    records = geneval.score(tmp_path / "ref", tmp_path / "results.jsonl", detector, colours)
    assert len(records) == 6 and all(r["correct"] for r in records)


def test_missing_external_models_are_named(tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_externals(name, *args, **kw):
        if name.split(".")[0] in ("mmdet", "open_clip", "modelscope"):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kw)

    monkeypatch.setattr(builtins, "__import__", no_externals)
    with pytest.raises(MissingModelError, match="Python package 'mmdet'"):
        geneval.official_scorer(
            detector_config=None, detector_ckpt=None, class_names=None, clip_ckpt=None
        )
    from cheers.eval.clip_colour import load_clip_colour_classifier

    with pytest.raises(MissingModelError, match="Python package 'open_clip'.*open_clip_torch"):
        load_clip_colour_classifier(str(tmp_path / "clip.bin"))
    from cheers.eval.dpg import MplugVQA

    with pytest.raises(MissingModelError, match="'modelscope'"):
        MplugVQA(None)
    monkeypatch.setattr(builtins, "__import__", real_import)
    # packages present but no weights: the flag to pass is named
    from cheers.eval.external import require_file

    with pytest.raises(MissingModelError, match="--clip-ckpt"):
        require_file(None, "--clip-ckpt", "the CLIP ViT-L-14 weights")
    with pytest.raises(CheersError, match="not found: .*nope.pth"):
        require_file(tmp_path / "nope.pth", "--detector-ckpt", "the checkpoint")


def test_clip_colour_rule_with_a_fake_clip():
    """Masked crop over #999 grey, 3 templates averaged, argmax of image . text."""
    from cheers.eval.clip_colour import ClipColourClassifier
    from cheers.eval.geneval_rules import COLORS

    seen_texts: list[str] = []

    class FakeClip:
        def encode_text(self, tokens):  # one-hot on the colour named in the text
            out = torch.zeros(len(tokens), len(COLORS))
            for i, t in enumerate(tokens):
                out[i, [c for c in range(len(COLORS)) if f" {COLORS[c]}" in t][0]] = 1.0
            return out

        def encode_image(self, pixels):  # red-ness vs blue-ness of the mean colour
            mean = pixels.mean(dim=(2, 3))  # [N, 3]
            out = torch.zeros(len(pixels), len(COLORS))
            out[:, COLORS.index("red")] = mean[:, 0]
            out[:, COLORS.index("blue")] = mean[:, 2]
            return out

    def tokenizer(texts):
        seen_texts.extend(texts)
        return texts

    class Tokens(list):
        def to(self, _device):
            return self

    def preprocess(img):
        return torch.from_numpy(np.asarray(img, dtype=np.float32) / 255).permute(2, 0, 1)

    clf = ClipColourClassifier(FakeClip(), preprocess, lambda t: Tokens(tokenizer(t)))
    img = np.zeros((8, 8, 3), np.uint8)
    img[..., 0] = 255  # red around the object: an unmasked crop would read red
    img[0:4, 0:4] = (0, 0, 255)
    mask = np.zeros((8, 8), bool)
    mask[0:4, 0:4] = True
    det = {"box": [0, 0, 8, 8], "mask": mask}
    assert clf(Image.fromarray(img), [det], "square") == ["blue"]
    assert (
        "a photo of a blue-colored square" in seen_texts and "a photo of a red object" in seen_texts
    )
