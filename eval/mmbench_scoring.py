"""MMBench scoring: rule-based choice extraction, CircularEval and the accuracy report.

Our implementation of VLMEvalKit's rules, read at open-compass/VLMEvalKit commit
e8e78f05f3080fe28154f2130321f17951c3be94 (2026-08-18):

- ``vlmeval/utils/matching_util.py`` (last changed in 2cf2a36c): ``can_infer_option``,
  ``can_infer_text``, ``can_infer``, with the environment flag ``VERBOSE`` off (its
  default) unless ``verbose=True`` is passed;
- ``vlmeval/dataset/utils/multiple_choice.py``: ``build_choices``, the circular group
  logic of ``prefetch_circular_group`` / ``mcq_circular_eval`` under the exact-matching
  policy (an answer the rules cannot read counts as wrong unless an optional judge,
  ``cheers.eval.judge``, reads it), and
  ``report_acc`` with ``MMB_abbrs``.

Rows are dicts with MMBench's TSV columns (``index question hint A B C D answer category
image source l2-category comment split``); a missing option is absent, ``None``, NaN or
an empty string. CircularEval copies have ``index = orig + k * 1_000_000``.
"""

from __future__ import annotations

import csv
import math
import os
import re
import string
from collections.abc import Callable, Iterable, Mapping, Sequence

from cheers.errors import InputError

CIRCULAR_OFFSET = 1_000_000

MMB_ABBRS: dict[str, str] = {
    "coarse_perception": "CP",
    "finegrained_perception (instance-level)": "FP-S",
    "finegrained_perception (cross-instance)": "FP-C",
    "logic_reasoning": "LR",
    "relation_reasoning": "RR",
    "attribute_reasoning": "AR",
}

_REJECT_TO_ANSWER = (
    "Sorry, I can't help with images of people yet.",
    "I can't process this file.",
    "I'm sorry, but without the image provided",
    "Cannot determine the answer",
)
_STRIP_CHARS = ".()[],:;!*#{}"
# VLMEvalKit's verbose-answer pattern; case-insensitive, so "answer is apple" reads as A.
_VERBOSE_ANSWER_RE = re.compile(r"(?i)(?:correct\s+)?answer\s+is\s+\**([ABCD])\**")


def can_infer_option(answer: str, choices: Iterable[str], verbose: bool = False) -> str | bool:
    """The option letter an answer names, ``'Z'`` for a refusal, or ``False``.

    A letter counts when it is the only option letter among the answer's words (after
    ``.()[],:;!*#{}`` become spaces) and is one of its last four words; otherwise the
    pattern "(correct) answer is X" decides.
    """
    if "Failed to obtain answer via API" in answer:
        return False
    for err in _REJECT_TO_ANSWER:
        if err in answer:
            return "Z"
    choices = list(choices)
    mod = answer
    for c in _STRIP_CHARS:
        mod = mod.replace(c, " ")
    splits = [x.strip() for x in mod.split()]
    count = sum(1 for c in choices if c in splits)
    if count == 1:
        for ch in choices:
            if "A" in splits and len(splits) > 3 and verbose:
                return False  # "A" may be the article
            if ch in splits and splits.index(ch) > len(splits) - 5:
                return ch
    elif count == 0 and "Z" in splits:
        return "Z"
    match = _VERBOSE_ANSWER_RE.search(answer or "")
    if match and match.group(1).upper() in choices:
        return match.group(1).upper()
    return False


def can_infer_text(answer: str, choices: Mapping[str, object]) -> str | bool:
    """The option whose text (case-insensitive) is the only one found in the answer, or
    ``False``; answers longer than twice the options' total length are not read."""
    answer = answer.lower()
    if len(answer) > 2 * sum(len(str(v)) for v in choices.values()):
        return False
    cands = []
    for k, v in choices.items():
        if k not in string.ascii_uppercase:
            raise InputError(f"option key {k!r} is not an upper-case letter")
        if str(v).lower() in answer:
            cands.append(k)
    return cands[0] if len(cands) == 1 else False


