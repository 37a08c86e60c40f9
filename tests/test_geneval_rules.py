"""GenEval's rules on hand-built detections (facts from djghosh13/geneval evaluate_images.py)."""

import json
import os

import numpy as np
import pytest
from PIL import Image

from cheers.errors import InputError
from cheers.eval import geneval_rules as G

FIXTURE_METADATA = os.path.join(os.path.dirname(__file__), "fixtures", "geneval",
                                "evaluation_metadata.jsonl")


def D(cls, box, score=0.95, colour=None):
    d = {"class": cls, "box": list(box), "score": score}
    if colour is not None:
        d["colour"] = colour
    return d


def box_at(cx, cy, half=5):
    return [cx - half, cy - half, cx + half, cy + half]


def run(dets, meta, **kw):
    return G.evaluate_image(dets, meta, filename="x.png", **kw)


# --------------------------------------------------------------------------- position


def test_relative_position_margin():
    a = [0, 0, 10, 10]
    assert G.relative_position(a, [10, 0, 20, 10]) == {"left of"}  # 10 px apart, margin 2
    assert G.relative_position([10, 0, 20, 10], a) == {"right of"}
    # centres 1.5 px apart: inside the margin 0.1 * (10 + 10) = 2 -> no relation
    assert G.relative_position(a, [1.5, 0, 11.5, 10]) == set()
    # 2.5 px apart: shrunk offset 0.5 / 2.5 = 0.2 of the offset, below 0.5 -> none
    assert G.relative_position(a, [2.5, 0, 12.5, 10]) == set()
    # 5 px apart: 3 / 5 = 0.6 -> left of
    assert G.relative_position(a, [5, 0, 15, 10]) == {"left of"}
    # a bigger margin swallows it
    assert G.relative_position(a, [5, 0, 15, 10], margin=0.3) == set()
    # y grows downwards: smaller y is above
    assert G.relative_position([0, 0, 10, 10], [0, 30, 10, 40]) == {"above"}
    assert G.relative_position([0, 30, 10, 40], [0, 0, 10, 10]) == {"below"}
    # a clear diagonal names two relations
    assert G.relative_position(box_at(0, 0, 1), box_at(10, 10, 1)) == {"left of", "above"}
    # scores as a fifth number are ignored
    assert G.relative_position(a + [0.9], [10, 0, 20, 10, 0.8]) == {"left of"}


def test_position_rule():
    meta = {"tag": "position", "include": [{"class": "cow", "count": 1},
                                           {"class": "dog", "count": 1, "position": ["right of", 0]}],
            "prompt": "a photo of a dog right of a cow"}
    cow, dog_right, dog_left = D("cow", box_at(20, 50)), D("dog", box_at(80, 50)), D("dog", box_at(5, 50))
    assert run([cow, dog_right], meta)["correct"]
    r = run([cow, dog_left], meta)
    assert not r["correct"] and r["reason"] == "expected dog right of target, found left of target"
    r = run([cow, D("dog", box_at(21, 50))], meta)  # within the margin: no relation at all
    assert r["reason"] == "expected dog right of target, found  target"
    r = run([dog_right], meta)  # the target is missing
    assert r["reason"] == "expected cow>=1, found 0\nno target for dog to be right of"
    # only the best-scoring dog counts (count 1)
    assert run([cow, D("dog", box_at(80, 50), 0.9), D("dog", box_at(5, 50), 0.5)], meta)["correct"]
    assert not run([cow, D("dog", box_at(80, 50), 0.5), D("dog", box_at(5, 50), 0.9)], meta)["correct"]
    bad = {**meta, "include": [meta["include"][1]]}
    with pytest.raises(InputError):
        run([dog_right], bad)


# --------------------------------------------------------------------------- counting, threshold, cap


