"""Shapes-world benchmark sets in the official formats, and a VQA model for them.

- ``write_dpg_set``: DPG-Bench's layout (``prompts/<id>.txt`` + ``dpg_bench.csv``) for
  shapes prompts, with entity, colour, count and spatial-relation questions and their
  dependencies (attributes depend on their entity; a relation on both entities).
- ``ShapesVQA``: answers those questions ('yes' / 'no') from the analytic shapes detector,
  in place of mPLUG.
- ``write_mme_tsv``: an MME-format TSV (two yes/no questions per image, one true, one
  false; subtasks existence, count, color, position), images deduplicated the VLMEvalKit
  way (the second row's image cell holds the first row's index).

The GenEval metadata and the MMBench TSV of the shapes world are in
``cheers.shapes.dataset`` (``write_geneval_metadata``, ``write_mmbench_tsv``).
"""

from __future__ import annotations

import base64
import csv
import re
from pathlib import Path

import numpy as np

from cheers.errors import InputError
from cheers.eval.dpg import COLUMNS as DPG_COLUMNS
from cheers.eval.geneval_rules import relative_position
from cheers.shapes.scenes import COLOURS, INVERSE_RELATION, SHAPES, render, sample_scene
from cheers.shapes.texts import NUMBER_WORDS, PLURALS, noun_phrase

MME_COLUMNS = ("index", "image", "question", "answer", "category", "image_path")
MME_SUFFIX = " Please answer yes or no."
_WORD_NUMBERS = {w: n for n, w in NUMBER_WORDS.items()}
_SINGULAR = {p: s for s, p in PLURALS.items()}
_STREAM_DPG, _STREAM_MME = 21, 22


def _groups(scene) -> list[tuple[str, str, int]] | None:
    """(shape, colour, count) per shape, or None when one shape comes in several colours."""
    out: dict[str, tuple[str, int]] = {}
    for o in scene.objects:
        colour, n = out.get(o.shape, (o.colour, 0))
        if colour != o.colour:
            return None
        out[o.shape] = (colour, n + 1)
    return [(s, c, n) for s, (c, n) in out.items()]


def dpg_item(scene) -> tuple[str, list[dict]] | None:
    """(prompt, question rows) for a scene, or None when its shapes are not uniquely named."""
    groups = _groups(scene)
    if groups is None:
        return None
    if scene.relation is not None:
        a, rel, b = scene.relation
        oa, ob = scene.objects[a], scene.objects[b]
        prompt = f"a photo of {noun_phrase(oa.shape, 1, oa.colour)} {rel} {noun_phrase(ob.shape, 1, ob.colour)}"
    else:
        prompt = "a photo of " + " and ".join(noun_phrase(s, n, c) for s, c, n in groups)
    rows, entity = [], {}

    def add(tuple_text, question, parents, broad, detailed):
        rows.append(
            {
                "proposition_id": len(rows) + 1,
                "dependency": ",".join(map(str, parents)) or "0",
                "category_broad": broad,
                "category_detailed": detailed,
                "tuple": tuple_text,
                "question_natural_language": question,
            }
        )
        return len(rows)

    for s, _, _ in groups:
        entity[s] = add(f"entity - whole ({s})", f"Is there a {s}?", [], "entity", "whole")
    for s, c, n in groups:
        add(f"attribute - color ({s}, {c})", f"Is the {s} {c}?", [entity[s]], "attribute", "color")
        if n > 1:
            add(
                f"other - count ({PLURALS[s]}, =={n})",
                f"Are there {NUMBER_WORDS[n]} {PLURALS[s]}?",
                [entity[s]],
                "other",
                "count",
            )
    if scene.relation is not None:
        sa, sb = scene.objects[a].shape, scene.objects[b].shape
        add(
            f"relation - spatial ({sa}, {sb}, {rel})",
            f"Is the {sa} {rel} the {sb}?",
            [entity[sa], entity[sb]],
            "relation",
            "spatial",
        )
    return prompt, rows


