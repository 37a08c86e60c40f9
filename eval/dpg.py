"""DPG-Bench: 2x2-grid generation and VQA scoring with dependency zeroing.

Our implementation of ELLA's ``dpg_bench/compute_dpg_bench.py`` (TencentQQGYLab/ELLA at
025f650). Facts of the official scorer, reproduced here:

- ``dpg_bench.csv`` columns ``item_id, text, keywords, proposition_id, dependency,
  category_broad, category_detailed, tuple, question_natural_language``; ``dependency``
  is a comma-separated list of parent ``proposition_id``s, ``0`` for none. The official
  reader skips the first data row (``if i == 0: continue``); ``skip_first_row`` keeps that.
- Each image ``<item_id>.png`` is a 2x2 grid of ``resolution`` px tiles, read top-left,
  top-right, bottom-left, bottom-right (``pic_num`` 4 in ``dist_eval.sh``). On each tile
  every question is asked; a question scores 1 when the VQA answer is exactly ``'yes'``.
- Dependency zeroing per tile, in the CSV's question order and in place: a question whose
  parent scored 0 (already zeroed parents included) scores 0. A parent id the item does
  not have makes the official scorer fail on that image, which it then leaves out.
- Tile score = mean over questions; image score = mean over tiles; DPG-Bench score =
  mean over images x 100. Category scores use the last tile's scores *before* zeroing,
  category = the ``tuple`` text before ``(``, L1 = its part before ``-``.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cheers.errors import InputError

COLUMNS = (
    "item_id",
    "text",
    "keywords",
    "proposition_id",
    "dependency",
    "category_broad",
    "category_detailed",
    "tuple",
    "question_natural_language",
)


@dataclass
class Item:
    """The questions of one prompt, in CSV order."""

    qids: list[int] = field(default_factory=list)
    questions: dict[int, str] = field(default_factory=dict)
    tuples: dict[int, str] = field(default_factory=dict)
    parents: dict[int, list[int]] = field(default_factory=dict)


def read_questions(path: str | Path, skip_first_row: bool = True) -> dict[str, Item]:
    """``{item_id: Item}`` from a DPG-Bench CSV; bad rows raise InputError naming the row."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"DPG-Bench CSV not found: {path}")
    with open(path, newline="", encoding="utf-8") as fp:
        reader = csv.DictReader(fp)
        missing = [
            c
            for c in (
                "item_id",
                "proposition_id",
                "dependency",
                "tuple",
                "question_natural_language",
            )
            if c not in (reader.fieldnames or [])
        ]
        if missing:
            raise InputError(f"DPG-Bench CSV {path} lacks column(s) {missing}")
        rows = list(reader)
    items: dict[str, Item] = {}
    for i, row in enumerate(rows):
        if i == 0 and skip_first_row:
            continue
        where = f"{path}: row {i + 1} (item {row['item_id']!r})"
        try:
            qid = int(row["proposition_id"])
            parents = [int(d.strip()) for d in row["dependency"].split(",")]
        except ValueError as e:
            raise InputError(f"{where}: proposition_id / dependency must be integers ({e})") from e
        item = items.setdefault(row["item_id"], Item())
        item.qids.append(qid)
        item.questions[qid] = row["question_natural_language"]
        item.tuples[qid] = row["tuple"]
        item.parents[qid] = parents
    return items


def zero_dependents(scores: dict[int, float], parents: dict[int, list[int]]) -> dict[int, float]:
    """Scores after the official dependency rule (in place, in ``parents``' order).

    Raises KeyError for a parent the item does not have, as the official code does."""
    out = dict(scores)
    for qid, ps in parents.items():
        if any(p != 0 and out[p] == 0 for p in ps):
            out[qid] = 0.0
    return out