def test_counting_uses_exclude_and_its_threshold():
    meta = {"tag": "counting", "include": [{"class": "circle", "count": 2}],
            "exclude": [{"class": "circle", "count": 3}], "prompt": "a photo of two circles"}
    two = [D("circle", box_at(10, 10)), D("circle", box_at(40, 10))]
    assert run(two, meta)["correct"]
    r = run(two + [D("circle", box_at(70, 10), 0.95)], meta)
    assert not r["correct"] and r["reason"] == "expected circle<3, found 3"
    # the counting threshold is 0.9: a third circle at 0.85 is not seen ...
    assert run(two + [D("circle", box_at(70, 10), 0.85)], meta)["correct"]
    # ... but at another tag's threshold (0.3) it is
    loose = G.GenEvalConfig(counting_threshold=0.3)
    assert not run(two + [D("circle", box_at(70, 10), 0.85)], meta, config=loose)["correct"]
    r = run([two[0], D("circle", box_at(40, 10), 0.89)], meta)
    assert r["reason"] == "expected circle>=2, found 1"
    # include alone is "at least": without the exclude clause three circles pass
    assert run(two + [D("circle", box_at(70, 10))], {**meta, "exclude": []})["correct"]


def test_threshold_is_strict_and_configurable():
    meta = {"tag": "single_object", "include": [{"class": "cat", "count": 1}], "prompt": "a photo of a cat"}
    assert not run([D("cat", box_at(10, 10), 0.3)], meta)["correct"]
    assert run([D("cat", box_at(10, 10), 0.31)], meta)["correct"]
    assert not run([D("cat", box_at(10, 10), 0.31)], meta, config=G.GenEvalConfig(threshold=0.5))["correct"]
    r = run([D("dog", box_at(10, 10))], meta)
    assert r["reason"] == "expected cat>=1, found 0"


def test_at_most_16_detections_per_class():
    dets = [D("star", box_at(10 * i, 10), 0.95 - 0.001 * i) for i in range(20)]
    meta = {"tag": "counting", "include": [{"class": "star", "count": 16}],
            "exclude": [{"class": "star", "count": 17}], "prompt": "sixteen stars"}
    r = run(dets, meta)
    assert r["correct"]
    kept = json.loads(r["details"])["star"]
    assert len(kept) == 16 and [k[4] for k in kept] == sorted((k[4] for k in kept), reverse=True)
    assert not run(dets, meta, config=G.GenEvalConfig(max_objects=32))["correct"]


def test_optional_nms():
    dets = [D("cup", [0, 0, 10, 10], 0.9), D("cup", [1, 0, 11, 10], 0.8), D("cup", [50, 0, 60, 10], 0.7)]
    assert len(G.group_detections(dets, "two_object")["cup"]) == 3  # 1.0: off, as official
    kept = G.group_detections(dets, "two_object", G.GenEvalConfig(max_overlap=0.5))["cup"]
    assert [d["score"] for d in kept] == [0.9, 0.7]
    assert G.compute_iou([0, 0, 9, 9], [0, 0, 9, 9]) == 1.0
    assert G.compute_iou([0, 0, 9, 9], [10, 0, 19, 9]) == 0.0
    assert G.compute_iou([0, 0, 9, 9], [5, 0, 14, 9]) == pytest.approx(50 / 150)


# --------------------------------------------------------------------------- colour, missing objects


def test_colour_rule():
    meta = {"tag": "colors", "include": [{"class": "car", "count": 1, "color": "red"}],
            "prompt": "a photo of a red car"}
    assert run([D("car", box_at(10, 10), colour="red")], meta)["correct"]
    r = run([D("car", box_at(10, 10), colour="blue")], meta)
    assert not r["correct"] and r["reason"] == "expected red car>=1, found 0 red; and 1 blue"
    # only the best `count` detections are coloured
    r = run([D("car", box_at(10, 10), 0.9, "blue"), D("car", box_at(40, 10), 0.8, "red")], meta)
    assert not r["correct"]
    # a colour classifier callable sees the image, the kept detections and the class
    seen = []

    def classifier(image, objects, classname):
        seen.append((image, len(objects), classname))
        return ["red"] * len(objects)

    assert run([D("car", box_at(10, 10))], meta, image="IMG", color_classifier=classifier)["correct"]
    assert seen == [("IMG", 1, "car")]
    with pytest.raises(InputError):
        run([D("car", box_at(10, 10))], meta)  # no colour and no classifier
    two = {"tag": "color_attr", "include": [{"class": "bus", "count": 1, "color": "green"},
                                            {"class": "cup", "count": 1, "color": "purple"}],
           "prompt": "a photo of a green bus and a purple cup"}
    r = run([D("bus", box_at(10, 10), colour="green"), D("cup", box_at(40, 10), colour="green")], two)
    assert r["reason"] == "expected purple cup>=1, found 0 purple; and 1 green"


