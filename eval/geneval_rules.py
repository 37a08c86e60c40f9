"""GenEval's scoring rules, applied to the detections of any detector.

Our implementation of the rules in GenEval's ``evaluation/evaluate_images.py`` and
``evaluation/summary_scores.py`` (djghosh13/geneval at af4902f; evaluate_images.py last
changed in 16f1681). The official scorer runs Mask2Former and CLIP; here the detector
is a callable (for the shapes world, ``cheers.eval.shapes_detector.detect``) and so is
the colour classifier (for the shapes world, the detector's own colour; for real
images, CLIP ViT-L-14 on the masked crop: not yet in this codebase).

The rules, as the official code has them:

- per class, detections with score ``> threshold`` (0.3; 0.9 when the tag is
  ``counting``), highest score first, at most ``max_objects`` (16) kept, then optional
  greedy NMS at ``max_overlap`` (1.0 = off, the default);
- ``include`` clauses are ANDed; each takes the ``count`` best detections of its class
  and fails if there are fewer (so a count is "at least"; exactness comes from the
  ``exclude`` clause counting tags carry, ``count + 1``);
- a ``color`` clause needs at least ``count`` of those to be classified that colour;
- a ``position`` ``[relation, i]`` clause needs every kept object to stand in that
  relation to every object kept for include clause ``i`` (which must have matched);
- ``exclude`` clauses are ORed: a class with ``>= count`` kept detections fails;
- ``summarize``: accuracy over images per tag; overall = unweighted mean over tags.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from cheers.errors import InputError

# GenEval's colour names, in its order (evaluate_images.py COLORS).
COLORS: tuple[str, ...] = (
    "red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white",
)
TAGS: tuple[str, ...] = (
    "single_object", "two_object", "counting", "colors", "position", "color_attr",
)
# CLIP zero-shot templates of the official colour classifier, {c} the colour.
CLIP_COLOR_TEMPLATES: tuple[str, ...] = (
    "a photo of a {{c}} {classname}",
    "a photo of a {{c}}-colored {classname}",
    "a photo of a {{c}} object",
)

# A detection: {"class": str, "box": [x0, y0, x1, y1] pixels, "score": float,
# optional "mask": bool [H, W], optional "colour": str}.
Detection = dict
# (image, the kept detections of one class, class name) -> one colour name per detection
ColorClassifier = Callable[[object, list, str], list]


@dataclass(kw_only=True)
class GenEvalConfig:
    """The official scorer's options (``--options`` of evaluate_images.py), same defaults."""

    threshold: float = 0.3
    counting_threshold: float = 0.9
    max_objects: int = 16
    max_overlap: float = 1.0  # NMS IoU; 1.0 turns NMS off
    position_threshold: float = 0.1


def compute_iou(box_a: Sequence[float], box_b: Sequence[float]) -> float:
    """IoU with the official inclusive-pixel convention (``x1 - x0 + 1``)."""

    def area(b):
        return max(b[2] - b[0] + 1, 0) * max(b[3] - b[1] + 1, 0)

    inter = area([max(box_a[0], box_b[0]), max(box_a[1], box_b[1]),
                  min(box_a[2], box_b[2]), min(box_a[3], box_b[3])])
    union = area(box_a) + area(box_b) - inter
    return inter / union if union else 0.0


def relative_position(box_a: Sequence[float], box_b: Sequence[float],
                      margin: float = 0.1) -> set[str]:
    """Relations of A to B: subsets of {left of, right of, above, below} (y grows down).

    The offset of the box centres, each component shrunk towards 0 by ``margin`` times the
    summed box extents on that axis, is divided by the unshrunk offset's length; a component
    beyond +-0.5 names a relation. No relation when the shrunk offset is (almost) zero.
    """
    a = np.asarray(box_a, dtype=np.float64)[:4]
    b = np.asarray(box_b, dtype=np.float64)[:4]
    offset = (a[:2] + a[2:]) / 2.0 - (b[:2] + b[2:]) / 2.0  # [dx, dy]
    dims = np.abs(a[2:] - a[:2]) + np.abs(b[2:] - b[:2])
    revised = np.maximum(np.abs(offset) - margin * dims, 0.0) * np.sign(offset)
    if np.all(np.abs(revised) < 1e-3):
        return set()
    dx, dy = revised / np.linalg.norm(offset)
    relations = set()
    if dx < -0.5:
        relations.add("left of")
    if dx > 0.5:
        relations.add("right of")
    if dy < -0.5:
        relations.add("above")
    if dy > 0.5:
        relations.add("below")
    return relations


def _check_detection(det: Detection) -> None:
    for key in ("class", "box", "score"):
        if key not in det:
            raise InputError(f"detection lacks {key!r}: keys {sorted(det)}")
    if len(det["box"]) < 4:
        raise InputError(f"detection box {det['box']!r} needs [x0, y0, x1, y1]")


