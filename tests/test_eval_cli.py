"""`cheers eval ...` end to end through cheers.cli.main on a tiny checkpoint; the adapters."""

from __future__ import annotations

import csv
import json
from types import SimpleNamespace

import pytest
from PIL import Image

from cheers.cli import main as cli_main


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    from cheers.debug_checkpoint import make_debug_checkpoint

    path = tmp_path_factory.mktemp("ckpt")
    make_debug_checkpoint(path)
    return path


@pytest.mark.slow
def test_shapes_suite_and_the_file_commands(ckpt, tmp_path):
    out = tmp_path / "ev"
    cli_main(
        [
            "eval",
            "shapes",
            "--out",
            str(out),
            "--ckpt",
            str(ckpt),
            "--steps",
            "1",
            "--prompts-per-tag",
            "1",
            "--dpg-prompts",
            "2",
            "--questions",
            "2",
            "--max-new-tokens",
            "2",
            "--batch-size",
            "8",
        ]
    )
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary) == {"geneval", "dpg", "mmbench", "mme"}
    # each benchmark keeps its own scale, named beside it, and agrees with its own report
    read = lambda f: json.loads((out / f).read_text())  # noqa: E731
    assert summary["geneval"]["overall"] == read("geneval/summary.json")["overall"]
    assert "0-1" in summary["geneval"]["scale"]
    assert summary["dpg"]["overall"] == read("dpg/summary.json")["overall"] and "0-100" in summary["dpg"]["scale"]
    assert summary["dpg"]["categories"] == {k: v for k, v in read("dpg/summary.json").items() if k != "overall"}
    assert summary["mmbench"]["overall"] == read("mmbench/acc.json")["Overall"]
    assert "0-1" in summary["mmbench"]["scale"]
    mme = summary["mme"]
    assert set(mme["subtasks"]) == {"existence", "count", "color", "position"} & set(read("mme/score.json"))
    assert mme["perception"] == pytest.approx(sum(mme["subtasks"].values()))
    assert f"0-{200 * len(mme['subtasks'])}" in mme["scale"]
    assert (out / "geneval" / "00005" / "samples" / "0003.png").is_file()
    assert len(list((out / "dpg" / "images").glob("*.png"))) == 2
    assert Image.open(next((out / "dpg" / "images").glob("*.png"))).size == (
        128,
        128,
    )  # 2x2 of 64 px
    with open(out / "mmbench" / "predictions.tsv") as fp:
        header = next(csv.reader(fp, delimiter="\t"))
    assert header[-1] == "prediction" and "image" not in header and "l2-category" in header
    for f in (
        "mmbench/acc.csv",
        "mmbench/acc.json",
        "mme/score.json",
        "mme/score.csv",
        "dpg/summary.json",
    ):
        assert (out / f).is_file(), f

    # the single-step commands over the same files
    cli_main(
        [
            "eval",
            "geneval",
            "generate",
            "--metadata",
            str(out / "geneval_metadata.jsonl"),
            "--out",
            str(out / "geneval"),
            "--ckpt",
            str(ckpt),
            "--steps",
            "1",
        ]
    )  # all done: skips
    cli_main(
        [
            "eval",
            "geneval",
            "score",
            str(out / "geneval"),
            "--out",
            str(tmp_path / "r.jsonl"),
            "--options",
            "threshold=0.5",
        ]
    )
    cli_main(
        ["eval", "geneval", "summary", str(tmp_path / "r.jsonl"), "--out", str(tmp_path / "s")]
    )
    assert list(json.loads((tmp_path / "s" / "summary.json").read_text()))[0] == "overall"
    cli_main(
        [
            "eval",
            "mmbench",
            "score",
            "--pred",
            str(out / "mmbench" / "predictions.tsv"),
            "--out",
            str(tmp_path / "m"),
        ]
    )
    assert json.loads((tmp_path / "m" / "acc.json").read_text()) == json.loads(
        (out / "mmbench" / "acc.json").read_text()
    )
    cli_main(
        [
            "eval",
            "mme",
            "score",
            "--pred",
            str(out / "mme" / "predictions.tsv"),
            "--out",
            str(tmp_path / "e"),
        ]
    )
    cli_main(
        [
            "eval",
            "dpg",
            "score",
            str(out / "dpg" / "images"),
            "--csv",
            str(out / "dpg" / "dpg_bench.csv"),
            "--out",
            str(tmp_path / "d"),
        ]
    )
    assert "overall" in json.loads((tmp_path / "d" / "summary.json").read_text())


def test_bad_input_exits_2_with_one_line(ckpt, tmp_path, capsys):
    (tmp_path / "x.tsv").write_text("index\tquestion\n0\tq\n")
    with pytest.raises(SystemExit) as e:
        cli_main(
            [
                "eval",
                "mmbench",
                "run",
                "--tsv",
                str(tmp_path / "x.tsv"),
                "--out",
                str(tmp_path / "o"),
                "--ckpt",
                str(ckpt),
            ]
        )
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "lacks column(s) ['image', 'A', 'B']" in err[0]
    with pytest.raises(SystemExit) as e:
        cli_main(["eval", "geneval", "score", str(tmp_path), "--detector", "mask2former"])
    assert e.value.code == 2 and "mmdet" in capsys.readouterr().err


@pytest.mark.slow
def test_adapters_over_a_pipeline(ckpt):
    from cheers.eval.adapters.lmms_eval import CheersLMMs
    from cheers.eval.adapters.vlmevalkit import CheersVLM
    from cheers.pipeline import Pipeline

    pipe = Pipeline.from_pretrained(ckpt)
    image = Image.new("RGB", (64, 64), (200, 40, 40))
    vlm = CheersVLM(pipe=pipe, max_new_tokens=3)
    assert isinstance(
        vlm.generate(
            [{"type": "image", "value": image}, {"type": "text", "value": "What colour?"}]
        ),
        str,
    )
    assert vlm.use_custom_prompt("MMBench_DEV_EN") and not vlm.use_custom_prompt(None)

    import base64
    import io

    buf = io.BytesIO()
    image.save(buf, format="PNG")
    line = {
        "index": 0,
        "question": "Colour?",
        "hint": float("nan"),
        "A": "red",
        "B": "blue",
        "C": float("nan"),
        "image": base64.b64encode(buf.getvalue()).decode(),
    }
    msgs = vlm.build_prompt(line)
    assert msgs[0]["type"] == "image" and msgs[1]["value"].startswith("Colour?\nA. red\nB. blue\n")

    lmm = CheersLMMs(pipe=pipe, batch_size=2, max_new_tokens=3)
    lmm.task_dict = {"t": {"test": {i: {"img": image} for i in range(3)}}}
    reqs = [
        SimpleNamespace(
            args=(
                f"Question {i}?",
                {"max_new_tokens": 2, "until": ["\n"]},
                lambda doc: [doc["img"]],
                i,
                "t",
                "test",
            )
        )
        for i in range(3)
    ]
    answers = lmm.generate_until(reqs)
    assert len(answers) == 3 and all(isinstance(a, str) and "\n" not in a for a in answers)
    with pytest.raises(NotImplementedError, match="generate_until"):
        lmm.loglikelihood(reqs)
