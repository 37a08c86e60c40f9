"""MMBench files: CircularEval over a synthetic TSV, the report files, the judge, bad input."""

from __future__ import annotations

import base64
import csv
import io
import json

import pytest
from PIL import Image

from cheers.errors import InputError
from cheers.eval import mmbench
from cheers.eval.judge import Judge
from cheers.eval.tables import decode_image, read_table, resolve_images, write_tsv
from cheers.shapes.dataset import MMBENCH_COLUMNS, rotate_question

FPS, FPC = "finegrained_perception (instance-level)", "finegrained_perception (cross-instance)"


def _png() -> str:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 30, 30)).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def _rows() -> list[dict]:
    base = [
        {
            "index": 0,
            "question": "Colour?",
            "A": "red",
            "B": "blue",
            "C": "green",
            "D": "pink",
            "answer": "A",
            "category": "colour",
            "l2-category": FPS,
        },
        {
            "index": 1,
            "question": "How many?",
            "A": "2",
            "B": "3",
            "answer": "B",
            "category": "count",
            "l2-category": FPC,
        },
        {
            "index": 2,
            "question": "Shape?",
            "A": "circle",
            "B": "star",
            "C": "cross",
            "answer": "C",
            "category": "shape",
            "l2-category": FPS,
        },
    ]
    rows = []
    for r in base:
        r = {c: "" for c in MMBENCH_COLUMNS} | r | {"split": "dev", "image": _png()}
        n = sum(1 for c in "ABCD" if r[c])
        rows += [r] + [rotate_question(r, k) for k in range(1, n)]
    for r in rows:  # rotated copies share the image by reference, as VLMEvalKit's TSVs do
        if r["index"] >= 1_000_000:
            r["image"] = str(r["index"] % 1_000_000)
    return rows


def _answer(row, wrong=False):
    """A prediction for a row in varied VLMEvalKit-readable forms."""
    letter = row["answer"]
    if wrong:
        return [c for c in "ABCD" if row[c] and c != letter][0]
    k = row["index"] // 1_000_000
    return [letter, f"The answer is {letter}.", row[letter], f"({letter})"][k % 4]


def test_circular_scores_equal_hand_computed(tmp_path):
    rows = _rows()
    assert len(rows) == 4 + 2 + 3
    preds = []
    for r in rows:
        wrong = r["index"] == 1_000_001  # question 1 fails in its rotated pass only
        preds.append(
            {k: v for k, v in r.items() if k != "image"} | {"prediction": _answer(r, wrong)}
        )
    write_tsv(preds, str(tmp_path / "pred.tsv"))
    acc = mmbench.score_file(str(tmp_path / "pred.tsv"), tmp_path / "out")
    # circular: q0 right, q1 wrong (rotation 1), q2 right
    assert acc == pytest.approx(
        {"Overall": 2 / 3, "FP-C": 0.0, "FP-S": 1.0, "colour": 1.0, "count": 0.0, "shape": 1.0}
    )
    assert json.loads((tmp_path / "out" / "acc.json").read_text()) == pytest.approx(acc)
    with open(tmp_path / "out" / "acc.csv") as fp:
        table = list(csv.DictReader(fp))
    assert list(table[0]) == ["split", "Overall", "FP-C", "FP-S", "colour", "count", "shape"]
    assert table[0]["split"] == "dev" and float(table[0]["Overall"]) == pytest.approx(2 / 3)
    # vanilla: 8 of 9 rows right
    acc = mmbench.score_file(str(tmp_path / "pred.tsv"), tmp_path / "out2", circular=False)
    assert acc["Overall"] == pytest.approx(8 / 9) and acc["count"] == pytest.approx(1 / 2)