def test_missing_object_and_record_format():
    meta = {"tag": "two_object", "include": [{"class": "bench", "count": 1}, {"class": "vase", "count": 1}],
            "prompt": "a photo of a bench and a vase"}
    r = run([D("bench", box_at(10, 10), 0.7)], meta)
    assert list(r) == ["filename", "tag", "prompt", "correct", "reason", "metadata", "details"]
    assert r["filename"] == "x.png" and r["tag"] == "two_object" and r["prompt"] == meta["prompt"]
    assert r["correct"] is False and r["reason"] == "expected vase>=1, found 0"
    assert json.loads(r["metadata"]) == meta
    assert json.loads(r["details"]) == {"bench": [[5.0, 5.0, 15.0, 15.0, 0.7]]}
    with pytest.raises(InputError):
        run([{"class": "bench", "score": 0.9}], meta)


def test_every_official_record_is_scored(tmp_path):
    """All 553 official records: detections built to satisfy a record pass it; dropping the
    best detection of its first class fails it."""
    records = [json.loads(line) for line in open(FIXTURE_METADATA)]
    assert len(records) == 553
    offsets = {"left of": (-60, 0), "right of": (60, 0), "above": (0, -60), "below": (0, 60)}
    for meta in records:
        dets = []
        for i, req in enumerate(meta["include"]):
            cx, cy = 200, 200 + 200 * i
            if "position" in req:
                dx, dy = offsets[req["position"][0]]
                cx, cy = 200 + dx, 200 + dy
            for k in range(req["count"]):
                dets.append(D(req["class"], box_at(cx + 12 * k, cy), 0.95 - 0.01 * k,
                              colour=req.get("color", "white")))
        assert run(dets, meta)["correct"], meta
        assert not run(dets[1:], meta)["correct"], meta


# --------------------------------------------------------------------------- summary, CLIP interface


def test_summarize_matches_hand_computed_scores(tmp_path):
    def rec(tag, prompt, ok):
        return {"filename": "f", "tag": tag, "prompt": prompt, "correct": ok, "reason": "",
                "metadata": json.dumps({"tag": tag, "prompt": prompt}), "details": "{}"}

    records = [rec("single_object", "p1", True), rec("single_object", "p1", False),
               rec("single_object", "p2", False), rec("single_object", "p2", False),
               rec("counting", "p3", False), rec("counting", "p3", False),
               rec("position", "p4", True), rec("position", "p4", True)]
    s = G.summarize(records)
    assert list(s)[:4] == ["overall", "single_object", "counting", "position"]
    assert s["single_object"] == 0.25 and s["counting"] == 0.0 and s["position"] == 1.0
    assert s["overall"] == pytest.approx((0.25 + 0.0 + 1.0) / 3)  # unweighted over tags
    assert s["image_accuracy"] == pytest.approx(3 / 8)
    assert s["n_images"] == 8 and s["n_prompts"] == 4
    assert s["prompt_accuracy"] == pytest.approx(2 / 4)  # p1 and p4 have a correct image
    assert s["counts"] == {"single_object": [1, 4], "counting": [0, 2], "position": [2, 2]}
    path = str(tmp_path / "results.jsonl")
    G.write_results(records, path)
    assert G.read_results(path) == records
    with pytest.raises(InputError):
        G.summarize([])


def test_masked_crop_over_grey():
    img = Image.fromarray(np.full((20, 30, 3), 200, np.uint8))
    mask = np.zeros((20, 30), bool)
    mask[5:10, 5:10] = True
    crop = np.asarray(G.masked_crop(img, [4, 4, 12, 12], mask))
    assert crop.shape == (8, 8, 3)
    assert (crop[1:6, 1:6] == 200).all() and (crop[0] == 0x99).all()  # #999 outside the mask
    with pytest.raises(InputError):
        G.masked_crop(img, [0, 0, 5, 5], np.zeros((5, 5), bool))