def grid_tiles(image, resolution: int | None = None, pic_num: int = 4) -> list:
    """The first ``pic_num`` tiles of a 2x2 grid (tile side ``resolution``, default half
    the image width), in the official order."""
    r = resolution or image.width // 2
    boxes = [(0, 0, r, r), (r, 0, 2 * r, r), (0, r, r, 2 * r), (r, r, 2 * r, 2 * r)]
    if not 1 <= pic_num <= 4:
        raise InputError(f"pic_num must be 1..4, got {pic_num}")
    return [image.crop(b) for b in boxes[:pic_num]]


def score_image(
    image,
    item: Item,
    vqa: Callable[[object, str], str],
    *,
    resolution: int | None = None,
    pic_num: int = 4,
) -> dict:
    """One image: ``{"score", "tile_scores", "answers" (per tile), "raw_last" (last tile's
    scores before zeroing)}``."""
    tile_scores, answers, raw = [], [], {}
    for tile in grid_tiles(image, resolution, pic_num):
        got = {q: vqa(tile, item.questions[q]) for q in item.qids}
        raw = {q: float(a == "yes") for q, a in got.items()}
        zeroed = zero_dependents(raw, {q: item.parents[q] for q in item.qids})
        tile_scores.append(sum(zeroed.values()) / len(zeroed))
        answers.append(got)
    return {
        "score": sum(tile_scores) / len(tile_scores),
        "tile_scores": tile_scores,
        "answers": answers,
        "raw_last": raw,
    }


def category_of(tuple_text: str) -> tuple[str, str]:
    """(L1, L2) category of a question: 'entity - whole (cat)' -> ('entity', 'entity - whole')."""
    l2 = tuple_text.split("(")[0].strip()
    return l2.split("-")[0].strip(), l2


