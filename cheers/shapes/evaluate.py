"""Scoring a shapes model on held-out sets of its world: GenEval's protocol with the analytic
detector, the shape / colour / coherence of what it draws, MMBench CircularEval, and open
questions without options."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
from PIL import Image


def generate_and_score(pipe, meta: list[dict], folder: Path, seed: int, steps: int, cfg_scale: float,
                       progress: bool = True) -> tuple[dict, list[dict]]:
    """4 images for each GenEval metadata row into ``folder`` (emptied first), scored by the
    shapes detector with GenEval's rules: (summary scores, per-image records)."""
    from cheers.eval import geneval

    shutil.rmtree(folder, ignore_errors=True)  # a rerun scores the new checkpoint, not old samples
    geneval.generate(pipe, meta, folder, n=4, seed=seed * 100_000, batch_size=32, steps=steps,
                     cfg_scale=cfg_scale, progress=progress)
    detector, colours = geneval.shapes_scorer()
    records = geneval.score(folder, folder / "results.jsonl", detector, colours)
    return geneval.write_summary(records, folder), records


def evaluate_geneval(pipe, out: Path, n_per_tag: int, seed: int, steps: int, cfg_scale: float, log) -> dict:
    """GenEval protocol on held-out shapes prompts through ``cheers.eval.geneval``: official
    folder layout, 4 images a prompt, the analytic detector in place of Mask2Former + CLIP."""
    from cheers.shapes.dataset import write_geneval_metadata

    folder = out / "geneval"
    meta = write_geneval_metadata(str(out / "geneval_metadata.jsonl"), n_per_tag, seed=seed)
    scores, records = generate_and_score(pipe, meta, folder, seed, steps, cfg_scale)
    per_prompt = [(m, [Image.open(folder / f"{i:05d}" / "samples" / f"{k:04d}.png").convert("RGB")
                       for k in range(4)]) for i, m in enumerate(meta)]
    log("geneval: " + ", ".join(f"{k} {v:.3f}" for k, v in scores.items() if isinstance(v, float)))
    return {"scores": scores, "samples": per_prompt, "records": records}


def evaluate_mmbench(pipe, out: Path, n: int, seed: int, log, object_size: str = "standard") -> dict:
    """MMBench-style questions with CircularEval through ``cheers.eval.mmbench``, answered by
    greedy decoding in batches; acc.csv / acc.json in ``out/mmbench``."""
    from cheers.eval import mmbench
    from cheers.eval.answering import answer_rows
    from cheers.shapes.dataset import mmbench_rows

    rows = mmbench_rows(n, seed=seed, circular=True, object_size=object_size)
    answers = answer_rows(pipe, rows, lambda r: mmbench.build_prompt(r, "llava"), source="shapes MMBench",
                          batch_size=32, max_new_tokens=6)
    preds = {r["index"]: a for r, a in zip(rows, answers)}
    acc = mmbench.score([{**r, "prediction": a} for r, a in zip(rows, answers)], out / "mmbench")
    (out / "mmbench_predictions.json").write_text(json.dumps({str(k): v for k, v in preds.items()}, indent=1))
    log("mmbench (circular): " + ", ".join(f"{k} {v:.3f}" for k, v in acc.items()))
    return {"acc": acc}


def open_answer(text: str) -> str:
    """The first word of an answer, lower case, without punctuation, number words as digits."""
    from cheers.shapes.texts import NUMBER_WORDS

    words = text.lower().replace(".", " ").replace(",", " ").split()
    if not words:
        return ""
    digits = {w: str(n) for n, w in NUMBER_WORDS.items()}
    return digits.get(words[0], words[0])


def evaluate_open(pipe, out: Path, n: int, seed: int, log, object_size: str = "standard") -> dict:
    """Held-out open questions in the training's own phrasing (colour of a shape, shape of a
    colour, counts), right when the answer's first word is the truth. Not an MMBench score:
    beside it, it tells whether the model sees the answer apart from whether it can find that
    answer's letter among options. Answers in ``out/open_answers.json``."""
    from cheers.eval.answering import answer_rows
    from cheers.shapes.dataset import open_question_rows

    rows = open_question_rows(n, seed=seed, object_size=object_size)
    answers = answer_rows(pipe, rows, lambda r: r["question"], source="shapes open questions",
                          batch_size=32, max_new_tokens=4)
    right: dict[str, list[bool]] = {}
    for r, a in zip(rows, answers):
        right.setdefault(r["category"], []).append(open_answer(a) == open_answer(r["answer"]))
    acc = {c: float(np.mean(v)) for c, v in right.items()}
    acc["overall"] = float(np.mean([x for v in right.values() for x in v]))
    (out / "open_answers.json").write_text(json.dumps(
        [{"index": r["index"], "question": r["question"], "truth": r["answer"], "answer": a}
         for r, a in zip(rows, answers)], indent=1))
    log("open questions: " + ", ".join(f"{k} {v:.3f}" for k, v in acc.items()))
    return acc


def image_measures(records: list[dict]) -> dict:
    """From scored GenEval records: on single-object images *coherent* (exactly one object
    found) and *shape_right* (the largest object has the prompt's shape); on colors images
    *colour_right* (the largest object has the prompt's colour)."""
    from cheers.eval.shapes_detector import detect

    coherent, shape_right, colour_right = [], [], []
    for rec in records:
        if rec["tag"] not in ("single_object", "colors"):
            continue
        found = detect(Image.open(rec["filename"]).convert("RGB"))
        largest = max(found, key=lambda d: d["area"]) if found else None
        want = json.loads(rec["metadata"])["include"][0]
        if rec["tag"] == "single_object":
            coherent.append(len(found) == 1)
            shape_right.append(largest is not None and largest["class"] == want["class"])
        else:
            colour_right.append(largest is not None and largest["colour"] == want["color"])
    mean = lambda v: float(np.mean(v)) if v else float("nan")  # noqa: E731
    return {"coherent": mean(coherent), "shape_right": mean(shape_right), "colour_right": mean(colour_right)}


def evaluate_model(pipe, out: Path, *, eval_prompts: int, eval_questions: int, seed: int,
                   object_size: str = "standard", log=lambda _msg: None) -> dict:
    """Every measure of one model, flat in ``row`` (``geneval_<tag>``, ``coherent``,
    ``shape_right``, ``colour_right``, ``mmbench_<category>``, ``open_<category>``), with the
    GenEval samples for a grid and the raw results: ``{"row", "samples", "geneval", "mmbench", "open"}``."""
    tc = pipe.cfg.transport
    gen = evaluate_geneval(pipe, out, eval_prompts, seed, tc.sample_steps, tc.cfg_scale, log)
    row = {f"geneval_{k}": v for k, v in gen["scores"].items() if isinstance(v, float)}
    row.update(image_measures(gen["records"]))
    mmb = evaluate_mmbench(pipe, out, eval_questions, seed, log, object_size=object_size)["acc"]
    row.update({f"mmbench_{k.lower()}": v for k, v in mmb.items()})
    opened = evaluate_open(pipe, out, eval_questions, seed, log, object_size=object_size)
    row.update({f"open_{k}": v for k, v in opened.items()})
    log("shape / colour / coherence of the largest object: "
        f"{row['shape_right']:.3f} / {row['colour_right']:.3f} / {row['coherent']:.3f}")
    return {"row": row, "samples": gen["samples"], "geneval": gen["scores"], "mmbench": mmb, "open": opened}
