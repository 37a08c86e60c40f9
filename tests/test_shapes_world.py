"""The shapes world: scene generation, texts, files, and the analytic detector."""

import base64
import io
import json
import os
import subprocess
import sys
import tarfile

import numpy as np
import pytest
from PIL import Image

from cheers.errors import InputError
from cheers.eval import geneval_rules, mmbench_scoring
from cheers.eval import shapes_detector as det
from cheers.shapes import dataset, scenes, texts

FIXTURE_METADATA = os.path.join(os.path.dirname(__file__), "fixtures", "geneval",
                                "evaluation_metadata.jsonl")


def _blur(img: np.ndarray, sigma: float) -> np.ndarray:
    r = int(np.ceil(3 * sigma))
    x = np.arange(-r, r + 1)
    k = np.exp(-(x**2) / (2 * sigma**2))
    k /= k.sum()
    a = img.astype(np.float32)
    p = np.pad(a, ((r, r), (0, 0), (0, 0)), mode="edge")
    a = sum(k[i] * p[i:i + a.shape[0]] for i in range(len(k)))
    p = np.pad(a, ((0, 0), (r, r), (0, 0)), mode="edge")
    return sum(k[i] * p[:, i:i + a.shape[1]] for i in range(len(k)))


def _degrade(img, rng, sigma=0.6, noise=6.0):
    """Mild damage of the kind a generative model does: slight blur, Gaussian noise."""
    a = _blur(img, sigma) + rng.normal(0.0, noise, img.shape)
    return np.clip(np.rint(a), 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------- world


def test_palette_is_genevals_colours_and_well_separated():
    assert scenes.COLOURS == geneval_rules.COLORS
    rgb = np.array([scenes.PALETTE[c] for c in scenes.COLOURS] + [scenes.BACKGROUND], float)
    d = np.linalg.norm(rgb[:, None] - rgb[None], axis=-1)
    np.fill_diagonal(d, np.inf)
    assert d.min() >= 85
    assert scenes.BACKGROUND not in scenes.PALETTE.values()
    assert len(scenes.SHAPES) >= 5


def test_scene_sampling_is_deterministic_per_seed():
    def draw(seed):
        rng = np.random.default_rng(seed)
        drawn = [scenes.sample_scene(rng) for _ in range(20)]
        return drawn, [texts.caption(s, rng) for s in drawn], \
            [texts.mmbench_questions(s, rng) for s in drawn], scenes.render(drawn[-1])

    a, b, c = draw(5), draw(5), draw(6)
    assert a[0] == b[0] and a[1] == b[1] and a[2] == b[2]
    assert np.array_equal(a[3], b[3])
    assert a[0] != c[0]
    assert texts.geneval_metadata(3, np.random.default_rng(1)) == \
        texts.geneval_metadata(3, np.random.default_rng(1))


def test_scenes_are_valid():
    rng = np.random.default_rng(0)
    for size in (64, 128, 256):
        for _ in range(40):
            scene = scenes.sample_scene(rng, size)
            assert 1 <= len(scene.objects) <= 4
            masks = scenes.object_masks(scene)
            total = np.sum(masks, axis=0)
            assert total.max() == 1  # no overlap
            for o, m in zip(scene.objects, masks):
                assert o.shape in scenes.SHAPES and o.colour in scenes.COLOURS
                x0, y0, x1, y1 = o.bbox
                assert 0 <= x0 < x1 <= size and 0 <= y0 < y1 <= size
                ys, xs = np.nonzero(m)
                assert (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) == o.bbox
                d = o.to_dict()
                assert d["class"] == o.shape and d["centre"] == [(x0 + x1) / 2, (y0 + y1) / 2]
            if scene.relation is not None:
                a, rel, b = scene.relation
                assert scenes.relation_set(scene.objects[a].bbox, scene.objects[b].bbox) == {rel}
            img = scenes.render(scene)
            assert img.shape == (size, size, 3) and img.dtype == np.uint8
    with pytest.raises(InputError):
        scenes.sample_scene(rng, 32)
    with pytest.raises(InputError):
        scenes.sample_scene(rng, 64, kind="nope")


def test_relation_rule_matches_scorer():
    rng = np.random.default_rng(3)
    for _ in range(500):
        a = np.sort(rng.uniform(0, 64, (2, 2)), axis=0).T.reshape(-1)[[0, 2, 1, 3]]
        b = np.sort(rng.uniform(0, 64, (2, 2)), axis=0).T.reshape(-1)[[0, 2, 1, 3]]
        assert scenes.relation_set(a, b) == geneval_rules.relative_position(a, b, 0.1)


def test_captions_name_every_object():
    rng = np.random.default_rng(4)
    for _ in range(200):
        scene = scenes.sample_scene(rng)
        text = texts.caption(scene, rng)
        for o in scene.objects:
            assert o.shape in text or texts.PLURALS[o.shape] in text
    # the GenEval phrasings appear among the captions
    seen = {texts.caption(scenes.sample_scene(rng, kind="single"), rng) for _ in range(200)}
    assert any(t.startswith("a photo of a ") and len(t.split()) == 5 for t in seen)
    assert texts.noun_phrase("star", 1, "orange") == "an orange star"
    assert texts.noun_phrase("cross", 3) == "three crosses"


def test_mmbench_questions_are_answerable():
    rng = np.random.default_rng(5)
    cats = set()
    for _ in range(200):
        scene = scenes.sample_scene(rng)
        for q in texts.mmbench_questions(scene, rng):
            cats.add(q["category"])
            assert 2 <= len(q["options"]) <= 4 and len(set(q["options"])) == len(q["options"])
            assert q["l2-category"] == texts.MMBENCH_L2[q["category"]]
            truth = q[q["answer"]]
            objs = scene.objects
            if q["category"] == "colour":
                shape = next(s for s in scenes.SHAPES if s in q["question"])
                assert [o.colour for o in objs if o.shape == shape] == [truth]
            elif q["category"] == "shape":
                assert truth in [o.shape for o in objs]
            elif q["category"] == "count":
                plural = next(p for p in texts.PLURALS.values() if f" {p} " in q["question"])
                shape = next(s for s, p in texts.PLURALS.items() if p == plural)
                assert int(truth) == sum(o.shape == shape for o in objs)
            elif q["category"] == "existence" and q["question"].startswith("Which"):
                colour, shape = truth.split()
                assert any((o.colour, o.shape) == (colour, shape) for o in objs)
    assert cats == set(texts.MMBENCH_L2)
    assert set(texts.MMBENCH_L2.values()) <= set(mmbench_scoring.MMB_ABBRS)  # MMBench's own L2 names


def test_text_samples():
    rng = np.random.default_rng(6)
    samples = [texts.text_sample(rng) for _ in range(50)]
    assert all(isinstance(t, str) and len(t) > 5 for t in samples)
    assert len(set(samples)) > 10


def test_geneval_metadata_has_the_official_shape():
    official = [json.loads(line) for line in open(FIXTURE_METADATA)]

    def signature(r):  # key order and include/exclude layouts, not the names
        return (list(r), [sorted(c) for c in r["include"]],
                [sorted(c) for c in r.get("exclude", [])],
                [c["position"][1] for c in r["include"] if "position" in c])

    official_sigs = {r["tag"]: {json.dumps(signature(x)) for x in official if x["tag"] == r["tag"]}
                     for r in official}
    ours = texts.geneval_metadata(20, np.random.default_rng(7))
    assert [r["tag"] for r in ours[::20]] == list(texts.GENEVAL_TAGS)
    for r in ours:
        assert json.dumps(signature(r)) in official_sigs[r["tag"]], r
        classes = [c["class"] for c in r["include"]]
        assert all(c in scenes.SHAPES for c in classes)
        assert len(set(classes)) == len(classes)
        p = r["prompt"]
        if r["tag"] == "counting":
            n = r["include"][0]["count"]
            assert r["exclude"] == [{"class": classes[0], "count": n + 1}]
            assert p == f"a photo of {texts.NUMBER_WORDS[n]} {texts.PLURALS[classes[0]]}"
        elif r["tag"] == "position":
            rel, target = r["include"][1]["position"]
            assert target == 0 and rel in scenes.RELATIONS
            assert p == f"a photo of a {classes[1]} {rel} a {classes[0]}"
        elif r["tag"] == "colors":
            c = r["include"][0]
            assert p == f"a photo of {texts.article(c['color'])} {c['color']} {c['class']}"
        elif r["tag"] == "color_attr":
            a, b = r["include"]
            assert a["color"] != b["color"]
            assert p == (f"a photo of {texts.article(a['color'])} {a['color']} {a['class']} and "
                         f"{texts.article(b['color'])} {b['color']} {b['class']}")
        else:
            assert p == "a photo of " + " and ".join(f"a {c}" for c in classes)


# --------------------------------------------------------------------------- detector


def test_label_components_matches_flood_fill():
    rng = np.random.default_rng(8)
    for _ in range(20):
        mask = rng.random((24, 31)) < 0.45
        labels, n = det.label_components(mask)
        # reference: breadth-first flood fill with 8-connectivity
        ref = np.zeros(mask.shape, int)
        k = 0
        for y, x in zip(*np.nonzero(mask)):
            if ref[y, x]:
                continue
            k += 1
            stack = [(y, x)]
            ref[y, x] = k
            while stack:
                cy, cx = stack.pop()
                for dy in (-1, 0, 1):
                    for dx in (-1, 0, 1):
                        ny, nx = cy + dy, cx + dx
                        if 0 <= ny < 24 and 0 <= nx < 31 and mask[ny, nx] and not ref[ny, nx]:
                            ref[ny, nx] = k
                            stack.append((ny, nx))
        assert n == k
        assert np.array_equal(labels, ref)  # both number components in raster order


def _recovery(n, size, seed, degrade=False):
    """(fraction of scenes recovered exactly, fraction recovered with every score > 0.9)."""
    rng = np.random.default_rng(seed)
    ok = confident = 0
    for _ in range(n):
        scene = scenes.sample_scene(rng, size)
        img = scenes.render(scene)
        if degrade:
            img = _degrade(img, rng)
        dets = det.detect(img)
        ok += det.matches_ground_truth(dets, scene.objects)
        confident += det.matches_ground_truth(dets, scene.objects, min_score=0.9)
    return ok / n, confident / n


def test_detector_recovers_ground_truth():
    ok, confident = _recovery(300, 64, seed=100)
    assert ok >= 0.99
    assert confident >= 0.99  # confident enough for GenEval's counting threshold
    assert _recovery(20, 256, seed=102)[0] >= 0.99


def test_detector_survives_noise_and_blur():
    assert _recovery(300, 64, seed=103, degrade=True)[0] >= 0.99
    assert _recovery(20, 128, seed=104, degrade=True)[0] >= 0.99


def test_detector_output_format_and_inputs():
    rng = np.random.default_rng(9)
    scene = scenes.sample_scene(rng, 64, kind="two")
    img = scenes.render(scene)
    dets = det.detect(img)
    assert len(dets) == 2
    for d in dets:
        assert {"class", "colour", "box", "mask", "score"} <= set(d)
        assert d["mask"].shape == (64, 64) and d["mask"].dtype == bool
        assert 0.0 <= d["score"] <= 1.0
        x0, y0, x1, y1 = d["box"]
        ys, xs = np.nonzero(d["mask"])
        assert (x0, y0, x1, y1) == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
    assert [d["score"] for d in dets] == sorted((d["score"] for d in dets), reverse=True)
    from_pil = det.detect(Image.fromarray(img))
    from_float = det.detect(img.astype(np.float32) / 255.0)
    assert [d["box"] for d in from_pil] == [d["box"] for d in dets] == [d["box"] for d in from_float]
    assert det.detect(np.full((64, 64, 3), 128, np.uint8)) == []
    with pytest.raises(InputError):
        det.detect(np.zeros((64, 64)))
    with pytest.raises(InputError):
        det.detect(np.full((8, 8, 3), 2.0))


def test_detector_splits_touching_objects_of_two_colours():
    obj_a = scenes.make_object("square", "red", (20.0, 32.0), 20, 64, 64)
    obj_b = scenes.make_object("square", "blue", (40.0, 32.0), 20, 64, 64)  # shares an edge
    scene = scenes.Scene(64, 64, (obj_a, obj_b), "two")
    dets = det.detect(scenes.render(scene))
    assert sorted((d["class"], d["colour"]) for d in dets) == [("square", "blue"), ("square", "red")]


# --------------------------------------------------------------------------- files


def test_geneval_reference_images_score_perfectly(tmp_path):
    meta = dataset.write_geneval_metadata(str(tmp_path / "meta.jsonl"), 3, seed=11)
    assert dataset.read_geneval_metadata(str(tmp_path / "meta.jsonl")) == meta
    dataset.write_geneval_reference(str(tmp_path / "images"), meta, seed=11, n_images=2)
    assert sorted(os.listdir(tmp_path / "images" / "00000")) == ["metadata.jsonl", "samples"]
    records = geneval_rules.evaluate_folder(str(tmp_path / "images"), det.detect)
    assert len(records) == 6 * 3 * 2
    assert all(r["correct"] for r in records), [r for r in records if not r["correct"]]
    assert geneval_rules.summarize(records)["overall"] == 1.0


def test_shards_schema_and_determinism(tmp_path):
    import webdataset as wds

    mix = {"t2i": 2, "i2t": 2, "text": 1}
    paths = dataset.write_shards(str(tmp_path / "a"), 30, seed=3, image_size=64, mix=mix,
                                 samples_per_shard=12)
    assert [os.path.basename(p) for p in paths] == [f"shapes-{i:06d}.tar" for i in range(3)]
    again = dataset.write_shards(str(tmp_path / "b"), 30, seed=3, image_size=64, mix=mix,
                                 samples_per_shard=7)
    other = dataset.write_shards(str(tmp_path / "c"), 30, seed=4, image_size=64, mix=mix,
                                 samples_per_shard=12)
    assert open(paths[0], "rb").read() == \
        open(dataset.write_shards(str(tmp_path / "d"), 30, seed=3, mix=mix, samples_per_shard=12)[0],
             "rb").read()

    def load(ps):
        return {s["__key__"]: s for s in wds.WebDataset(ps, shardshuffle=False)}

    a, b, c = load(paths), load(again), load(other)
    assert list(a) == [f"{i:08d}" for i in range(30)]
    assert all(a[k]["json"] == b[k]["json"] and a[k].get("png") == b[k].get("png") for k in a)
    assert any(a[k]["json"] != c[k]["json"] for k in a)
    tasks = []
    for s in a.values():
        rec = json.loads(s["json"])
        tasks.append(rec["task"])
        assert isinstance(rec["text"], str) and rec["text"]
        if rec["task"] == "text":
            assert "png" not in s and rec["width"] == rec["height"] == 0
            continue
        img = np.asarray(Image.open(io.BytesIO(s["png"])))
        assert img.shape == (rec["height"], rec["width"], 3) == (64, 64, 3)
        if rec["task"] == "i2t":
            conv = rec["conversations"]
            assert [t["from"] for t in conv] == ["human", "gpt"]
            assert conv[0]["value"].startswith("<image>\n") and conv[1]["value"]
        else:
            assert "conversations" not in rec
    assert (tasks.count("t2i"), tasks.count("i2t"), tasks.count("text")) == (12, 12, 6)
    manifest = json.load(open(tmp_path / "a" / "manifest.json"))
    assert manifest["tasks"] == {"t2i": 12, "i2t": 12, "text": 6}
    with tarfile.open(paths[0]) as tf:
        assert all(m.mtime == 0 for m in tf.getmembers())
    with pytest.raises(InputError):
        dataset.write_shards(str(tmp_path / "e"), 5, mix={"video": 1.0})


@pytest.mark.slow
def test_shards_written_by_workers_are_the_same_bytes(tmp_path):
    kw = dict(seed=3, image_size=64, samples_per_shard=7, i2t_turns=2)
    serial = dataset.write_shards(str(tmp_path / "a"), 30, **kw)
    written = []
    parallel = dataset.write_shards(str(tmp_path / "b"), 30, workers=2, progress=written.append, **kw)
    assert [os.path.basename(p) for p in parallel] == [os.path.basename(p) for p in serial]
    for a, b in zip(serial, parallel):
        assert open(a, "rb").read() == open(b, "rb").read()
    assert (tmp_path / "a" / "manifest.json").read_text() == (tmp_path / "b" / "manifest.json").read_text()
    assert sorted(written) == [2, 7, 7, 7, 7]
    with pytest.raises(InputError, match="workers=0"):
        dataset.write_shards(str(tmp_path / "c"), 30, workers=0)
    # a script that calls it at import time, with no `if __name__ == "__main__"` guard
    script = tmp_path / "no_guard.py"
    script.write_text("from cheers.shapes.dataset import write_shards\n"
                      f"write_shards({str(tmp_path / 'e')!r}, 30, workers=2, **{kw!r})\n")
    subprocess.run([sys.executable, str(script)], check=True, timeout=120, capture_output=True)
    assert open(tmp_path / "e" / "shapes-000004.tar", "rb").read() == open(serial[-1], "rb").read()
    with pytest.raises(InputError, match="i2t_turns"):  # refused before any worker starts
        dataset.write_shards(str(tmp_path / "d"), 30, workers=2, i2t_turns=0)


def test_chat_samples_ask_distinct_questions():
    for i in range(40):
        one, _ = dataset.make_sample("i2t", np.random.default_rng([5, i]))
        rec, img = dataset.make_sample("i2t", np.random.default_rng([5, i]), i2t_turns=3)
        conv = rec["conversations"]
        assert conv[:2] == one["conversations"]  # the first turn is the single-turn sample's
        assert [t["from"] for t in conv] == ["human", "gpt"] * (len(conv) // 2) and 2 <= len(conv) // 2 <= 3
        questions = [t["value"] for t in conv[::2]]
        assert len(set(questions)) == len(questions) and all(t["value"] for t in conv[1::2])
        assert questions[0].startswith("<image>\n") and not any("<image>" in q for q in questions[1:])
    with pytest.raises(InputError, match="i2t_turns"):
        dataset.make_sample("i2t", np.random.default_rng(0), i2t_turns=0)


def test_multiple_choice_answered_by_the_option_text_maps_back_to_its_letter():
    from cheers.eval.mmbench_scoring import can_infer

    seen = 0
    for i in range(60):
        record, _ = dataset.make_sample("i2t", np.random.default_rng([6, i]), i2t_turns=3)
        for q, a in _pairs(record):
            choices = dict(line.split(". ", 1) for line in q.splitlines() if line[:3] in ("A. ", "B. ", "C. ", "D. "))
            if not choices:  # an open question
                continue
            assert a in choices.values() and a not in choices  # the option's text, never its letter
            assert choices[can_infer(a, choices)] == a  # VLMEvalKit's rules read the letter back
            seen += 1
    assert seen > 30


def _pairs(record: dict) -> list[tuple[str, str]]:
    conv = record["conversations"]
    return [(conv[k]["value"], conv[k + 1]["value"]) for k in range(0, len(conv), 2)]


def test_mmbench_tsv_and_rotations(tmp_path):
    path = str(tmp_path / "shapes_mmbench.tsv")
    rows = dataset.write_mmbench_tsv(path, 25, seed=12)
    with open(path) as fp:
        assert fp.readline().rstrip("\n").split("\t") == list(dataset.MMBENCH_COLUMNS)
    back = mmbench_scoring.read_tsv(path)
    assert len(back) == len(rows)
    by_index = {r["index"]: r for r in back}
    mains = [r for r in back if r["index"] < dataset.CIRCULAR_OFFSET]
    assert [r["index"] for r in mains] == list(range(25))
    assert {r["category"] for r in mains} == set(texts.MMBENCH_L2)
    for main in mains:
        letters = [ch for ch in "ABCD" if main[ch] != ""]
        n = len(letters)
        opts = [main[ch] for ch in letters]
        truth = main[main["answer"]]
        img = Image.open(io.BytesIO(base64.b64decode(main["image"])))
        assert img.format == "PNG" and img.size == (64, 64)
        for k in range(1, n):
            rot = by_index[main["index"] + k * 1_000_000]
            assert [rot[ch] for ch in letters] == opts[k:] + opts[:k]
            assert rot[rot["answer"]] == truth
            assert all(rot[ch] == "" for ch in "ABCD"[n:])
            assert rot["image"] == main["image"] and rot["category"] == main["category"]
        assert main["index"] + n * 1_000_000 not in by_index
    # the TSV scores perfectly with the right answers, and through every rotation
    right = {r["index"]: r["answer"] for r in back}
    assert mmbench_scoring.evaluate_mmbench(back, right)["acc"]["Overall"] == 1.0
    always_a = {r["index"]: "A" for r in back}
    assert mmbench_scoring.evaluate_mmbench(back, always_a)["acc"]["Overall"] == 0.0
    assert dataset.mmbench_rows(3, seed=12) == dataset.mmbench_rows(3, seed=12)
    assert dataset.mmbench_rows(3, seed=12) != dataset.mmbench_rows(3, seed=13)


def test_open_questions_are_the_training_phrasing_and_answerable():
    rng = np.random.default_rng(8)
    seen = set()
    for _ in range(100):
        scene = scenes.sample_scene(rng, 64)
        objs = scene.objects
        qs = texts.open_questions(scene)
        assert len({q["question"] for q in qs}) == len(qs)  # each asked once
        for q in qs:
            seen.add(q["category"])
            words = q["question"].rstrip("?").split()
            if q["category"] == "colour":  # "What color is the {shape}?": that shape is drawn once
                shape = words[-1]
                assert [o.colour for o in objs if o.shape == shape] == [q["answer"]]
            elif q["category"] == "shape":  # "What shape is the {colour} object?"
                colour = words[-2]
                assert [o.shape for o in objs if o.colour == colour] == [q["answer"]]
            elif q["question"] == texts.TOTAL_COUNT_QUESTION:
                assert q["answer"] == texts.NUMBER_WORDS[len(objs)]
            else:  # "How many {plural} are there?"
                shape = next(s for s, p in texts.PLURALS.items() if p == words[2])
                assert q["answer"] == texts.NUMBER_WORDS[sum(o.shape == shape for o in objs)]
        # the training's open questions come from the same templates
        q, a = texts.open_question(scene, rng)
        assert q.startswith(("Describe", "What is in", "Write")) or {"question": q, "answer": a} in [
            {k: x[k] for k in ("question", "answer")} for x in qs]
    assert seen == {"colour", "shape", "count"}


def test_open_question_rows_take_categories_in_turn():
    from cheers.shapes.evaluate import open_answer

    rows = dataset.open_question_rows(9, seed=4)
    assert [r["category"] for r in rows] == ["colour", "shape", "count"] * 3
    assert rows == dataset.open_question_rows(9, seed=4)
    assert rows != dataset.open_question_rows(9, seed=5)
    img = Image.open(io.BytesIO(base64.b64decode(rows[0]["image"])))
    assert img.size == (64, 64)
    assert open_answer("Two.") == open_answer("2") == "2" and open_answer(" Red circle") == "red"
    assert open_answer("") == ""
    with pytest.raises(InputError):
        dataset.open_question_rows(0)


def test_object_size_sets_the_size_range_and_the_detector_reads_both_worlds(tmp_path):
    rng = np.random.default_rng(3)
    for size in ("standard", "large"):
        lo, hi = scenes.OBJECT_SIZES[size][1]
        for _ in range(40):
            scene = scenes.sample_scene(rng, 64, "single", object_size=size)
            (obj,) = scene.objects
            assert lo * 64 - 1e-6 <= obj.size <= hi * 64 + 1e-6
            found = det.detect(Image.fromarray(scenes.render(scene)))
            assert [(d["class"], d["colour"]) for d in found] == [(obj.shape, obj.colour)]
    # a large single object spans at least two 16 px tokens a side
    assert scenes.OBJECT_SIZES["large"][1][0] * 64 >= 28
    scene = scenes.sample_scene(rng, 64, "two", object_size="large")
    assert len(scene.objects) == 2
    with pytest.raises(InputError, match="object_size='huge'"):
        scenes.sample_scene(rng, 64, "single", object_size="huge")
    dataset.write_shards(str(tmp_path), n_samples=3, object_size="large")
    assert json.loads((tmp_path / "manifest.json").read_text())["object_size"] == "large"
    with pytest.raises(InputError, match="object_size"):
        dataset.write_shards(str(tmp_path / "bad"), n_samples=3, object_size="huge")
    assert not (tmp_path / "bad").exists() or not any((tmp_path / "bad").iterdir())