def group_detections(detections: Iterable[Detection], tag: str,
                     config: GenEvalConfig | None = None) -> dict[str, list[Detection]]:
    """Per class, the detections the official scorer keeps, best first.

    Score strictly above the threshold (``counting_threshold`` for the counting tag), at
    most ``max_objects``, then greedy NMS when ``max_overlap < 1``. Classes left empty are
    absent. Equal scores keep the detector's order.
    """
    cfg = config or GenEvalConfig()
    threshold = cfg.counting_threshold if tag == "counting" else cfg.threshold
    by_class: dict[str, list[Detection]] = {}
    for det in detections:
        _check_detection(det)
        by_class.setdefault(det["class"], []).append(det)
    out: dict[str, list[Detection]] = {}
    for cls, dets in by_class.items():
        order = sorted(dets, key=lambda d: -float(d["score"]))
        order = [d for d in order if float(d["score"]) > threshold][: cfg.max_objects]
        kept: list[Detection] = []
        while order:
            best = order.pop(0)
            kept.append(best)
            if cfg.max_overlap != 1:
                order = [d for d in order if compute_iou(best["box"], d["box"]) < cfg.max_overlap]
        if kept:
            out[cls] = kept
    return out


def detection_colours(image, objects: list[Detection], classname: str) -> list[str]:
    """Colour classifier that reads each detection's own ``colour`` (the shapes detector's)."""
    try:
        return [d["colour"] for d in objects]
    except KeyError as e:
        raise InputError(f"a {classname!r} detection has no 'colour'; pass a colour "
                         "classifier for this detector") from e


def masked_crop(image, box: Sequence[float], mask: np.ndarray | None = None,
                bgcolor: str = "#999", crop: bool = True):
    """The picture the official CLIP colour classifier sees for one object: the object's
    pixels over a ``bgcolor`` canvas (all pixels when no mask), cropped to its box."""
    from PIL import Image

    image = image.convert("RGB")
    if mask is not None:
        mask = np.asarray(mask, dtype=bool)
        if tuple(image.size[::-1]) != mask.shape:
            raise InputError(f"mask of shape {mask.shape} for an image of size {image.size}")
        blank = image.copy() if bgcolor == "original" else Image.new("RGB", image.size, color=bgcolor)
        image = Image.composite(image, blank, Image.fromarray(mask))
    if crop:
        image = image.crop(tuple(box[:4]))
    return image


def evaluate(detected: dict[str, list[Detection]], metadata: dict, *, image=None,
             color_classifier: ColorClassifier | None = None,
             config: GenEvalConfig | None = None) -> tuple[bool, str]:
    """(correct, reason) of one image whose kept detections per class are ``detected``
    (``group_detections``), against a GenEval metadata record; reasons as the official's,
    one per failed clause, joined by newlines."""
    cfg = config or GenEvalConfig()
    classify = color_classifier or detection_colours
    correct = True
    reason: list[str] = []
    matched_groups: list[list[Detection] | None] = []
    for req in metadata.get("include", []):
        classname, count = req["class"], int(req["count"])
        matched = True
        found = detected.get(classname, [])[:count]
        if len(found) < count:
            correct = matched = False
            reason.append(f"expected {classname}>={count}, found {len(found)}")
        else:
            if "color" in req:
                colors = list(classify(image, found, classname))
                if colors.count(req["color"]) < count:
                    correct = matched = False
                    reason.append(
                        f"expected {req['color']} {classname}>={count}, found "
                        f"{colors.count(req['color'])} {req['color']}; and "
                        + ", ".join(f"{colors.count(c)} {c}" for c in COLORS if c in colors))
            if "position" in req and matched:
                expected_rel, target_group = req["position"]
                if not 0 <= int(target_group) < len(matched_groups):
                    raise InputError(f"position target {target_group} is not an earlier include "
                                     f"clause in {metadata!r}")
                targets = matched_groups[int(target_group)]
                if targets is None:
                    correct = matched = False
                    reason.append(f"no target for {classname} to be {expected_rel}")
                else:
                    for obj in found:
                        for target in targets:
                            true_rels = relative_position(obj["box"], target["box"],
                                                          cfg.position_threshold)
                            if expected_rel not in true_rels:
                                correct = matched = False
                                reason.append(f"expected {classname} {expected_rel} target, found "
                                              f"{' and '.join(true_rels)} target")
                                break
                        if not matched:
                            break
        matched_groups.append(found if matched else None)
    for req in metadata.get("exclude", []):
        classname = req["class"]
        if len(detected.get(classname, [])) >= int(req["count"]):
            correct = False
            reason.append(f"expected {classname}<{req['count']}, found {len(detected[classname])}")
    return correct, "\n".join(reason)