def write_dpg_set(out: str | Path, n: int, seed: int = 1, image_size: int = 64) -> Path:
    """``out/prompts/<id>.txt`` and ``out/dpg_bench.csv`` for ``n`` shapes prompts.

    The CSV starts with a header-like dummy row because the official reader skips the
    first data row; returns the CSV path."""
    out = Path(out)
    (out / "prompts").mkdir(parents=True, exist_ok=True)
    records, i, tries = [], 0, 0
    kinds = ("single", "two", "position", "counting")
    while len(records) < n:
        rng = np.random.default_rng([seed, _STREAM_DPG, tries])
        tries += 1
        got = dpg_item(sample_scene(rng, image_size, kinds[i % len(kinds)]))
        if got is None:
            continue
        records.append((f"shapes{i:04d}", *got))
        i += 1
    path = out / "dpg_bench.csv"
    with open(path, "w", newline="", encoding="utf-8") as fp:
        w = csv.DictWriter(fp, fieldnames=list(DPG_COLUMNS))
        w.writeheader()
        w.writerow(
            {c: "skipped by the official reader" for c in DPG_COLUMNS}
            | {"item_id": "_", "proposition_id": 0, "dependency": "0"}
        )
        for item_id, prompt, rows in records:
            (out / "prompts" / f"{item_id}.txt").write_text(prompt + "\n")
            for r in rows:
                w.writerow({"item_id": item_id, "text": prompt, "keywords": "", **r})
    return path


class ShapesVQA:
    """Yes/no answers to the shapes DPG questions from the analytic detector's findings
    (detections scoring above ``threshold``, as GenEval keeps them)."""

    _PATTERNS = (
        ("entity", re.compile(r"^Is there an? (\w+)\?$")),
        ("colour", re.compile(r"^Is the (\w+) (\w+)\?$")),
        ("count", re.compile(r"^Are there (\w+) (\w+)\?$")),
        ("relation", re.compile(r"^Is the (\w+) (left of|right of|above|below) the (\w+)\?$")),
    )

    def __init__(self, threshold: float = 0.3):
        self.threshold = threshold

    def __call__(self, image, question: str) -> str:
        from cheers.eval.shapes_detector import detect

        dets = [d for d in detect(image) if d["score"] > self.threshold]
        by = {}
        for d in dets:
            by.setdefault(d["class"], []).append(d)
        q = question.strip()
        for kind, pat in self._PATTERNS[::-1]:  # relation before colour: both start "Is the"
            m = pat.match(q)
            if not m:
                continue
            if kind == "entity":
                ok = m.group(1) in by
            elif kind == "colour":
                ok = any(d["colour"] == m.group(2) for d in by.get(m.group(1), []))
            elif kind == "count":
                shape = _SINGULAR.get(m.group(2))
                ok = shape is not None and len(by.get(shape, [])) == _WORD_NUMBERS.get(
                    m.group(1), -1
                )
            else:
                ok = any(
                    m.group(2) in relative_position(x["box"], y["box"])
                    for x in by.get(m.group(1), [])
                    for y in by.get(m.group(3), [])
                )
            return "yes" if ok else "no"
        raise InputError(f"ShapesVQA cannot read the question {question!r}")


