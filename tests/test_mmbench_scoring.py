"""MMBench scoring: VLMEvalKit's choice extraction, CircularEval and acc report."""

import csv
import math

import pytest

from cheers.errors import InputError
from cheers.eval import mmbench_scoring as M

FOUR = {"A": "red", "B": "blue", "C": "green", "D": "yellow"}
YES_NO = {"A": "Yes", "B": "No"}


@pytest.mark.parametrize("answer, choices, expected", [
    ("B", FOUR, "B"),
    ("B.", FOUR, "B"),
    ("(C)", FOUR, "C"),
    ("D. yellow", FOUR, "D"),
    ("**A**", FOUR, "A"),
    ("The answer is B", FOUR, "B"),
    ("The answer is B.", FOUR, "B"),
    # the letter is too early to count as an answer, the "answer is" pattern catches it
    ("The answer is B because the circle in the image is blue", FOUR, "B"),
    # a lone early letter in a long answer is not read, and the text is too long to match
    ("B is my choice because the colour of the circle is clearly blue", FOUR, False),
    # option text only
    ("blue", FOUR, "B"),
    ("It is green.", FOUR, "C"),
    ("Yes", YES_NO, "A"),
    ("No", YES_NO, "B"),
    # ambiguous
    ("A or B", FOUR, False),
    ("red or blue", FOUR, False),
    # refusals
    ("Sorry, I can't help with images of people yet.", FOUR, "Z"),
    ("Cannot determine the answer", FOUR, "Z"),
    ("Z", FOUR, "Z"),
    ("Failed to obtain answer via API", FOUR, False),
    ("I don't know", FOUR, False),
    ("", FOUR, False),
    # lower-case letters are not option letters ...
    ("a", FOUR, False),
    # ... except through VLMEvalKit's case-insensitive "answer is X" pattern
    ("The answer is a", FOUR, "A"),
    ("E", FOUR, False),
])
def test_can_infer_table(answer, choices, expected):
    assert M.can_infer(answer, dict(choices)) == expected


def test_can_infer_details():
    # "A" as a quantifier is only suspected with VERBOSE on
    assert M.can_infer_option("A good answer here", FOUR) == "A"
    assert M.can_infer_option("A good answer here", FOUR, verbose=True) is False
    # options are looked up by key; the text matcher does not change the caller's dict
    choices = dict(FOUR)
    assert M.can_infer_text("BLUE", choices) == "B" and choices == FOUR
    assert M.can_infer_text("x" * 37, FOUR) is False  # longer than 2 x (3 + 4 + 5 + 6)
    assert M.build_choices({"A": "x", "B": "y", "C": "", "D": float("nan"), "E": None}) == \
        {"A": "x", "B": "y"}


def _row(index, answer, opts, category, l2, split="dev"):
    row = {"index": index, "question": "q", "answer": answer, "category": category,
           "l2-category": l2, "split": split, "A": "", "B": "", "C": "", "D": ""}
    row.update(zip("ABCD", opts))
    return row


def _rotations(index, answer, opts, category, l2, split="dev"):
    n = len(opts)
    a = "ABCD".index(answer)
    return [_row(index + k * 1_000_000, "ABCD"[(a - k) % n], opts[k:] + opts[:k], category, l2, split)
            for k in range(n)]


CP, FPS = "coarse_perception", "finegrained_perception (instance-level)"


def _benchmark():
    rows = []
    rows += _rotations(0, "B", ["red", "blue", "green", "pink"], "colour", FPS)
    rows += _rotations(1, "A", ["circle", "star", "cross", "square"], "shape", FPS)
    rows += _rotations(2, "A", ["Yes", "No"], "existence", CP)
    rows += _rotations(3, "C", ["1", "2", "3"], "count", FPS)
    return rows


def test_circular_eval():
    rows = _benchmark()
    by_index = {r["index"]: r for r in rows}
    preds = {}
    # q0: every rotation right, in different styles
    for k, style in enumerate(["{}", "The answer is {}", "{}.", "({})"]):
        r = by_index[k * 1_000_000]
        preds[r["index"]] = style.format(r["answer"])
    # q1: right in three rotations, wrong in one
    for k in range(4):
        r = by_index[1 + k * 1_000_000]
        preds[r["index"]] = r["answer"] if k != 2 else "ABCD".replace(r["answer"], "")[0]
    # q2: the option text once, then an unreadable answer
    preds[2] = "Yes"
    preds[1_000_002] = "I cannot tell"
    # q3: one rotation has no prediction at all
    preds[3] = "C"
    preds[1_000_003] = "B"
    scored = M.score_circular(rows, preds)
    assert [r["index"] for r in scored] == [0, 1, 2, 3]
    assert [r["hit"] for r in scored] == [1, 0, 0, 0]
    assert "Failed in Rolling 2" in scored[1]["log"]
    # the same predictions on the first rotations alone (vanilla) are all right
    vanilla = M.score_vanilla([r for r in rows if r["index"] < 1_000_000], preds)
    assert [r["hit"] for r in vanilla] == [1, 1, 1, 1]
    # predictions may also ride on the rows
    with_preds = [{**r, "prediction": preds.get(r["index"])} for r in rows]
    assert [r["hit"] for r in M.score_circular(with_preds)] == [1, 0, 0, 0]

    out = M.evaluate_mmbench(rows, preds)
    acc = out["acc"]
    assert list(acc) == ["Overall", "CP", "FP-S", "colour", "count", "existence", "shape"]
    assert acc["Overall"] == 0.25 and acc["CP"] == 0.0 and acc["FP-S"] == pytest.approx(1 / 3)
    assert acc["colour"] == 1.0 and acc["shape"] == 0.0
    assert out["csv"] == [{"split": "dev", **acc}]
    # all right
    right = {r["index"]: r["answer"] for r in rows}
    assert M.evaluate_mmbench(rows, right)["acc"]["Overall"] == 1.0


def test_report_acc_layout_and_files(tmp_path):
    rows = _benchmark()
    rows += [{**r, "index": r["index"] + 10, "split": "test"} for r in _rotations(0, "B", ["x", "y"], "colour", FPS)]
    right = {r["index"]: r["answer"] for r in rows}
    out = M.evaluate_mmbench(rows, right)
    assert [t["split"] for t in out["csv"]] == ["dev", "test"]
    test_row = out["csv"][1]
    assert test_row["Overall"] == 1.0 and test_row["colour"] == 1.0
    assert math.isnan(test_row["CP"]) and math.isnan(test_row["shape"])
    with pytest.raises(InputError):
        M.acc_summary(out["results"])
    assert M.acc_summary(out["results"], "test")["Overall"] == 1.0
    path = str(tmp_path / "acc.csv")
    M.write_acc_csv(out["csv"], path)
    with open(path) as fp:
        table = list(csv.reader(fp))
    assert table[0] == ["split", "Overall", "CP", "FP-S", "colour", "count", "existence", "shape"]
    assert table[1][:2] == ["dev", "1.0"]
    with pytest.raises(InputError):
        M.report_acc([])
    with pytest.raises(InputError):
        M.score_circular([{"question": "no index"}])