def test_prompt_styles():
    row = {
        "index": 3,
        "question": "What colour?",
        "hint": "Look closely.",
        "A": "red",
        "B": "blue",
        "C": "",
        "D": "nan",
    }
    assert mmbench.build_prompt(row) == (
        "Look closely.\nWhat colour?\nA. red\nB. blue\n"
        "Answer with the option's letter from the given choices directly."
    )
    assert mmbench.build_prompt(row, "vlmevalkit") == (
        "Hint: Look closely.\nQuestion: What colour?\nOptions:\nA. red\nB. blue\n"
        "Please select the correct answer from the options above. \n"
    )
    assert mmbench.build_prompt(dict(row, hint="")).startswith("What colour?\n")


def test_judge_only_when_rules_fail(tmp_path):
    calls = []

    def transport(url, payload, headers, timeout):
        calls.append((url, payload, headers))
        return {"choices": [{"message": {"content": "B"}}]}

    judge = Judge(
        "http://localhost:9/v1", "judge-model", key_env="CHEERS_TEST_KEY", transport=transport
    )
    rows = [r for r in _rows() if r["index"] % 1_000_000 == 1]  # the two passes of question 1
    preds = [dict(r, prediction=p) for r, p in zip(rows, ["B", "I would go with three of them"])]
    acc = mmbench.score(preds, tmp_path / "j", judge=judge)
    assert acc["Overall"] == 0.0  # rotation 1's answer is A ("3"); the judge read B
    assert len(calls) == 1 and calls[0][0] == "http://localhost:9/v1/chat/completions"
    assert (
        calls[0][1]["model"] == "judge-model"
        and "I would go with three" in calls[0][1]["messages"][0]["content"]
    )
    # without a judge the unreadable answer is simply wrong, and nothing is called
    mmbench.score(preds, tmp_path / "nj")
    assert len(calls) == 1


def test_bad_tables_name_the_row(tmp_path):
    rows = _rows()
    write_tsv(
        [{k: v for k, v in r.items() if k != "question"} for r in rows], str(tmp_path / "a.tsv")
    )
    with pytest.raises(InputError, match=r"a.tsv lacks column\(s\) \['question'\]"):
        read_table(str(tmp_path / "a.tsv"), ("index", "question"))
    bad = [dict(r) for r in rows]
    bad[2]["image"] = "!!!not base64" * 10
    loaded = resolve_images(bad, "b.tsv")
    with pytest.raises(
        InputError, match=r"row 3 \(index 2000000\): the image cell is not valid base64"
    ):
        decode_image(loaded[2], "b.tsv: row 3 (index 2000000)")
    bad[0]["image"] = base64.b64encode(b"not an image at all" * 5).decode()
    write_tsv(bad, str(tmp_path / "b.tsv"))
    from cheers.eval.answering import answer_rows

    with pytest.raises(
        InputError, match=r"b.tsv: row 1 \(index 0\): the image cell does not decode"
    ):
        answer_rows(None, read_table(str(tmp_path / "b.tsv")), str, source=str(tmp_path / "b.tsv"))
    bad[1]["image"] = "77"  # a reference to no row
    with pytest.raises(InputError, match=r"row 2 \(index 1000000\): image cell '77'"):
        resolve_images(bad, "c.tsv")
    preds = [
        dict(r, prediction="A", answer="E" if i == 4 else r["answer"]) for i, r in enumerate(rows)
    ]
    with pytest.raises(InputError, match=r"row 5 \(index 1\): answer 'E' is not one of"):
        mmbench.score(preds, tmp_path / "x")


def test_xlsx_needs_openpyxl(tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_openpyxl(name, *args, **kw):
        if name == "openpyxl":
            raise ImportError("No module named 'openpyxl'")
        return real_import(name, *args, **kw)

    (tmp_path / "p.xlsx").write_bytes(b"PK")
    monkeypatch.setattr(builtins, "__import__", no_openpyxl)
    with pytest.raises(InputError, match="needs the Python package openpyxl"):
        mmbench.score_file(str(tmp_path / "p.xlsx"), tmp_path / "o")