def score_folder(
    image_dir: str | Path,
    items: dict[str, Item],
    vqa: Callable[[object, str], str],
    *,
    resolution: int | None = None,
    pic_num: int = 4,
    progress: bool = True,
) -> dict:
    """Score every ``<item_id>.png|jpg`` of ``image_dir``.

    Returns ``{"records": per image, "summary": {"overall", <L1>: x, ...} (percent),
    "l2": {<L2>: x}, "skipped": [(file, reason)]}``.
    """
    from PIL import Image
    from tqdm import tqdm

    image_dir = Path(image_dir)
    if not image_dir.is_dir():
        raise InputError(f"DPG-Bench image folder not found: {image_dir}")
    files = sorted(p for p in image_dir.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
    records, skipped = [], []
    per_cat: dict[str, list[float]] = {}
    for path in tqdm(files, desc="dpg", disable=not progress):
        item = items.get(path.name.split(".")[0])
        if item is None:
            skipped.append((path.name, "no questions for this item id"))
            continue
        try:
            res = score_image(
                Image.open(path).convert("RGB"), item, vqa, resolution=resolution, pic_num=pic_num
            )
        except KeyError as e:  # a parent id the item lacks: the official scorer drops the image
            skipped.append((path.name, f"dependency on missing question {e}"))
            continue
        records.append(
            {
                "file": path.name,
                "score": res["score"],
                "tile_scores": res["tile_scores"],
                "answers": [{str(k): v for k, v in a.items()} for a in res["answers"]],
            }
        )
        for q, s in res["raw_last"].items():
            per_cat.setdefault(item.tuples[q].split("(")[0].strip(), []).append(s)
    if not records:
        raise InputError(f"no DPG-Bench image in {image_dir} could be scored ({skipped[:3]})")
    l1: dict[str, list[float]] = {}
    for cat, vals in per_cat.items():
        l1.setdefault(category_of(cat)[0], []).extend(vals)
    summary = {"overall": float(np.mean([r["score"] for r in records]) * 100)}
    summary.update({k: float(np.mean(v) * 100) for k, v in l1.items()})
    l2 = {k: float(np.mean(per_cat[k]) * 100) for k in sorted(per_cat)}
    return {"records": records, "summary": summary, "l2": l2, "skipped": skipped}


def write_report(result: dict, out: str | Path) -> str:
    """``out/summary.json``, ``out/summary_l2.json``, ``out/results.jsonl``; returns the table."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(result["summary"], indent=2) + "\n")
    (out / "summary_l2.json").write_text(json.dumps(result["l2"], indent=2) + "\n")
    with open(out / "results.jsonl", "w") as fp:
        for r in result["records"]:
            fp.write(json.dumps(r) + "\n")
    lines = ["L1 category scores:"]
    lines += [f"\t{k}: {v:.2f}" for k, v in result["summary"].items() if k != "overall"]
    lines += ["L2 category scores:"] + [f"\t{k}: {v:.2f}" for k, v in result["l2"].items()]
    if result["skipped"]:
        lines.append(f"Skipped {len(result['skipped'])} image(s): {result['skipped'][:5]}")
    lines.append(f"DPG-Bench score: {result['summary']['overall']:.2f}")
    table = "\n".join(lines)
    (out / "summary.txt").write_text(table + "\n")
    return table


def generate(
    pipe,
    prompts_dir: str | Path,
    out: str | Path,
    *,
    seed: int = 0,
    batch_size: int = 8,
    progress: bool = True,
    **sampling,
) -> dict:
    """One 2x2 grid ``<out>/<name>.png`` per ``<prompts_dir>/<name>.txt``; tile k of the i-th
    prompt (sorted by name) uses seed ``seed + 4 i + k``; existing grids are skipped."""
    from PIL import Image
    from tqdm import tqdm

    from cheers.eval.geneval import render

    prompts_dir, out = Path(prompts_dir), Path(out)
    files = sorted(prompts_dir.glob("*.txt")) if prompts_dir.is_dir() else []
    if not files:
        raise InputError(f"no <name>.txt prompt files in {prompts_dir}")
    out.mkdir(parents=True, exist_ok=True)
    todo = []
    for i, f in enumerate(files):
        text = f.read_text(encoding="utf-8").strip()
        if not text:
            raise InputError(f"prompt file {f} is empty")
        if not (out / f"{f.stem}.png").is_file():
            todo.append((i, f.stem, text))
    per = max(1, batch_size // 4)
    bar = tqdm(total=len(todo), desc="dpg", unit="prompt", disable=not progress)
    for start in range(0, len(todo), per):
        chunk = todo[start : start + per]
        images = render(
            pipe,
            [t for _, _, t in chunk for _ in range(4)],
            [seed + 4 * i + k for i, _, _ in chunk for k in range(4)],
            **sampling,
        )
        for j, (_, name, _) in enumerate(chunk):
            tiles = images[4 * j : 4 * j + 4]
            r = tiles[0].width
            grid = Image.new("RGB", (2 * r, 2 * r))
            for k, (x, y) in enumerate(((0, 0), (r, 0), (0, r), (r, r))):
                grid.paste(tiles[k], (x, y))
            tmp = out / f"{name}.tmp.png"
            grid.save(tmp)
            tmp.replace(out / f"{name}.png")
        bar.update(len(chunk))
    bar.close()
    return {"written": len(todo), "skipped": len(files) - len(todo)}


class MplugVQA:
    """The official VQA model, mPLUG-large (``damo/mplug_visual-question-answering_coco_large_en``)
    through ModelScope, from a local model folder; answers compared to ``'yes'``."""

    def __init__(self, model_dir: str | None, device: str = "cpu"):
        from cheers.eval.external import require_file, require_module

        require_module("modelscope", "DPG-Bench's mPLUG VQA", "pip install modelscope")
        path = require_file(
            model_dir,
            "--vqa-model-dir",
            "the mPLUG-large VQA model folder (mplug_visual-question-answering_coco_large_en)",
            folder=True,
        )
        from modelscope.pipelines import pipeline
        from modelscope.utils.constant import Tasks

        self._pipe = pipeline(Tasks.visual_question_answering, model=str(path), device=device)

    def __call__(self, image, question: str) -> str:
        return self._pipe({"image": image, "question": question})["text"]


__all__ = [
    "COLUMNS",
    "Item",
    "MplugVQA",
    "category_of",
    "generate",
    "grid_tiles",
    "read_questions",
    "score_folder",
    "score_image",
    "write_report",
    "zero_dependents",
]
