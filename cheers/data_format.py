"""Training data people can write: JSONL lines that point at image files, checked line by line
and mapped onto the WebDataset records the trainer reads (``cheers.train.data``).

``SCHEMA`` below is the format (also in ``cheers data --help`` and the README). The pieces:

- ``TarShard``: the samples of one tar shard, grouped WebDataset-style (the trainer's reader too).
- ``parse_line`` / ``parse_record``: a JSONL line or a shard record -> ``Sample``, or ``BadSample``
  naming the problem; both end in ``_check_sample``, so a line and its packed record pass or fail
  alike.
- ``LengthMeter``: tokens of a sample in the model's chat layout, against ``max_seq_len``.
- ``scan_jsonl`` / ``scan_shards``: every line or record checked (images decoded as training
  decodes them), each problem an ``Issue`` naming its line or key; ``Scan.report()`` prints it.
- ``pack``: the usable lines of a JSONL as tar shards + ``manifest.json``.
"""

from __future__ import annotations

import io
import json
import os
import re
import tarfile
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from cheers.errors import InputError
from cheers.train.config import TASKS

CAPTION_PROMPT = "Describe the image."  # the question a bare i2t caption answers
SCHEMA = """\
One JSON object per line; image paths are relative to the JSONL file's folder (or absolute).

  {"task": "t2i",  "image": "img/cat.jpg", "text": "a cat asleep on a red sofa"}
  {"task": "i2t",  "image": "img/cat.jpg", "text": "A cat asleep on a red sofa."}
  {"task": "i2t",  "image": "img/cat.jpg", "question": "What colour is the sofa?", "answer": "Red."}
  {"task": "i2t",  "images": ["img/a.jpg", "img/b.jpg"], "conversations": [
      {"role": "user", "content": "<image><image>What changed?"}, {"role": "assistant", "content": "The cat left."},
      {"role": "user", "content": "Where to?"}, {"role": "assistant", "content": "Off the sofa."}]}
  {"task": "text", "text": "Any plain text, trained as next-token prediction."}

keys (any other key is an error):
  task           t2i (text -> image) | i2t (image(s) -> text) | text (plain text); required
  text           t2i: the prompt (required); text: the text (required); i2t: a caption, trained
                 as the answer to "{caption_prompt}" unless question/conversations are given
  image, images  one path, or a list of paths (i2t only: several images); t2i takes exactly one,
                 text none
  question, answer   i2t: one question and its answer (VQA)
  conversations  i2t: a chat, [{"role": "user"|"assistant", "content": "..."}, ...] or LLaVA's
                 [{"from": "human"|"gpt", "value": "..."}, ...]; user and assistant turns
                 alternate, starting with the user and ending with the assistant; an optional
                 first system turn is kept but not trained (the model's own system prompt is).
                 Every assistant turn is trained. All images open the first user turn (the
                 model's chat layout): "<image>" marks may appear there, one per image, or not at all
  id             the sample's key in the shards: letters, digits, _ and -, unique (default: the
                 line number, 8 digits)
  meta           any JSON object, carried into the shard record unchanged

A line with a problem (bad JSON, a missing or unknown key, a missing, unreadable or too small
image, too many tokens for max_seq_len with an image past the cut) is reported with its line
number and skipped; the other lines are kept whole.""".replace("{caption_prompt}", CAPTION_PROMPT)

IMAGE_EXTS = ("png", "jpg", "jpeg", "webp")  # image members the trainer reads, by extension
_FORMAT_EXT = {"PNG": "png", "JPEG": "jpg", "WEBP": "webp"}  # other formats are packed as PNG
_KEYS = ("task", "id", "text", "image", "images", "question", "answer", "conversations", "meta")
_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_USER, _ASSISTANT = ("human", "user"), ("gpt", "assistant")
# reasons a sample is skipped, and reasons it is kept with a note
PROBLEMS = ("bad_shard", "bad_json", "bad_field", "duplicate_id", "missing_image", "bad_image", "small_image", "too_long")
WARNINGS = ("truncated", "system_turn")


