"""MMBench end to end: the official TSV in, VLMEvalKit-format predictions and report out.

``run``: every row's image and prompt go through our understanding path in batches; the
predictions file is the TSV's columns without ``image`` plus ``prediction`` (VLMEvalKit's
layout), then it is scored. ``score``: CircularEval (groups ``index % 1_000_000``) with
VLMEvalKit's rule-based matcher, an optional judge when the rules read nothing, and the
report: ``acc.csv`` (VLMEvalKit's columns: split, Overall, the L2 abbreviations, the L3
categories) and ``acc.json`` (``{"Overall": x, <L2 or L3>: x}``, fractions in [0, 1]).

Prompts (``--prompt-style``): ``llava`` (default; the custom prompt
VLMEvalKit gives LLaVA-style models, and what the shapes model is trained on):
``{hint}\\n{question}\\nA. ..\\nAnswer with the option's letter from the given choices
directly.``; ``vlmevalkit``: ``ImageMCQDataset.build_prompt`` (``Hint:`` / ``Question:`` /
``Options:`` ... ``Please select the correct answer from the options above.``).
"""

from __future__ import annotations

import json
from pathlib import Path

from cheers.errors import InputError
from cheers.eval.mmbench_scoring import (
    build_choices,
    evaluate_mmbench,
    read_tsv,
    write_acc_csv,
)
from cheers.eval.tables import row_name, write_tsv

PROMPT_STYLES = ("llava", "vlmevalkit")


def _absent(v) -> bool:
    return v is None or str(v).strip() in ("", "nan", "NaN")  # pandas reads 'nan' as missing


def build_prompt(row: dict, style: str = "llava") -> str:
    """The MMBench prompt text of a row (the image goes before it)."""
    from cheers.eval.mmbench_prompt import format_mmbench_prompt

    choices = build_choices({k: v for k, v in row.items() if not _absent(v)})
    letters = "".join(choices)
    if letters != "ABCD"[: len(letters)]:
        raise InputError(
            f"options {letters!r} of index {row.get('index')} are not A, B, ... in order"
        )
    hint = None if _absent(row.get("hint")) else str(row["hint"])
    return format_mmbench_prompt(str(row["question"]), list(choices.values()), hint, style)


def predict(
    pipe,
    tsv: str,
    *,
    prompt_style: str = "llava",
    batch_size: int = 16,
    max_new_tokens: int = 32,
    progress: bool = True,
) -> list[dict]:
    """Rows of the predictions file: the TSV's columns without ``image``, plus ``prediction``."""
    from cheers.eval.answering import answer_rows

    if prompt_style not in PROMPT_STYLES:
        raise InputError(f"unknown prompt style {prompt_style!r}; expected one of {PROMPT_STYLES}")
    rows = read_tsv(tsv, required=("index", "question", "image", "A", "B"))
    answers = answer_rows(
        pipe,
        rows,
        lambda r: build_prompt(r, prompt_style),
        source=tsv,
        batch_size=batch_size,
        max_new_tokens=max_new_tokens,
        progress=progress,
    )
    return [
        {**{k: v for k, v in r.items() if k != "image"}, "prediction": a}
        for r, a in zip(rows, answers)
    ]


def score(
    rows: list[dict],
    out: str | Path,
    *,
    circular: bool = True,
    judge=None,
    source: str = "predictions",
) -> dict:
    """Score prediction rows; writes ``out/acc.csv``, ``out/acc.json`` and ``out/results.tsv``
    (the scored questions with ``hit`` and ``log``). Returns acc.json's dict."""
    for i, r in enumerate(rows):
        for col in ("index", "answer", "prediction"):
            if col not in r:
                raise InputError(f"{source}: {row_name(i, r)} lacks column {col!r}")
        if str(r["answer"]).strip() not in build_choices(r):
            raise InputError(
                f"{source}: {row_name(i, r)}: answer {r['answer']!r} is not one of "
                f"its options {list(build_choices(r))}"
            )
    result = evaluate_mmbench(rows, None, circular=circular, judge=judge)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_acc_csv(result["csv"], str(out / "acc.csv"))
    acc = {k: float(v) for k, v in result["acc"].items()}
    (out / "acc.json").write_text(json.dumps(acc, indent=2) + "\n")
    write_tsv(result["results"], str(out / "results.tsv"), drop=("image",))
    return acc


def score_file(pred: str, out: str | Path, *, circular: bool = True, judge=None) -> dict:
    """Score a VLMEvalKit predictions file (TSV, or XLSX with openpyxl installed)."""
    rows = read_tsv(pred, required=("index", "question", "answer", "prediction"))
    return score(rows, out, circular=circular, judge=judge, source=pred)


def run(pipe, tsv: str, out: str | Path, *, judge=None, circular: bool = True, **kw) -> dict | None:
    """``predict`` + ``out/predictions.tsv`` + ``score`` (skipped when the TSV has no answers,
    as MMBench's test split)."""
    rows = predict(pipe, tsv, **kw)
    out = Path(out)
    write_tsv(rows, str(out / "predictions.tsv"))
    if not all(str(r.get("answer", "")).strip() for r in rows):
        return None
    return score(rows, out, circular=circular, judge=judge, source=str(out / "predictions.tsv"))


def format_acc(acc: dict) -> str:
    return "\n".join(f"{k:<45} {v:.4f}" for k, v in acc.items())


__all__ = ["PROMPT_STYLES", "build_prompt", "format_acc", "predict", "run", "score", "score_file"]