def can_infer(answer, choices: Mapping[str, object], verbose: bool = False) -> str | bool:
    """``can_infer_option`` first, then ``can_infer_text``: a letter, ``'Z'`` or ``False``."""
    answer = str(answer)
    opt = can_infer_option(answer, choices, verbose=verbose)
    return opt if opt else can_infer_text(answer, choices)


def _missing(v) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v)) or (isinstance(v, str) and v == "")


def build_choices(row: Mapping) -> dict[str, str]:
    """``{letter: option text}`` for the options a row has, in letter order."""
    return {ch: row[ch] for ch in string.ascii_uppercase if ch in row and not _missing(row[ch])}


def _index(row: Mapping) -> int:
    try:
        return int(row["index"])
    except (KeyError, TypeError, ValueError) as e:
        raise InputError(f"MMBench row has no integer 'index': {dict(row)!r}") from e


def _prediction(row: Mapping, predictions: Mapping | None) -> str:
    idx = _index(row)
    if predictions is not None:
        pred = predictions.get(idx, predictions.get(str(idx)))
    else:
        pred = row.get("prediction")
    return "" if _missing(pred) else str(pred)


# (row, prediction) -> letter, 'Z' or False: an LLM judge asked when the rules read nothing
Judge = Callable[[Mapping, str], "str | bool"]


def extract_choice(row: Mapping, pred: str, verbose: bool = False, judge: Judge | None = None):
    """The rule-based matcher, then ``judge`` (when given) if the rules read nothing."""
    opt = can_infer(pred, build_choices(row), verbose=verbose)
    if opt is False and judge is not None:
        opt = judge(row, pred)
    return opt


def score_vanilla(rows: Sequence[Mapping], predictions: Mapping | None = None,
                  verbose: bool = False, judge: Judge | None = None) -> list[dict]:
    """Each row on its own: a copy of every row with ``prediction``, ``extracted`` (letter,
    'Z' or False) and ``hit`` (0/1)."""
    out = []
    for row in rows:
        pred = _prediction(row, predictions)
        opt = extract_choice(row, pred, verbose, judge)
        out.append({**row, "prediction": pred, "extracted": opt,
                    "hit": int(bool(opt) and opt == row["answer"])})
    return out


def score_circular(rows: Sequence[Mapping], predictions: Mapping | None = None,
                   verbose: bool = False, judge: Judge | None = None) -> list[dict]:
    """CircularEval: rows grouped by ``index % 1_000_000``; a group is right only if the
    answer of every rotation is read and right.

    Returns a copy of each main row (``index < 1_000_000``) with ``hit`` (0/1) and
    ``log``. Predictions come from ``predictions[index]`` or else each row's
    ``prediction``; a missing one counts as unreadable.
    """
    groups: dict[int, list[Mapping]] = {}
    mains: list[Mapping] = []
    for row in rows:
        idx = _index(row)
        groups.setdefault(idx % CIRCULAR_OFFSET, []).append(row)
        if idx == idx % CIRCULAR_OFFSET:
            mains.append(row)
    out = []
    for main in mains:
        g = _index(main)
        members = sorted(groups[g], key=_index)
        hit, log = 1, []
        for k, row in enumerate(members):
            pred = _prediction(row, predictions)
            opt = extract_choice(row, pred, verbose, judge)
            if opt != row["answer"]:
                hit = 0
                log.append(f"Failed in Rolling {k}: Answer is {row['answer']}, "
                           f"Prediction is {pred!r}, Pre-fetched is {opt}.")
                break
            log.append(f"Rolling {k} Matched.")
        out.append({**main, "hit": hit, "log": "\n".join(log)})
    return out


