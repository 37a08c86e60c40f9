"""MME (yes/no reading, acc + acc+) and DPG-Bench (dependency zeroing) on hand-built sets."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from cheers.errors import InputError
from cheers.eval import dpg, mme


@pytest.mark.parametrize(
    "text, expected",
    [
        ("Yes", "Yes"),
        ("yes.", "Yes"),
        ("No, it is not.", "No"),
        ("NO", "No"),
        ("Yes, there is.", "Yes"),
        ("yes and no", "Unknown"),
        ("I cannot tell", "Unknown"),
        ("", "Unknown"),
        ("Yes/No", "Unknown"),
        ("(yes)", "Yes"),
        ("nope", "Unknown"),
        ("B", "Unknown"),
        ("no-one knows", "No"),  # "-" touching no space becomes a space
    ],
)
def test_yes_no_extraction(text, expected):
    assert mme.yes_no(text) == expected


def _mme_rows():
    def pair(cat, image, preds, answers=("Yes", "No")):
        return [
            {
                "index": f"{image}-{k}",
                "category": cat,
                "image_path": image,
                "question": "q?",
                "answer": a,
                "prediction": p,
            }
            for k, (a, p) in enumerate(zip(answers, preds))
        ]

    return (
        pair("color", "c1", ["Yes", "No"])
        + pair("color", "c2", ["Yes", "Yes"])
        + pair("count", "n1", ["no", "maybe"])
        + pair("count", "n2", ["Yes.", "No."])
        + pair("code_reasoning", "r1", ["yes", "no"])
    )


def test_mme_scores_equal_hand_computed(tmp_path):
    result = mme.score_rows(_mme_rows())
    s = result["scores"]
    # color: 3/4 questions, 1/2 images -> 75 + 50; count: 2/4, 1/2 -> 50 + 50; code: 100 + 100
    assert s["color"] == pytest.approx(125.0) and s["count"] == pytest.approx(100.0)
    assert s["code_reasoning"] == pytest.approx(200.0)
    assert s["Perception"] == pytest.approx(225.0) and s["Cognition"] == pytest.approx(200.0)
    assert result["details"]["count"] == pytest.approx(
        {"acc": 0.5, "acc_plus": 0.5, "score": 100.0, "questions": 4, "images": 2}
    )
    assert "OCR" in result["missing"] and "color" not in result["missing"]
    from cheers.eval.tables import write_tsv

    write_tsv(_mme_rows(), str(tmp_path / "pred.tsv"))
    mme.score_file(str(tmp_path / "pred.tsv"), tmp_path / "out")
    assert json.loads((tmp_path / "out" / "score.json").read_text()) == pytest.approx(s)
    header = (tmp_path / "out" / "score.csv").read_text().splitlines()[0]
    assert header.startswith("perception,reasoning,color")
    with pytest.raises(InputError, match="has 1 question"):
        mme.score_rows(_mme_rows()[:-1])


def test_dependency_zeroing_hand_built():
    parents = {1: [0], 2: [1], 3: [2], 4: [0], 5: [1, 4]}
    raw = {1: 0.0, 2: 1.0, 3: 1.0, 4: 1.0, 5: 1.0}
    # 2's parent failed -> 0; 3's parent (2) is zeroed first, in order -> 0; 5 needs 1 -> 0
    assert dpg.zero_dependents(raw, parents) == {1: 0.0, 2: 0.0, 3: 0.0, 4: 1.0, 5: 0.0}
    assert dpg.zero_dependents({1: 1.0, 2: 1.0, 3: 0.0, 4: 0.0, 5: 1.0}, parents) == {
        1: 1.0,
        2: 1.0,
        3: 0.0,
        4: 0.0,
        5: 0.0,
    }


def _csv(path, rows):
    import csv

    with open(path, "w", newline="") as fp:
        w = csv.DictWriter(fp, fieldnames=list(dpg.COLUMNS))
        w.writeheader()
        for r in rows:
            w.writerow({c: "" for c in dpg.COLUMNS} | r)


def test_dpg_folder_scores_hand_computed(tmp_path):
    q = [
        ("dummy", 9, "0", "entity - whole (x)", "skipped?"),
        ("a", 1, "0", "entity - whole (cat)", "Is there a cat?"),
        ("a", 2, "1", "attribute - color (cat, black)", "Is the cat black?"),
        ("a", 3, "0", "entity - whole (dog)", "Is there a dog?"),
        ("b", 1, "0", "entity - whole (sun)", "Is there a sun?"),
        ("b", 2, "1", "global - (bright)", "Is it bright?"),
    ]
    _csv(
        tmp_path / "q.csv",
        [
            {
                "item_id": i,
                "proposition_id": p,
                "dependency": d,
                "tuple": t,
                "question_natural_language": n,
            }
            for i, p, d, t, n in q
        ],
    )
    items = dpg.read_questions(tmp_path / "q.csv")
    assert "dummy" not in items and items["a"].qids == [1, 2, 3]  # the official skips row 1
    assert "dummy" in dpg.read_questions(tmp_path / "q.csv", skip_first_row=False)
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    # 2x2 grid of 4 px tiles, the tile's red level tells the fake VQA which tile it sees
    grid = np.zeros((8, 8, 3), np.uint8)
    for k, (x, y) in enumerate(((0, 0), (4, 0), (0, 4), (4, 4))):
        grid[y : y + 4, x : x + 4, 0] = 10 * k
    for name in ("a", "b", "c"):
        Image.fromarray(grid).save(imgs / f"{name}.png")
    # tile 0: all yes; tile 1: no cat (so "black" is zeroed); tiles 2, 3: only the dog / sun
    truth = {
        0: {"cat", "black", "dog", "sun", "bright"},
        1: {"black", "dog", "sun"},
        2: {"dog"},
        3: {"sun", "bright"},
    }

    def vqa(tile, question):
        k = int(np.asarray(tile)[0, 0, 0]) // 10
        return "yes" if any(w in question for w in truth[k]) else "no"

    result = dpg.score_folder(imgs, items, vqa, progress=False)
    # a: tiles 3/3, 1/3 (black zeroed), 1/3, 0/3 -> 5/12; b: 1, 1/2, 0, 1 -> 5/8
    scores = {r["file"]: r["score"] for r in result["records"]}
    assert scores == pytest.approx({"a.png": 5 / 12, "b.png": 5 / 8})
    assert result["skipped"] == [("c.png", "no questions for this item id")]
    assert result["summary"]["overall"] == pytest.approx((5 / 12 + 5 / 8) / 2 * 100)
    # categories: last tile's raw answers (cat 0, black 0, dog 0, sun 1, bright 1)
    assert result["summary"]["entity"] == pytest.approx(100 / 3)
    assert result["summary"]["attribute"] == 0.0 and result["summary"]["global"] == 100.0
    assert result["l2"]["entity - whole"] == pytest.approx(100 / 3)
    table = dpg.write_report(result, tmp_path / "rep")
    assert "DPG-Bench score: 52.08" in table
    assert json.loads((tmp_path / "rep" / "summary.json").read_text())["overall"] == pytest.approx(
        52.0833, 1e-4
    )


def test_dpg_bad_csv_names_the_row(tmp_path):
    _csv(
        tmp_path / "q.csv",
        [
            {"item_id": "x", "proposition_id": 1, "dependency": "0"},
            {"item_id": "a", "proposition_id": 1, "dependency": "one"},
        ],
    )
    with pytest.raises(InputError, match=r"row 2 \(item 'a'\): proposition_id / dependency"):
        dpg.read_questions(tmp_path / "q.csv")


def test_shapes_vqa_and_sets(tmp_path):
    from cheers.eval.shapes_sets import ShapesVQA, dpg_item, mme_rows, write_dpg_set
    from cheers.shapes.scenes import render, sample_scene

    rng = np.random.default_rng(3)
    for _ in range(20):
        scene = sample_scene(rng, 64, "position")
        got = dpg_item(scene)
        if got is not None:
            break
    prompt, rows = got
    vqa = ShapesVQA()
    image = Image.fromarray(render(scene))
    # every question about a faithful render is answered yes
    assert all(vqa(image, r["question_natural_language"]) == "yes" for r in rows), rows
    assert vqa(image, "Is there a cross?") == (
        "yes" if any(o.shape == "cross" for o in scene.objects) else "no"
    )
    with pytest.raises(InputError, match="cannot read the question"):
        vqa(image, "What is this?")
    csv_path = write_dpg_set(tmp_path / "set", 4)
    items = dpg.read_questions(csv_path)
    assert sorted(items) == [f"shapes{i:04d}" for i in range(4)]
    assert len(list((tmp_path / "set" / "prompts").glob("*.txt"))) == 4
    rows = mme_rows(4)
    assert len(rows) == 8 and {r["answer"] for r in rows} == {"Yes", "No"}
    assert rows[1]["image"] == "0" and rows[1]["image_path"] == rows[0]["image_path"]
