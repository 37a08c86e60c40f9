"""MME: yes/no extraction and the official acc + acc+ scoring.

Our implementation of VLMEvalKit's ``YOrN_Extraction`` / ``process_punctuation``
(``vlmeval/smp/misc.py``, ``vlmeval/dataset/utils/yorn.py``) and ``MME_rating``:

- extraction: lower-case, punctuation handled as VLMEvalKit's VQA rule (a listed mark is
  deleted when it touches a space or the text holds a digit-comma-digit, else replaced by
  a space; then up to 32 periods not followed by a digit are deleted: the official call
  passes ``re.UNICODE`` (32) as the count); 'Yes' when the words hold "yes" and not "no",
  'No' for the reverse, else 'Unknown' (counted wrong unless a judge reads it);
- per subtask (``category``): acc = mean over questions, acc+ = mean over images
  (``image_path``) of "both of its questions right"; score = acc * 100 + acc+ * 100;
- Perception = sum over its 10 subtasks, Cognition ("reasoning" in VLMEvalKit) over 4.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from cheers.errors import InputError
from cheers.eval.tables import row_name, write_tsv

PERCEPTION = (
    "OCR",
    "artwork",
    "celebrity",
    "color",
    "count",
    "existence",
    "landmark",
    "position",
    "posters",
    "scene",
)
COGNITION = ("code_reasoning", "commonsense_reasoning", "numerical_calculation", "text_translation")
_PUNCT = [
    ";",
    r"/",
    "[",
    "]",
    '"',
    "{",
    "}",
    "(",
    ")",
    "=",
    "+",
    "\\",
    "_",
    "-",
    ">",
    "<",
    "@",
    "`",
    ",",
    "?",
    "!",
]
_COMMA_STRIP = re.compile(r"(\d)(,)(\d)")
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")  # sic: a lookahead, as in VLMEvalKit


def process_punctuation(text: str) -> str:
    out = text
    for p in _PUNCT:
        if (p + " " in text or " " + p in text) or _COMMA_STRIP.search(text) is not None:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD_STRIP.sub("", out, count=re.UNICODE)


def yes_no(output: str) -> str:
    """'Yes', 'No' or 'Unknown': VLMEvalKit's reading of a yes/no answer."""
    words = process_punctuation(str(output).lower()).split()
    if "yes" in words and "no" not in words:
        return "Yes"
    if "yes" not in words and "no" in words:
        return "No"
    return "Unknown"


def score_rows(rows: list[dict], *, judge=None, source: str = "predictions") -> dict:
    """``{"scores": {"Perception", "Cognition", <subtask>: score}, "details": {<subtask>:
    {acc, acc_plus, score, questions, images}}, "missing": subtasks absent, "rows": rows with
    extracted and score}``. Sums cover the subtasks present (all 14 in the real MME)."""
    stats: dict[str, dict[str, list[int]]] = {}
    scored = []
    for i, r in enumerate(rows):
        for col in ("category", "answer", "prediction"):
            if col not in r:
                raise InputError(f"{source}: {row_name(i, r)} lacks column {col!r}")
        if r["answer"] not in ("Yes", "No"):
            raise InputError(f"{source}: {row_name(i, r)}: answer {r['answer']!r} is not Yes/No")
        got = yes_no(r["prediction"])
        if got == "Unknown" and judge is not None:
            got = judge.yes_no(str(r.get("question", "")), str(r["prediction"]))
        hit = int(got == r["answer"])
        image = r.get("image_path") or r.get("image") or ""
        if not image:
            raise InputError(f"{source}: {row_name(i, r)} has no image_path to pair its questions")
        stats.setdefault(r["category"], {}).setdefault(image, []).append(hit)
        scored.append({**r, "extracted": got, "score": hit})
    details, scores = {}, {}
    for cat, images in stats.items():
        for image, hits in images.items():
            if len(hits) != 2:
                raise InputError(
                    f"{source}: image {image!r} ({cat}) has {len(hits)} question(s); "
                    "MME pairs exactly two per image"
                )
        flat = [h for hits in images.values() for h in hits]
        acc = sum(flat) / len(flat)
        acc_plus = sum(hits[0] * hits[1] for hits in images.values()) / len(images)
        scores[cat] = acc * 100 + acc_plus * 100
        details[cat] = {
            "acc": acc,
            "acc_plus": acc_plus,
            "score": scores[cat],
            "questions": len(flat),
            "images": len(images),
        }
    total = {
        "Perception": sum(scores.get(c, 0.0) for c in PERCEPTION),
        "Cognition": sum(scores.get(c, 0.0) for c in COGNITION),
    }
    missing = [c for c in PERCEPTION + COGNITION if c not in scores]
    return {"scores": {**total, **scores}, "details": details, "missing": missing, "rows": scored}


