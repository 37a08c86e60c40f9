"""GenEval end to end: generation into the official layout, scoring, the summary table.

- ``generate``: reads ``evaluation_metadata.jsonl`` (one record a line: ``tag``, ``include``,
  optional ``exclude``, ``prompt``) and writes ``<out>/<%05d>/metadata.jsonl`` and
  ``<out>/<%05d>/samples/<%04d>.png``, ``n`` images per prompt; image k of prompt i uses
  seed ``seed + n * i + k``, so a resumed run (finished prompts are skipped) writes the
  same images as an uninterrupted one.
- ``score``: the official rules (``cheers.eval.geneval_rules``) over a detector: the
  shapes-world detector, or Mask2Former + CLIP when installed with local weights.
- ``summary``: the numbers and table of the official ``summary_scores.py``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

from cheers.errors import InputError
from cheers.eval.geneval_rules import (
    GenEvalConfig,
    detection_colours,
    evaluate_folder,
    read_results,
    summarize,
    write_results,
)


def _check_record(rec, where: str) -> dict:
    if not isinstance(rec, dict):
        raise InputError(f"{where}: expected a JSON object, got {type(rec).__name__}")
    for key, kind in (("tag", str), ("prompt", str), ("include", list)):
        if not isinstance(rec.get(key), kind):
            raise InputError(f"{where}: '{key}' must be a {kind.__name__} (keys: {sorted(rec)})")
    for name in ("include", "exclude"):
        clauses = rec.get(name, [])
        if not isinstance(clauses, list):
            raise InputError(f"{where}: '{name}' must be a list")
        for c in clauses:
            if (
                not isinstance(c, dict)
                or not isinstance(c.get("class"), str)
                or not isinstance(c.get("count"), int)
            ):
                raise InputError(
                    f"{where}: each '{name}' clause needs a 'class' (str) and a "
                    f"'count' (int), got {c!r}"
                )
    return rec


def read_metadata(path: str | Path) -> list[dict]:
    """The records of a GenEval metadata file; a bad line raises InputError naming it."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"GenEval metadata not found: {path}")
    records = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise InputError(f"{path}:{n}: not JSON ({e})") from e
        records.append(_check_record(rec, f"{path}:{n}"))
    if not records:
        raise InputError(f"GenEval metadata {path} holds no records")
    return records


def _finished(folder: Path, meta: dict, n: int) -> bool:
    meta_path = folder / "metadata.jsonl"
    if not meta_path.is_file():
        return False
    try:
        have = json.loads(meta_path.read_text())
    except json.JSONDecodeError:
        return False
    if have != meta:
        raise InputError(
            f"{meta_path} holds another prompt ({have.get('prompt')!r}, not "
            f"{meta['prompt']!r}); use a fresh --out folder"
        )
    return all((folder / "samples" / f"{k:04d}.png").is_file() for k in range(n))


def render(pipe, prompts: list[str], seeds: list[int], callback=None, **sampling) -> list:
    """One image per prompt with an explicit seed each (PIL images), as one sampler batch."""
    return pipe.sample(prompts, seeds=seeds, callback=callback, **sampling)