def _mme_pair(category: str, scene, rng) -> tuple[str, str] | None:
    """(true question, false question) about a scene for one MME subtask, or None."""
    objs = scene.objects
    groups = _groups(scene)
    if category == "existence":
        o = objs[int(rng.integers(len(objs)))]
        keys = {(p.shape, p.colour) for p in objs}
        absent = [(s, c) for s in SHAPES for c in COLOURS if (s, c) not in keys]
        s, c = absent[int(rng.integers(len(absent)))]
        return (
            f"Is there {noun_phrase(o.shape, 1, o.colour)} in this image?",
            f"Is there {noun_phrase(s, 1, c)} in this image?",
        )
    if groups is None:
        return None
    s, c, n = groups[int(rng.integers(len(groups)))]
    if category == "count":
        wrong = int(rng.choice([k for k in range(1, 5) if k != n]))
        q = f"Is the number of {PLURALS[s]} in the image {{}}?"
        return q.format(NUMBER_WORDS[n]), q.format(NUMBER_WORDS[wrong])
    if category == "color":
        if n > 1:
            return None
        wrong = str(rng.choice([k for k in COLOURS if k != c]))
        return f"Is the {s} in the image {c}?", f"Is the {s} in the image {wrong}?"
    if scene.relation is None:
        return None
    a, rel, b = scene.relation
    sa, sb = objs[a].shape, objs[b].shape
    return f"Is the {sa} {rel} the {sb}?", f"Is the {sa} {INVERSE_RELATION[rel]} the {sb}?"


def mme_rows(n_images: int, seed: int = 1, image_size: int = 64) -> list[dict]:
    """Rows of a shapes MME TSV: per image two questions (answers Yes, No, in random order)."""
    from cheers.shapes.dataset import png_bytes

    cats = ("existence", "count", "color", "position")
    rows, i, tries = [], 0, 0
    while i < n_images:
        rng = np.random.default_rng([seed, _STREAM_MME, tries])
        tries += 1
        cat = cats[i % len(cats)]
        scene = sample_scene(rng, image_size, "position" if cat == "position" else None)
        pair = _mme_pair(cat, scene, rng)
        if pair is None:
            continue
        image = base64.b64encode(png_bytes(render(scene))).decode("ascii")
        qa = [(pair[0], "Yes"), (pair[1], "No")]
        if rng.random() < 0.5:
            qa = qa[::-1]
        first = len(rows)
        for k, (q, a) in enumerate(qa):
            rows.append(
                {
                    "index": first + k,
                    "image": image if k == 0 else str(first),
                    "question": q + MME_SUFFIX,
                    "answer": a,
                    "category": cat,
                    "image_path": f"{cat}/{i:05d}.png",
                }
            )
        i += 1
    return rows


def write_mme_tsv(
    path: str | Path, n_images: int, seed: int = 1, image_size: int = 64
) -> list[dict]:
    from cheers.eval.tables import write_tsv

    rows = mme_rows(n_images, seed, image_size)
    write_tsv(rows, str(path), MME_COLUMNS)
    return rows


__all__ = ["ShapesVQA", "dpg_item", "mme_rows", "write_dpg_set", "write_mme_tsv"]


def shapes_summary(geneval_scores: dict, dpg_summary: dict, mmbench_acc: dict, mme_result: dict) -> dict:
    """``cheers eval shapes``'s ``summary.json``: each benchmark in its own official scale, named
    beside it (GenEval and MMBench fractions, DPG-Bench percent, MME points)."""
    subtasks = {c: mme_result["scores"][c] for c in sorted(mme_result["details"])}
    return {
        "geneval": {"overall": geneval_scores["overall"], "scale": "fraction of images judged correct, 0-1"},
        "dpg": {"overall": dpg_summary["overall"],
                "scale": "percent of questions answered yes after the dependency rule, 0-100",
                # the official rule: categories read each grid's last tile alone, before the dependency
                # rule, so they see a quarter of the images and can sit at 0 beside a non-zero overall
                "categories": {k: v for k, v in dpg_summary.items() if k != "overall"},
                "categories_scale": "percent yes on each grid's last tile, before the dependency rule, 0-100"},
        "mmbench": {"overall": mmbench_acc["Overall"], "scale": "CircularEval accuracy, 0-1"},
        "mme": {"perception": sum(subtasks.values()), "subtasks": subtasks,
                "scale": f"MME points: acc + acc+ in percent per subtask, summed over the {len(subtasks)} "
                         f"perception subtasks asked here, 0-{200 * len(subtasks)}"},
    }