def report_acc(results: Sequence[Mapping]) -> list[dict]:
    """Rows of VLMEvalKit's ``acc.csv``: one per split, columns ``split, Overall``, then
    each ``l2-category`` (abbreviated by ``MMB_ABBRS``) and each ``category``, sorted by
    name; values are mean ``hit`` (fractions; NaN where a split lacks an ability)."""
    if not results:
        raise InputError("no MMBench results to report")
    splits = sorted({str(r.get("split", "none")) if not _missing(r.get("split")) else "none"
                     for r in results})

    def split_of(r):
        return "none" if _missing(r.get("split")) else str(r["split"])

    def mean(rows):
        return sum(int(r["hit"]) for r in rows) / len(rows) if rows else float("nan")

    table = []
    for sp in splits:
        in_split = [r for r in results if split_of(r) == sp]
        row: dict = {"split": sp, "Overall": mean(in_split)}
        for group in ("l2-category", "category"):
            if not any(group in r for r in results):
                continue
            for ability in sorted({str(r[group]) for r in results if group in r}):
                name = MMB_ABBRS.get(ability, ability)
                row[name] = mean([r for r in in_split if str(r.get(group)) == ability])
        table.append(row)
    return table


def acc_summary(results: Sequence[Mapping], split: str | None = None) -> dict[str, float]:
    """One split's accuracies as a flat dict ``{"Overall": .., "CP": .., <category>: ..}``
    (the ``acc.json`` view); ``split`` may be left out when there is only one."""
    table = report_acc(results)
    if split is None:
        if len(table) != 1:
            raise InputError(f"results hold splits {[t['split'] for t in table]}; name one")
        return {k: v for k, v in table[0].items() if k != "split"}
    for t in table:
        if t["split"] == split:
            return {k: v for k, v in t.items() if k != "split"}
    raise InputError(f"split {split!r} not in results (have {[t['split'] for t in table]})")


def evaluate_mmbench(rows: Sequence[Mapping], predictions: Mapping | None = None,
                     circular: bool = True, verbose: bool = False,
                     judge: Judge | None = None) -> dict:
    """Score a benchmark: ``{"acc": acc_summary of the first split .. (see acc_summary),
    "acc_by_split": {split: acc}, "csv": report_acc rows, "results": scored rows}``."""
    scored = (score_circular if circular else score_vanilla)(rows, predictions, verbose, judge)
    table = report_acc(scored)
    by_split = {t["split"]: {k: v for k, v in t.items() if k != "split"} for t in table}
    return {"acc": by_split[table[0]["split"]], "acc_by_split": by_split, "csv": table,
            "results": scored}


def read_tsv(path: str, required: Sequence[str] = ("index", "question", "answer")) -> list[dict]:
    """An MMBench TSV (or XLSX) as row dicts (``index`` as int; empty cells as '')."""
    from cheers.eval.tables import read_table, row_name

    rows = read_table(path, required, "MMBench table")
    for i, row in enumerate(rows):
        try:
            row["index"] = int(float(row["index"]))
        except (KeyError, ValueError) as e:
            raise InputError(f"{path}: {row_name(i, row)}: 'index' must be an integer") from e
    return rows


def write_acc_csv(table: Sequence[Mapping], path: str) -> None:
    """``report_acc`` rows as a CSV with VLMEvalKit's column order."""
    if os.path.dirname(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
    columns: list[str] = []
    for row in table:
        columns += [k for k in row if k not in columns]
    with open(path, "w", newline="") as fp:
        w = csv.DictWriter(fp, fieldnames=columns)
        w.writeheader()
        for row in table:
            w.writerow(dict(row))


__all__ = [
    "CIRCULAR_OFFSET", "MMB_ABBRS", "acc_summary", "build_choices", "can_infer", "extract_choice",
    "can_infer_option", "can_infer_text", "evaluate_mmbench", "read_tsv", "report_acc",
    "score_circular", "score_vanilla", "write_acc_csv",
]