def write_report(result: dict, out: str | Path) -> None:
    """``out/score.json`` ({"Perception", "Cognition", <subtask>}), ``out/score.csv``
    (VLMEvalKit's one-row layout: perception, reasoning, subtasks), ``out/details.json``,
    ``out/results.tsv``."""
    import csv

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    s = result["scores"]
    (out / "score.json").write_text(json.dumps(s, indent=2) + "\n")
    (out / "details.json").write_text(
        json.dumps({"details": result["details"], "missing_subtasks": result["missing"]}, indent=2)
        + "\n"
    )
    row = {
        "perception": s["Perception"],
        "reasoning": s["Cognition"],
        **{k: v for k, v in s.items() if k not in ("Perception", "Cognition")},
    }
    with open(out / "score.csv", "w", newline="") as fp:
        w = csv.DictWriter(fp, fieldnames=list(row))
        w.writeheader()
        w.writerow(row)
    write_tsv(result["rows"], str(out / "results.tsv"), drop=("image",))


def format_report(result: dict) -> str:
    lines = [f"{'subtask':<24} {'acc':>6} {'acc+':>6} {'score':>8}"]
    for cat, d in result["details"].items():
        lines.append(f"{cat:<24} {d['acc']:6.3f} {d['acc_plus']:6.3f} {d['score']:8.2f}")
    lines.append(
        f"Perception {result['scores']['Perception']:.2f}  "
        f"Cognition {result['scores']['Cognition']:.2f}"
    )
    if result["missing"]:
        lines.append(f"(sums over the subtasks present; absent: {', '.join(result['missing'])})")
    return "\n".join(lines)


def score_file(pred: str, out: str | Path, *, judge=None) -> dict:
    from cheers.eval.tables import read_table

    rows = read_table(pred, ("index", "category", "answer", "prediction"), "MME predictions")
    result = score_rows(rows, judge=judge, source=pred)
    write_report(result, out)
    return result


def run(
    pipe,
    tsv: str,
    out: str | Path,
    *,
    judge=None,
    batch_size: int = 16,
    max_new_tokens: int = 16,
    progress: bool = True,
) -> dict:
    """Answer every question (the prompt is the TSV's question, VLMEvalKit's default), write
    ``out/predictions.tsv`` and score it."""
    from cheers.eval.answering import answer_rows
    from cheers.eval.tables import read_table, resolve_images

    rows = resolve_images(
        read_table(tsv, ("index", "image", "question", "answer", "category"), "MME TSV"), tsv
    )
    answers = answer_rows(
        pipe,
        rows,
        lambda r: str(r["question"]),
        source=tsv,
        batch_size=batch_size,
        max_new_tokens=max_new_tokens,
        progress=progress,
    )
    preds = [{**r, "prediction": a} for r, a in zip(rows, answers)]
    out = Path(out)
    write_tsv(preds, str(out / "predictions.tsv"), drop=("image",))
    # with references resolved, the image itself pairs the questions when image_path is absent
    result = score_rows(preds, judge=judge, source=str(out / "predictions.tsv"))
    write_report(result, out)
    return result


__all__ = [
    "COGNITION",
    "PERCEPTION",
    "format_report",
    "process_punctuation",
    "run",
    "score_file",
    "score_rows",
    "yes_no",
]