def generate(
    pipe,
    metadata: list[dict],
    out: str | Path,
    *,
    n: int = 4,
    seed: int = 0,
    batch_size: int = 8,
    progress: bool = True,
    **sampling,
) -> dict:
    """Write the official layout for ``metadata``; prompts already complete are skipped.

    ``sampling``: ``steps``, ``cfg_scale``, ``shift``, ``sampler`` of ``Pipeline``.
    Returns ``{"written": prompts generated, "skipped": prompts already there}``.
    """
    from tqdm import tqdm

    if n < 1:
        raise InputError(f"n must be >= 1, got {n}")
    out = Path(out)
    jobs, skipped = [], 0
    for i, meta in enumerate(metadata):
        folder = out / f"{i:05d}"
        if _finished(folder, meta, n):
            skipped += 1
            continue
        (folder / "samples").mkdir(parents=True, exist_ok=True)
        (folder / "metadata.jsonl").write_text(json.dumps(meta) + "\n")
        jobs += [(i, k) for k in range(n)]
    steps = sampling.get("steps") or pipe.cfg.transport.sample_steps
    bar = tqdm(total=len(jobs) * steps, desc="geneval", unit="img-step", disable=not progress)
    for start in range(0, len(jobs), batch_size):
        chunk = jobs[start : start + batch_size]
        size = len(chunk)
        images = render(
            pipe,
            [metadata[i]["prompt"] for i, _ in chunk],
            [seed + n * i + k for i, k in chunk],
            callback=lambda _s, m=size: bar.update(m),
            **sampling,
        )
        for (i, k), img in zip(chunk, images):
            path = out / f"{i:05d}" / "samples" / f"{k:04d}.png"
            tmp = path.with_suffix(".tmp.png")
            img.save(tmp)
            os.replace(tmp, path)  # a killed run never leaves a half-written sample
    bar.close()
    return {"written": len(jobs) // n, "skipped": skipped}


def shapes_scorer() -> tuple[Callable, Callable]:
    """(detector, colour classifier) of the shapes world: the analytic detector and the
    colour it reads for each object (the analogue of CLIP on the masked crop)."""
    from cheers.eval.shapes_detector import detect

    return detect, detection_colours


def official_scorer(
    *,
    detector_config: str | None,
    detector_ckpt: str | None,
    class_names: str | None,
    clip_ckpt: str | None,
    clip_arch: str = "ViT-L-14",
    device: str = "cpu",
) -> tuple[Callable, Callable]:
    """(Mask2Former detector, CLIP colour classifier) from local files; CheersError naming
    exactly what is missing (package or file) otherwise. Nothing is downloaded."""
    from cheers.eval.clip_colour import load_clip_colour_classifier
    from cheers.eval.mask2former import load_mask2former

    detector = load_mask2former(detector_config, detector_ckpt, class_names, device=device)
    colours = load_clip_colour_classifier(clip_ckpt, arch=clip_arch, device=device)
    return detector, colours


def score(
    imagedir: str | Path,
    out: str | Path,
    detector: Callable,
    colour_classifier: Callable,
    config: GenEvalConfig | None = None,
) -> list[dict]:
    """Score every sample under ``imagedir`` and write ``out`` (the official results.jsonl)."""
    records = evaluate_folder(
        str(imagedir), detector, color_classifier=colour_classifier, config=config
    )
    if not records:
        raise InputError(f"no GenEval samples under {imagedir} (<%05d>/samples/<%04d>.png)")
    write_results(records, str(out))
    return records


def summary_table(scores: dict) -> str:
    """The text the official ``summary_scores.py`` prints."""
    lines = [
        "Summary",
        "=======",
        f"Total images: {scores['n_images']}",
        f"Total prompts: {scores['n_prompts']}",
        f"% correct images: {scores['image_accuracy']:.2%}",
        f"% correct prompts: {scores['prompt_accuracy']:.2%}",
        "",
        "Task breakdown",
        "==============",
    ]
    for tag, (ok, total) in scores["counts"].items():
        lines.append(f"{tag:<16} = {ok / total:.2%} ({ok} / {total})")
    lines += ["", f"Overall score (avg. over tasks): {scores['overall']:.5f}"]
    return "\n".join(lines)


def write_summary(results: str | Path | list[dict], out: str | Path) -> dict:
    """``out/summary.json`` (``{"overall": x, <tag>: x, ...}``, fractions) and
    ``out/summary.txt`` (the official table) from a results.jsonl or its records."""
    records = read_results(str(results)) if isinstance(results, (str, Path)) else results
    scores = summarize(records)
    flat = {"overall": scores["overall"], **{t: scores[t] for t in scores["counts"]}}
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(flat, indent=2) + "\n")
    (out / "summary.txt").write_text(summary_table(scores) + "\n")
    return scores


__all__ = [
    "generate",
    "official_scorer",
    "read_metadata",
    "render",
    "score",
    "shapes_scorer",
    "summary_table",
    "write_summary",
]