def evaluate_image(detections: Iterable[Detection], metadata: dict, *, filename: str = "",
                   image=None, color_classifier: ColorClassifier | None = None,
                   config: GenEvalConfig | None = None) -> dict:
    """One record of the official ``results.jsonl``: ``filename, tag, prompt, correct,
    reason, metadata`` (JSON text of the record) and ``details`` (JSON text: per class, the
    kept boxes as ``[x0, y0, x1, y1, score]``)."""
    if "tag" not in metadata or "prompt" not in metadata:
        raise InputError(f"GenEval metadata needs 'tag' and 'prompt': {metadata!r}")
    detected = group_detections(detections, metadata["tag"], config)
    correct, reason = evaluate(detected, metadata, image=image,
                               color_classifier=color_classifier, config=config)
    return {
        "filename": filename,
        "tag": metadata["tag"],
        "prompt": metadata["prompt"],
        "correct": bool(correct),
        "reason": reason,
        "metadata": json.dumps(metadata),
        "details": json.dumps({
            cls: [[float(v) for v in d["box"][:4]] + [float(d["score"])] for d in dets]
            for cls, dets in detected.items()
        }),
    }


def evaluate_folder(imagedir: str, detector: Callable, *,
                    color_classifier: ColorClassifier | None = None,
                    config: GenEvalConfig | None = None) -> list[dict]:
    """Score GenEval's output layout ``<imagedir>/<%05d>/metadata.jsonl`` (one JSON record)
    + ``<%05d>/samples/<%04d>.png``, as the official ``main`` walks it (digit-named folders,
    files matching ``\\d+\\.png``), in sorted order. ``detector(PIL image) -> detections``."""
    from PIL import Image, ImageOps

    if not os.path.isdir(imagedir):
        raise InputError(f"GenEval image folder {imagedir!r} does not exist")
    records = []
    for sub in sorted(os.listdir(imagedir)):
        folder = os.path.join(imagedir, sub)
        if not os.path.isdir(folder) or not sub.isdigit():
            continue
        meta_path = os.path.join(folder, "metadata.jsonl")
        try:
            with open(meta_path) as fp:
                metadata = json.load(fp)
        except (OSError, json.JSONDecodeError) as e:
            raise InputError(f"cannot read GenEval metadata {meta_path}: {e}") from e
        samples = os.path.join(folder, "samples")
        for name in sorted(os.listdir(samples)):
            path = os.path.join(samples, name)
            if not os.path.isfile(path) or not re.match(r"\d+\.png", name):
                continue
            image = ImageOps.exif_transpose(Image.open(path)).convert("RGB")
            records.append(evaluate_image(detector(image), metadata, filename=path, image=image,
                                          color_classifier=color_classifier, config=config))
    return records


def write_results(records: Iterable[dict], path: str) -> None:
    """``results.jsonl``: one JSON record per line."""
    if os.path.dirname(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as fp:
        for r in records:
            fp.write(json.dumps(r) + "\n")


def read_jsonl(path: str, what: str = "JSON lines") -> list[dict]:
    """The records of a JSON-lines file; an unreadable file or line raises InputError naming it."""
    try:
        with open(path) as fp:
            return [json.loads(line) for line in fp if line.strip()]
    except (OSError, json.JSONDecodeError) as e:
        raise InputError(f"cannot read {what} {path}: {e}") from e


def read_results(path: str) -> list[dict]:
    return read_jsonl(path, "GenEval results")


def summarize(records: Sequence[dict]) -> dict:
    """Scores of a results list, as summary_scores.py computes them.

    Returns ``{"overall": mean of the per-tag accuracies, <tag>: accuracy over that tag's
    images, ..., "n_images", "n_prompts", "image_accuracy" (over all images),
    "prompt_accuracy" (a prompt counts if any of its images is correct), "counts":
    {tag: [correct, total]}}``; tags in order of first appearance, fractions in [0, 1].
    """
    if not records:
        raise InputError("no GenEval results to summarize")
    per_tag: dict[str, list[bool]] = {}
    per_prompt: dict[str, bool] = {}
    for r in records:
        for key in ("tag", "correct", "metadata"):
            if key not in r:
                raise InputError(f"GenEval result lacks {key!r}: {sorted(r)}")
        ok = bool(r["correct"])
        per_tag.setdefault(r["tag"], []).append(ok)
        meta = r["metadata"] if isinstance(r["metadata"], str) else json.dumps(r["metadata"])
        per_prompt[meta] = per_prompt.get(meta, False) or ok
    out: dict = {}
    tag_scores = []
    for tag, oks in per_tag.items():
        out[tag] = sum(oks) / len(oks)
        tag_scores.append(out[tag])
    out["overall"] = float(np.mean(tag_scores))
    out["n_images"] = len(records)
    out["n_prompts"] = len(per_prompt)
    out["image_accuracy"] = sum(bool(r["correct"]) for r in records) / len(records)
    out["prompt_accuracy"] = sum(per_prompt.values()) / len(per_prompt)
    out["counts"] = {tag: [sum(oks), len(oks)] for tag, oks in per_tag.items()}
    return {"overall": out.pop("overall"), **out}


__all__ = [
    "CLIP_COLOR_TEMPLATES", "COLORS", "TAGS", "GenEvalConfig",
    "compute_iou", "detection_colours", "evaluate", "evaluate_folder", "evaluate_image",
    "group_detections", "masked_crop", "read_results", "relative_position", "summarize",
    "write_results",
]