class BadSample(Exception):
    """Why one line or record cannot be used: ``reason`` (one of ``PROBLEMS``) and ``detail``."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


@dataclass
class Issue:
    """A problem (the sample is skipped) or a warning (kept) at ``where`` (``file:line`` or
    ``shard:key``)."""

    where: str
    reason: str
    detail: str

    @property
    def skipped(self) -> bool:
        return self.reason in PROBLEMS

    def __str__(self) -> str:
        return f"{self.where}: {self.reason}: {self.detail}"


@dataclass
class Sample:
    """One sample in the trainer's terms, before its images are opened.

    ``conversations`` are LLaVA-style turns (``from``: system | human | gpt, ``value``) with one
    ``<image>`` mark per image in the first human turn. ``image_paths``: the image files of a
    JSONL sample (empty for a shard record, whose images are tar members). ``sizes``: (width,
    height, PIL format) of each image once opened.
    """

    key: str
    task: str
    text: str
    conversations: list[dict]
    where: str
    line: int = 0
    image_paths: list[Path] = field(default_factory=list)
    image_names: list[str] = field(default_factory=list)  # the paths as the line wrote them
    n_images: int = 0
    sizes: list[tuple[int, int, str]] = field(default_factory=list)
    meta: dict | None = None
    warnings: list[Issue] = field(default_factory=list)

    def member_names(self) -> list[str]:
        """The tar member extension of each image: ``png`` / ``jpg`` / ``webp`` for one image,
        ``0.png``, ``1.jpg``, ... (listed in the record's ``images``) for several."""
        exts = [_FORMAT_EXT.get(fmt, "png") for _, _, fmt in self.sizes]
        return exts if len(exts) == 1 else [f"{i}.{e}" for i, e in enumerate(exts)]

    def record(self, source: str) -> dict[str, Any]:
        """The shard's ``{key}.json``: what ``cheers.train.data`` reads, plus where it came from."""
        w, h = self.sizes[0][:2] if self.sizes else (0, 0)
        rec: dict[str, Any] = {"task": self.task, "text": self.text, "width": w, "height": h}
        if self.task == "i2t":
            rec["conversations"] = self.conversations
        if len(self.sizes) > 1:
            rec["images"] = self.member_names()
        if self.meta is not None:
            rec["meta"] = self.meta
        rec["source"] = {"file": source, "line": self.line}
        return rec


# --------------------------------------------------------------------------- shards


class TarShard:
    """Index of one tar shard: its samples in file order as ``(key, {ext: TarInfo})``.

    Members are grouped WebDataset-style: the key is the path up to the first dot of the file
    name, the extension the rest, lower-cased (``0.png`` for a sample's first of several images).
    """

    def __init__(self, path: str):
        self.path = path
        self.tar = tarfile.open(path, "r:")
        self.samples: list[tuple[str, dict[str, tarfile.TarInfo]]] = []
        for info in self.tar.getmembers():
            if not info.isfile():
                continue
            dirname, base = os.path.split(info.name)
            if "." not in base:
                continue
            stem, ext = base.split(".", 1)
            key = os.path.join(dirname, stem)
            if not self.samples or self.samples[-1][0] != key:
                self.samples.append((key, {}))
            self.samples[-1][1][ext.lower()] = info

    def read(self, info: tarfile.TarInfo) -> bytes:
        f = self.tar.extractfile(info)
        if f is None:
            raise OSError(f"{self.path}: {info.name} is not a regular file")
        return f.read()

    def close(self) -> None:
        self.tar.close()


def image_members(meta: dict, members: dict) -> list[str] | str:
    """The member names of a record's images, in order, or why they cannot be found (a string).

    A record with several images lists them in ``images``; otherwise its image is the first
    ``png`` / ``jpg`` / ``jpeg`` / ``webp`` member. Text records have none.
    """
    if meta.get("task") == "text":
        return []
    names = meta.get("images")
    if names is not None:
        if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
            return "images is not a non-empty list of member names"
        absent = [n for n in names if n.lower() not in members]
        return f"no {absent[0]!r} member" if absent else [n.lower() for n in names]
    ext = next((e for e in IMAGE_EXTS if e in members), None)
    return [ext] if ext is not None else f"no {'/'.join(IMAGE_EXTS)} member"


# --------------------------------------------------------------------------- one sample


def _string(value: Any, name: str) -> str:
    if not isinstance(value, str):
        raise BadSample("bad_field", f"{name} is {type(value).__name__}, not a string")
    return value


def _turns(conversations: Any, n_images: int, where: str) -> tuple[list[dict], list[Issue]]:
    """Chat turns in either style -> LLaVA-style turns with the images' marks in the first user
    turn, and the warnings they earn; ``BadSample`` if the chat breaks the layout."""
    if not isinstance(conversations, list) or not conversations:
        raise BadSample("bad_field", "conversations is not a non-empty list of turns")
    turns, warnings, expect = [], [], "human"
    for i, turn in enumerate(conversations):
        if not isinstance(turn, dict):
            raise BadSample("bad_field", f"conversations[{i}] is {type(turn).__name__}, not an object")
        if set(turn) == {"from", "value"}:
            role, value = turn["from"], turn["value"]
        elif set(turn) == {"role", "content"}:
            role, value = turn["role"], turn["content"]
        else:
            raise BadSample("bad_field", f"conversations[{i}] has keys {sorted(turn)}; expected "
                                         "role + content or from + value")
        value = _string(value, f"conversations[{i}] content")
        if role == "system" and i == 0:
            warnings.append(Issue(where, "system_turn", "the system turn is kept but not trained: "
                                                        "training uses the model's own system prompt"))
            turns.append({"from": "system", "value": value})
            continue
        speaker = "human" if role in _USER else "gpt" if role in _ASSISTANT else None
        if speaker is None:
            raise BadSample("bad_field", f"conversations[{i}] role {role!r} is not user/human or assistant/gpt"
                                         + (" (a system turn must come first)" if role == "system" else ""))
        if speaker != expect:
            raise BadSample("bad_field", f"conversations[{i}] is a {role} turn where a "
                                         f"{'user' if expect == 'human' else 'assistant'} turn belongs "
                                         "(turns alternate, user first)")
        expect = "gpt" if speaker == "human" else "human"
        if not value.replace("<image>", "").strip():
            raise BadSample("bad_field", f"conversations[{i}] ({role}) is empty")
        turns.append({"from": speaker, "value": value})
    if turns[-1]["from"] != "gpt":
        raise BadSample("bad_field", "the chat does not end with an assistant turn (its answer)")
    first = next(t for t in turns if t["from"] == "human")
    marks = [t["value"].count("<image>") for t in turns]
    if sum(marks) == 0:
        first["value"] = "<image>\n" * n_images + first["value"]
    elif first["value"].count("<image>") != sum(marks):
        raise BadSample("bad_field", "an <image> mark outside the first user turn: the model's chat layout "
                                     "puts every image at the start of the first user turn")
    elif sum(marks) != n_images:
        raise BadSample("bad_field", f"{sum(marks)} <image> marks for {n_images} image(s)")
    return turns, warnings


def _check_sample(task: Any, text: Any, conversations: Any, n_images: int, where: str
                  ) -> tuple[str, list[dict], list[Issue]]:
    """The fields every sample needs, however it was written: (text, turns, warnings)."""
    if task not in TASKS:
        raise BadSample("bad_field", f"task {task!r} is not one of {', '.join(TASKS)}")
    text = _string(text if text is not None else "", "text")
    if task in ("t2i", "text") and not text.strip():
        raise BadSample("bad_field", f"a {task} sample needs a non-empty text")
    if task == "t2i" and n_images != 1:
        raise BadSample("bad_field", f"a t2i sample takes exactly one image, got {n_images}")
    if task == "text" and n_images:
        raise BadSample("bad_field", "a text sample takes no image")
    if task == "i2t":
        if n_images < 1:
            raise BadSample("bad_field", "an i2t sample needs an image (image or images)")
        if conversations is None:
            if not text.strip():
                raise BadSample("bad_field", "an i2t sample needs conversations, question + answer, or a text caption")
            conversations = [{"from": "human", "value": CAPTION_PROMPT}, {"from": "gpt", "value": text}]
        turns, warnings = _turns(conversations, n_images, where)
        return text, turns, warnings
    return text, [], []


def parse_line(line: str, number: int, base: Path, where: str) -> Sample:
    """One JSONL line -> ``Sample`` (images not yet opened); ``BadSample`` names its problem."""
    try:
        obj = json.loads(line)
    except ValueError as e:
        raise BadSample("bad_json", f"not JSON ({e})") from None
    if not isinstance(obj, dict):
        raise BadSample("bad_json", f"a {type(obj).__name__}, not an object")
    unknown = sorted(set(obj) - set(_KEYS))
    if unknown:
        raise BadSample("bad_field", f"unknown key {unknown[0]!r} (keys: {', '.join(_KEYS)})")
    if "task" not in obj:
        raise BadSample("bad_field", "no task (t2i, i2t or text)")
    task = obj["task"]
    if "image" in obj and "images" in obj:
        raise BadSample("bad_field", "both image and images; give one")
    paths = [obj["image"]] if "image" in obj else obj.get("images", [])
    if not isinstance(paths, list) or not all(isinstance(p, str) and p.strip() for p in paths):
        raise BadSample("bad_field", "image must be a path and images a list of paths")
    if "images" in obj and not paths:
        raise BadSample("bad_field", "images is empty")
    has_qa = "question" in obj or "answer" in obj
    if task != "i2t":
        extra = [k for k in ("question", "answer", "conversations") if k in obj]
        if extra:
            raise BadSample("bad_field", f"{extra[0]} belongs to i2t samples, not {task!r}")
    conversations = obj.get("conversations")
    if has_qa:
        if "conversations" in obj:
            raise BadSample("bad_field", "both question/answer and conversations; give one")
        if "question" not in obj or "answer" not in obj:
            raise BadSample("bad_field", f"{'answer' if 'question' in obj else 'question'} is missing")
        conversations = [{"from": "human", "value": _string(obj["question"], "question")},
                         {"from": "gpt", "value": _string(obj["answer"], "answer")}]
    key = obj.get("id", f"{number:08d}")
    if not isinstance(key, str) or not _ID.match(key):
        raise BadSample("bad_field", f"id {key!r} is not 1-64 letters, digits, _ or -")
    meta = obj.get("meta")
    if meta is not None and not isinstance(meta, dict):
        raise BadSample("bad_field", f"meta is {type(meta).__name__}, not an object")
    text, turns, warnings = _check_sample(task, obj.get("text"), conversations, len(paths), where)
    return Sample(key=key, task=task, text=text, conversations=turns, where=where, line=number,
                  image_paths=[base / p for p in paths], image_names=paths, n_images=len(paths), meta=meta,
                  warnings=warnings)


def parse_record(meta: Any, members: dict, key: str, where: str) -> tuple[Sample, list[str]]:
    """A shard's ``{key}.json`` and its members -> (``Sample``, image member names)."""
    if not isinstance(meta, dict):
        raise BadSample("bad_json", f"a {type(meta).__name__}, not an object")
    names = image_members(meta, members)
    if isinstance(names, str):
        raise BadSample("missing_image", names)
    conv = meta.get("conversations")
    # the trainer's records may carry an empty conversations list outside i2t
    conv = None if conv == [] and meta.get("task") != "i2t" else conv
    if conv is not None and meta.get("task") != "i2t":
        raise BadSample("bad_field", f"conversations in a {meta.get('task')!r} record")
    if meta.get("task") == "i2t" and conv is None:
        raise BadSample("bad_field", "an i2t record without conversations (the trainer needs a user/assistant pair)")
    text, turns, warnings = _check_sample(meta.get("task"), meta.get("text"), conv, len(names), where)
    source = meta.get("source") if isinstance(meta.get("source"), dict) else {}
    return Sample(key=key, task=meta["task"], text=text, conversations=turns, where=where,
                  line=int(source.get("line", 0) or 0), n_images=len(names), warnings=warnings), names


def inspect_image(data: bytes, min_side: int) -> tuple[int, int, str]:
    """(width, height, PIL format) of an encoded image, decoded in full as training decodes it;
    ``BadSample`` if it does not decode or its short side is below ``min_side`` pixels."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            fmt = im.format or "?"
            im.convert("RGB")  # the full decode: a truncated file fails here, not in training
            w, h = im.size
    except UnidentifiedImageError:
        raise BadSample("bad_image", "is not in an image format PIL reads") from None
    except Exception as e:  # PIL raises many types on bad data; every one means unreadable
        raise BadSample("bad_image", f"does not decode ({type(e).__name__}: {e})") from None
    if min(w, h) < min_side:
        raise BadSample("small_image", f"{w}x{h} px, short side below --min-side {min_side}")
    return w, h, fmt


# --------------------------------------------------------------------------- lengths


@dataclass
class _Probe:
    """What the collate reads of a sample; images stand in as 1-pixel tensors (the token count
    of an image does not depend on its pixels)."""

    key: str
    task: str
    text: str
    conversations: list[dict]
    images: list[torch.Tensor]

    @property
    def image(self) -> torch.Tensor | None:
        return self.images[0] if self.images else None


class LengthMeter:
    """Tokens of a sample as the trainer lays it out (chat template, image blocks), through the
    trainer's own collate, for a model config and a text tokenizer."""

    def __init__(self, model_cfg, text_tokenizer):
        from cheers.collate import Collator

        self.collator = Collator(model_cfg, text_tokenizer, cfg_drop_rate=0.0)
        self.max_seq_len = model_cfg.max_seq_len

    def __call__(self, sample: Sample) -> tuple[int, Issue | None]:
        """(tokens, the issue over-length earns or None)."""
        probe = _Probe(sample.key, sample.task, sample.text, sample.conversations,
                       [torch.zeros(3, 1, 1)] * sample.n_images)
        try:
            seq = self.collator.sequence(probe)
        except InputError as e:
            raise BadSample("bad_field", str(e)) from None
        n, cap = len(seq), self.max_seq_len
        if n <= cap:
            return n, None
        if any(i >= 0 for i in seq.image_index[cap:]):
            return n, Issue(sample.where, "too_long", f"{n} tokens with an image past max_seq_len={cap}")
        return n, Issue(sample.where, "truncated", f"{n} tokens > max_seq_len={cap}: training cuts the text at {cap}")


# --------------------------------------------------------------------------- whole files


@dataclass
class Scan:
    """What checking one JSONL file or one set of shards found.

    ``samples``: the usable ones in order; ``records``: lines (or shard records) read;
    ``issues``: problems (skipped) and warnings (kept), in order; ``lengths``: tokens of each
    usable sample by task (empty when no ``LengthMeter`` was given).
    """

    source: str
    records: int = 0
    samples: list[Sample] = field(default_factory=list)
    issues: list[Issue] = field(default_factory=list)
    lengths: dict[str, list[int]] = field(default_factory=dict)
    max_seq_len: int | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def problems(self) -> list[Issue]:
        return [i for i in self.issues if i.skipped]

    def counts(self) -> dict[str, int]:
        c = Counter(s.task for s in self.samples)
        return {t: c[t] for t in TASKS}

    def length_table(self) -> dict[str, dict[str, int]]:
        """Per task and overall: p50 / p90 / p99 / max tokens and how many exceed max_seq_len."""
        table = {}
        groups = {**{t: v for t, v in self.lengths.items() if v},
                  "all": [n for v in self.lengths.values() for n in v]}
        for name, values in groups.items():
            if not values:
                continue
            arr = np.asarray(values)
            row = {f"p{q}": int(np.percentile(arr, q, method="higher")) for q in (50, 90, 99)}
            row["max"] = int(arr.max())
            row["over"] = int((arr > (self.max_seq_len or np.inf)).sum())
            table[name] = row
        return table

    def report(self, max_per_reason: int = 50) -> str:
        """A plain-text report: counts per task, every issue (``max_per_reason`` of each kind),
        token-length percentiles."""
        problems = self.problems
        lines = [f"{self.source}: {self.records} read, {len(self.samples)} usable, {len(problems)} skipped",
                 "  samples per task: " + ", ".join(f"{t} {n}" for t, n in self.counts().items())]
        for title, group in (("skipped", problems), ("kept, with a warning", [i for i in self.issues if not i.skipped])):
            if not group:
                continue
            by_reason = Counter(i.reason for i in group)
            lines.append(f"  {title}: " + ", ".join(f"{r} {n}" for r, n in by_reason.items()))
            shown: Counter = Counter()
            for issue in group:
                shown[issue.reason] += 1
                if shown[issue.reason] <= max_per_reason:
                    lines.append(f"    {issue}")
            lines += [f"    ... and {n - max_per_reason} more {r}" for r, n in by_reason.items() if n > max_per_reason]
        lines += [f"  {note}" for note in self.notes]
        table = self.length_table()
        if table:
            lines.append(f"  tokens per sample (max_seq_len {self.max_seq_len}):")
            for name, row in table.items():
                lines.append(f"    {name:5s} p50 {row['p50']:6d}  p90 {row['p90']:6d}  p99 {row['p99']:6d}  "
                             f"max {row['max']:6d}  over {row['over']}")
        elif self.max_seq_len is None:
            lines.append("  tokens per sample: not measured (give a tokenizer and a model config)")
        return "\n".join(lines)


def _finish(scan: Scan, sample: Sample, meter: LengthMeter | None) -> None:
    """Measure ``sample``; add it to ``scan`` (or its problem)."""
    issues = list(sample.warnings)
    if meter is not None:
        try:
            n, issue = meter(sample)
        except BadSample as e:
            scan.issues.append(Issue(sample.where, e.reason, e.detail))
            return
        if issue is not None:
            issues.append(issue)
            if issue.skipped:
                scan.issues.append(issue)
                return
        scan.lengths.setdefault(sample.task, []).append(n)
    scan.issues += issues
    scan.samples.append(sample)


def _open_images(sample: Sample, min_side: int) -> Sample:
    """Read and decode each image file of a JSONL sample (fills ``sizes``)."""
    sizes = []
    for k, (path, name) in enumerate(zip(sample.image_paths, sample.image_names)):
        which = f"image {name}" if sample.n_images == 1 else f"images[{k}] {name}"
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise BadSample("missing_image", f"{which} does not exist") from None
        except OSError as e:
            raise BadSample("missing_image", f"{which} cannot be read ({e.strerror or e})") from None
        try:
            sizes.append(inspect_image(data, min_side))
        except BadSample as e:
            raise BadSample(e.reason, f"{which} {e.detail}") from None
    sample.sizes = sizes
    return sample


def scan_jsonl(path: str | Path, *, min_side: int = 32, meter: LengthMeter | None = None, workers: int = 4,
               progress: Callable[[int], None] | None = None) -> Scan:
    """Check every line of a JSONL file: schema, images (opened in ``workers`` threads, decoded
    in full), ids, and with a ``meter`` token lengths. ``progress(n)`` gets lines done."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"JSONL file not found: {path}")
    scan = Scan(source=str(path), max_seq_len=meter.max_seq_len if meter else None)
    base, name = path.parent, path.name
    parsed: list[Sample | Issue] = []
    keys: dict[str, int] = {}
    with path.open("rb") as f:
        for number, raw in enumerate(f, start=1):
            where = f"{name}:{number}"
            if not raw.strip():
                continue  # a blank line is no sample, and no problem
            scan.records += 1
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                parsed.append(Issue(where, "bad_json", f"not UTF-8 ({e})"))
                continue
            try:
                sample = parse_line(text, number, base, where)
            except BadSample as e:
                parsed.append(Issue(where, e.reason, e.detail))
                continue
            if sample.key in keys:
                parsed.append(Issue(where, "duplicate_id", f"id {sample.key!r} is also line {keys[sample.key]}'s"))
                continue
            keys[sample.key] = number
            parsed.append(sample)
    todo = [p for p in parsed if isinstance(p, Sample)]
    if progress and len(parsed) > len(todo):
        progress(len(parsed) - len(todo))

    def job(sample: Sample) -> Sample | Issue:
        try:
            return _open_images(sample, min_side)
        except BadSample as e:
            return Issue(sample.where, e.reason, e.detail)

    opened: dict[int, Sample | Issue] = {}
    with ThreadPoolExecutor(max(1, workers), thread_name_prefix="check") as pool:
        for sample, out in zip(todo, pool.map(job, todo)):
            opened[id(sample)] = out
            if progress:
                progress(1)
    for item in parsed:  # in line order, whatever order the threads finished in
        out = opened.get(id(item), item)
        if isinstance(out, Issue):
            scan.issues.append(out)
        else:
            _finish(scan, out, meter)
    return scan


def shard_paths(path: str | Path) -> tuple[list[Path], dict | None]:
    """The shards of a folder written by ``pack`` (its manifest's list) or of any folder
    (``*.tar``), or one ``.tar`` file; and the manifest, if any."""
    path = Path(path)
    if path.is_file():
        return [path], None
    if not path.is_dir():
        raise InputError(f"no such file or folder: {path}")
    manifest_path = path / "manifest.json"
    if manifest_path.is_file():
        try:
            manifest = json.loads(manifest_path.read_text())
            names = [s["name"] if isinstance(s, dict) else s for s in manifest["shards"]]
        except (ValueError, KeyError, TypeError) as e:
            raise InputError(f"{manifest_path}: not a readable manifest ({type(e).__name__}: {e})") from None
        return [path / n for n in names], manifest
    paths = sorted(path.glob("*.tar"))
    if not paths:
        raise InputError(f"{path} holds no .tar shard and no manifest.json")
    return paths, None


def _records(paths: list[Path], scan: Scan) -> Iterator[tuple[TarShard, str, dict]]:
    for path in paths:
        try:
            shard = TarShard(str(path))
        except (tarfile.TarError, OSError, EOFError) as e:
            scan.issues.append(Issue(path.name, "bad_shard", f"unreadable shard ({type(e).__name__}: {e})"))
            continue
        try:
            for key, members in shard.samples:
                yield shard, key, members
        finally:
            shard.close()


def scan_shards(path: str | Path, *, min_side: int = 32, meter: LengthMeter | None = None,
                progress: Callable[[int], None] | None = None) -> Scan:
    """Check every record of a shard folder (or one ``.tar``) as ``scan_jsonl`` checks lines; a
    manifest's per-task counts are compared with what the shards hold."""
    paths, manifest = shard_paths(path)
    scan = Scan(source=str(path), max_seq_len=meter.max_seq_len if meter else None)
    missing = [p for p in paths if not p.is_file()]
    for p in missing:
        scan.issues.append(Issue(p.name, "bad_shard", "a shard the manifest lists is missing"))
    for shard, key, members in _records([p for p in paths if p.is_file()], scan):
        scan.records += 1
        if progress:
            progress(1)
        where = f"{Path(shard.path).name}:{key}"
        try:
            if "json" not in members:
                raise BadSample("bad_json", "no .json member")
            try:
                meta = json.loads(shard.read(members["json"]))
            except (ValueError, OSError, tarfile.TarError) as e:
                raise BadSample("bad_json", f"{type(e).__name__}: {e}") from None
            src = meta.get("source") if isinstance(meta, dict) else None
            if isinstance(src, dict) and src.get("line"):
                where += f" ({src.get('file')}:{src['line']})"
            sample, names = parse_record(meta, members, key, where)
            try:
                sample.sizes = [inspect_image(shard.read(members[n]), min_side) for n in names]
            except (OSError, tarfile.TarError) as e:
                raise BadSample("bad_image", f"{type(e).__name__}: {e}") from None
        except BadSample as e:
            scan.issues.append(Issue(where, e.reason, e.detail))
            continue
        _finish(scan, sample, meter)
    if manifest is not None and isinstance(manifest.get("tasks"), dict):
        found = scan.counts()
        for task, n in manifest["tasks"].items():
            if found.get(task, 0) != n and not missing:
                scan.notes.append(f"the manifest counts {n} {task} samples; the shards hold {found.get(task, 0)} usable")
    return scan


# --------------------------------------------------------------------------- packing


def _image_member(path: Path, fmt: str) -> bytes:
    """An image file's bytes as packed: PNG, JPEG and WebP as they are (nothing re-encoded),
    other formats (GIF, BMP, TIFF, ...) as PNG, which every WebDataset reader knows."""
    data = path.read_bytes()
    if fmt in _FORMAT_EXT:
        return data
    with Image.open(io.BytesIO(data)) as im:
        buf = io.BytesIO()
        im.convert("RGBA" if "A" in im.getbands() else "RGB").save(buf, format="PNG")
    return buf.getvalue()


def _write_shard(path: Path, samples: list[Sample], source: str) -> int:
    import webdataset as wds

    tmp = path.with_name(path.name + ".tmp")
    with wds.TarWriter(str(tmp), encoder=False, mtime=0.0) as sink:
        for s in samples:
            rec = {"__key__": s.key, "json": json.dumps(s.record(source), ensure_ascii=False).encode("utf-8")}
            for name, img_path, (_, _, fmt) in zip(s.member_names(), s.image_paths, s.sizes):
                rec[name] = _image_member(img_path, fmt)
            sink.write(rec)
    tmp.replace(path)  # a shard is whole or absent
    return len(samples)


def shard_pattern(out: str | Path, n: int) -> str:
    """The brace pattern that names ``n`` packed shards (what ``data.shards`` takes)."""
    return str(Path(out) / (f"data-{{000000..{n - 1:06d}}}.tar" if n > 1 else "data-000000.tar"))


def pack(jsonl: str | Path, out: str | Path, *, shard_size: int = 1000, workers: int = 4, min_side: int = 32,
         meter: LengthMeter | None = None, progress: Callable[[str, int, int], None] | None = None) -> Scan:
    """Check ``jsonl`` (``scan_jsonl``) and write its usable samples, in line order, as
    ``data-%06d.tar`` shards of ``shard_size`` samples in the new folder ``out``, plus
    ``manifest.json`` (shards, samples per task, every skipped line and warning, token lengths).

    ``progress(stage, n, total)``: ``stage`` is ``"check"`` (lines) or ``"pack"`` (samples).
    Raises ``InputError`` before any work when ``out`` is a non-empty folder or a file, and when
    no line is usable (nothing is written then).
    """
    if shard_size < 1 or workers < 1 or min_side < 0:
        raise InputError(f"shard_size={shard_size}, workers={workers} must be >= 1 and min_side={min_side} >= 0")
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise InputError(f"--out {out} is {'a file' if not out.is_dir() else 'a folder that is not empty'}; "
                         "give a new folder (old shards would mix with the new)")
    jsonl = Path(jsonl)
    if not jsonl.is_file():
        raise InputError(f"JSONL file not found: {jsonl}")
    total_lines = sum(1 for raw in jsonl.open("rb") if raw.strip())
    scan = scan_jsonl(jsonl, min_side=min_side, meter=meter, workers=workers,
                      progress=(lambda n: progress("check", n, total_lines)) if progress else None)
    if not scan.samples:
        raise InputError(f"{jsonl}: no usable line of {scan.records}; nothing written\n{scan.report()}")
    out.mkdir(parents=True, exist_ok=True)
    chunks = [scan.samples[i:i + shard_size] for i in range(0, len(scan.samples), shard_size)]
    names = [f"data-{i:06d}.tar" for i in range(len(chunks))]
    with ThreadPoolExecutor(min(workers, len(chunks)), thread_name_prefix="pack") as pool:
        futures = [pool.submit(_write_shard, out / n, c, jsonl.name) for n, c in zip(names, chunks)]
        for fut in futures:
            done = fut.result()  # a worker's error surfaces here
            if progress:
                progress("pack", done, len(scan.samples))
    manifest = {
        "format": "cheers WebDataset shards (train/data.py)",
        "source": str(jsonl.resolve()), "lines": scan.records, "samples": len(scan.samples),
        "tasks": scan.counts(), "shard_size": shard_size, "min_side": min_side,
        "shards": [{"name": n, "samples": len(c)} for n, c in zip(names, chunks)],
        "pattern": shard_pattern(out, len(chunks)),
        "skipped": [_issue_json(i) for i in scan.problems],
        "warnings": [_issue_json(i) for i in scan.issues if not i.skipped],
        "max_seq_len": scan.max_seq_len, "tokens": scan.length_table() or None,
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1, ensure_ascii=False) + "\n")
    return scan


def _issue_json(issue: Issue) -> dict[str, Any]:
    return {"where": issue.where, "reason": issue.reason, "detail": issue.detail}

