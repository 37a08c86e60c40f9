"""Files of the shapes world: training shards, GenEval metadata, an MMBench TSV.

Every product draws sample ``i`` from ``numpy.random.default_rng([seed, stream, i])``
with its own ``stream`` constant, so a sample depends only on (seed, product, i): the
same arguments give the same files, shard size does not change the samples, and
training and held-out sets stay apart when they are written with different seeds
(``TRAIN_SEED`` vs ``HELDOUT_SEED`` by default).
"""

from __future__ import annotations

import base64
import csv
import io
import json
import multiprocessing
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

import numpy as np
from PIL import Image

from cheers.errors import InputError
from cheers.shapes.scenes import Scene, check_object_size, render, sample_scene, scene_for_metadata
from cheers.shapes.texts import (
    MMBENCH_L2,
    OPTION_LETTERS,
    caption,
    format_mmbench_prompt,
    geneval_metadata,
    mmbench_questions,
    open_question,
    open_questions,
    text_sample,
)

TRAIN_SEED = 0
HELDOUT_SEED = 1
DEFAULT_MIX: dict[str, float] = {"t2i": 0.45, "i2t": 0.45, "text": 0.10}
TASKS: tuple[str, ...] = ("t2i", "i2t", "text")
CIRCULAR_OFFSET = 1_000_000
MMBENCH_COLUMNS: tuple[str, ...] = (
    "index", "question", "hint", "A", "B", "C", "D", "answer", "category", "image",
    "source", "l2-category", "comment", "split",
)
_STREAM_SHARDS, _STREAM_GENEVAL, _STREAM_MMBENCH, _STREAM_REFERENCE, _STREAM_OPEN = 11, 12, 13, 14, 15


def _rng(seed: int, stream: int, i: int) -> np.random.Generator:
    return np.random.default_rng([int(seed), stream, int(i)])


def png_bytes(image: np.ndarray) -> bytes:
    """PNG encoding of an RGB uint8 [H, W, 3] array (deterministic bytes)."""
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def _task_schedule(n: int, mix: Mapping[str, float]) -> list[str]:
    """Tasks for samples 0..n-1 in the ratios of ``mix``, interleaved evenly: sample i goes
    to the task furthest behind its quota, so any prefix keeps the ratios."""
    unknown = set(mix) - set(TASKS)
    if unknown:
        raise InputError(f"mix has unknown tasks {sorted(unknown)}; expected {TASKS}")
    weights = {t: float(mix.get(t, 0.0)) for t in TASKS}
    if any(w < 0 for w in weights.values()) or sum(weights.values()) <= 0:
        raise InputError(f"mix {dict(mix)} needs non-negative ratios with a positive sum")
    total = sum(weights.values())
    ratio = {t: w / total for t, w in weights.items()}
    done = dict.fromkeys(TASKS, 0)
    out = []
    for i in range(n):
        task = max(TASKS, key=lambda t: (ratio[t] * (i + 1) - done[t], -TASKS.index(t)))
        done[task] += 1
        out.append(task)
    return out


def _i2t_exchange(scene: Scene, rng: np.random.Generator) -> tuple[str, str]:
    """One question about ``scene`` and its answer: an MMBench-style multiple choice (60%),
    answered by its option's text, or a short open question. (MMBench's rule-based extraction,
    ``can_infer_text``, reads the letter back from the text when it is the only option named.)"""
    if rng.random() < 0.6:
        qs = mmbench_questions(scene, rng)
        q = qs[int(rng.integers(len(qs)))]
        style = "llava" if rng.random() < 0.7 else "vlmevalkit"
        answer = q["options"][OPTION_LETTERS.index(q["answer"])]
        return format_mmbench_prompt(q["question"], q["options"], q["hint"] or None, style), answer
    return open_question(scene, rng)


def _check_turns(i2t_turns: int) -> None:
    if i2t_turns < 1:
        raise InputError(f"i2t_turns={i2t_turns}; must be >= 1")


def make_sample(task: str, rng: np.random.Generator, image_size: int = 64,
                kinds: Sequence[str] | None = None, i2t_turns: int = 1,
                object_size: str = "standard") -> tuple[dict, np.ndarray | None]:
    """One training sample: (the JSON record the trainer reads, see ``cheers.train.data``; RGB image or None).

    t2i: ``text`` is the caption. i2t: ``i2t_turns`` human/gpt exchanges about the image in
    ``conversations`` (each an MMBench-style multiple choice answered by its option's text, or a
    short open question; no question twice), ``text`` the scene's caption. text: ``text`` only,
    ``width = height = 0``. ``object_size``: the scenes' size range (``OBJECT_SIZES``).
    """
    _check_turns(i2t_turns)
    if task == "text":
        return {"task": "text", "text": text_sample(rng, image_size), "width": 0, "height": 0}, None
    kind = None if kinds is None else str(rng.choice(list(kinds)))
    scene = sample_scene(rng, image_size, kind, object_size)
    image = render(scene)
    record = {"task": task, "text": caption(scene, rng),
              "width": scene.width, "height": scene.height}
    if task == "i2t":
        exchanges: list[tuple[str, str]] = []
        for _ in range(4 * i2t_turns):  # a scene with few distinct questions may give fewer turns
            prompt, answer = _i2t_exchange(scene, rng)
            if all(prompt != p for p, _ in exchanges):
                exchanges.append((prompt, answer))
            if len(exchanges) == i2t_turns:
                break
        record["conversations"] = []
        for k, (prompt, answer) in enumerate(exchanges):
            record["conversations"] += [
                {"from": "human", "value": ("<image>\n" if k == 0 else "") + prompt},
                {"from": "gpt", "value": answer},
            ]
    elif task != "t2i":
        raise InputError(f"unknown task {task!r}; expected one of {TASKS}")
    return record, image


def _write_shard(path: str, tasks: Sequence[str], first: int, seed: int, image_size: int,
                 kinds: Sequence[str] | None, i2t_turns: int, object_size: str) -> str:
    """Samples ``first .. first + len(tasks) - 1`` into the tar ``path``: a unit of work that
    depends on nothing else, so shards can be written in any order, by any process."""
    import webdataset as wds

    with wds.TarWriter(path, encoder=False, mtime=0.0) as sink:
        for i, task in enumerate(tasks, start=first):
            record, image = make_sample(task, _rng(seed, _STREAM_SHARDS, i), image_size, kinds,
                                        i2t_turns, object_size)
            sample = {"__key__": f"{i:08d}", "json": json.dumps(record).encode("utf-8")}
            if image is not None:
                sample["png"] = png_bytes(image)
            sink.write(sample)
    return path


def write_shards(out_dir: str, n_samples: int, seed: int = TRAIN_SEED, image_size: int = 64,
                 mix: Mapping[str, float] | None = None, samples_per_shard: int = 1000,
                 kinds: Sequence[str] | None = None, i2t_turns: int = 1,
                 workers: int = 1,
                 progress: Callable[[int], None] | None = None, object_size: str = "standard") -> list[str]:
    """Write ``n_samples`` samples as WebDataset tars ``shapes-%06d.tar`` in ``out_dir``.

    ``kinds`` restricts the scene layouts (``SCENE_KINDS``; default: all), e.g. single objects
    for the first phase of a curriculum. ``i2t_turns``: questions per understanding sample.
    ``workers`` > 1 writes shards in that many processes; the files are the same bytes.
    ``object_size``: the scenes' size range (``cheers.shapes.scenes.OBJECT_SIZES``).
    ``progress(n)`` is called with the samples of each shard written.

    Per sample ``{key}.json`` (the record ``cheers.train.data`` reads) and, except for text samples,
    ``{key}.png``; keys are ``%08d`` of the sample number. Also writes ``manifest.json``
    (arguments, shard names, samples per task). Returns the shard paths.
    """
    if n_samples < 1 or samples_per_shard < 1 or workers < 1:
        raise InputError(f"n_samples={n_samples}, samples_per_shard={samples_per_shard}, workers={workers}; "
                         f"each must be >= 1")
    _check_turns(i2t_turns)  # before any worker starts
    check_object_size(object_size)
    os.makedirs(out_dir, exist_ok=True)
    tasks = _task_schedule(n_samples, mix or DEFAULT_MIX)
    jobs = [(os.path.join(out_dir, f"shapes-{start // samples_per_shard:06d}.tar"),
             tasks[start:start + samples_per_shard], start, seed, image_size, kinds, i2t_turns, object_size)
            for start in range(0, n_samples, samples_per_shard)]
    if workers == 1 or len(jobs) == 1:
        for job in jobs:
            _write_shard(*job)
            if progress:
                progress(len(job[1]))
    else:
        # fork on Linux, as torch's DataLoader does: spawn would re-import the caller's main
        # script, which breaks any script that calls this without an `if __name__` guard. The
        # children run numpy, PIL and tar writing only, none of the parent's thread pools.
        ctx = multiprocessing.get_context("fork" if sys.platform.startswith("linux") else None)
        with ProcessPoolExecutor(max_workers=min(workers, len(jobs)), mp_context=ctx) as pool:
            futures = {pool.submit(_write_shard, *job): len(job[1]) for job in jobs}
            for done in as_completed(futures):
                done.result()  # a worker's error surfaces here
                if progress:
                    progress(futures[done])
    paths = [job[0] for job in jobs]
    manifest = {
        "n_samples": n_samples, "seed": seed, "image_size": image_size,
        "mix": dict(mix or DEFAULT_MIX), "samples_per_shard": samples_per_shard,
        "kinds": list(kinds) if kinds is not None else None, "i2t_turns": i2t_turns,
        "mcq_answer": "option", "object_size": object_size,  # older shards answered with the letter
        "shards": [os.path.basename(p) for p in paths],
        "tasks": {t: tasks.count(t) for t in TASKS},
    }
    with open(os.path.join(out_dir, "manifest.json"), "w") as fp:
        json.dump(manifest, fp, indent=1)
    return paths


def write_geneval_metadata(path: str, n_per_tag: int, seed: int = HELDOUT_SEED) -> list[dict]:
    """GenEval's ``evaluation_metadata.jsonl`` for the shapes world: ``n_per_tag`` records
    per tag (shape names as classes), one JSON object per line. Returns the records."""
    records = geneval_metadata(n_per_tag, _rng(seed, _STREAM_GENEVAL, 0))
    if os.path.dirname(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as fp:
        for r in records:
            fp.write(json.dumps(r) + "\n")
    return records


def read_geneval_metadata(path: str) -> list[dict]:
    from cheers.eval.geneval_rules import read_jsonl

    return read_jsonl(path, "GenEval metadata")


def write_geneval_reference(out_dir: str, metadata: list[dict], seed: int = HELDOUT_SEED,
                            image_size: int = 64, n_images: int = 4, object_size: str = "standard") -> None:
    """Reference images that satisfy each record, in GenEval's output layout
    ``<out_dir>/<%05d>/metadata.jsonl`` + ``samples/<%04d>.png``: what a perfect generator
    would write (a scorer run on them should find every image correct)."""
    for p, meta in enumerate(metadata):
        folder = os.path.join(out_dir, f"{p:05d}")
        os.makedirs(os.path.join(folder, "samples"), exist_ok=True)
        with open(os.path.join(folder, "metadata.jsonl"), "w") as fp:
            json.dump(meta, fp)
        for k in range(n_images):
            scene = scene_for_metadata(meta, _rng(seed, _STREAM_REFERENCE, p * 1000 + k), image_size, object_size)
            Image.fromarray(render(scene)).save(os.path.join(folder, "samples", f"{k:04d}.png"))


def rotate_question(row: dict, k: int) -> dict:
    """The k-th CircularEval copy of a question: options shifted so option ``(j + k) % n``
    lands on letter j, the answer letter moved with its option, ``index + k * 1_000_000``."""
    letters = [ch for ch in OPTION_LETTERS if row.get(ch, "") != ""]
    n = len(letters)
    opts = [row[ch] for ch in letters]
    ans = letters.index(row["answer"])
    out = dict(row)
    for j in range(n):
        out[letters[j]] = opts[(j + k) % n]
    out["answer"] = letters[(ans - k) % n]
    out["index"] = int(row["index"]) + k * CIRCULAR_OFFSET
    return out


def mmbench_rows(n: int, seed: int = HELDOUT_SEED, image_size: int = 64,
                 circular: bool = True, object_size: str = "standard") -> list[dict]:
    """``n`` MMBench questions (row dicts with the TSV columns), one scene each, categories
    in turn; then, with ``circular``, the rotated copies (k = 1 .. options - 1)."""
    if n < 1:
        raise InputError(f"n={n}; must be >= 1")
    rows = []
    for i in range(n):
        rng = _rng(seed, _STREAM_MMBENCH, i)
        scene: Scene = sample_scene(rng, image_size, object_size=object_size)
        qs = mmbench_questions(scene, rng)
        want = list(MMBENCH_L2)[i % len(MMBENCH_L2)]
        pick = [q for q in qs if q["category"] == want] or qs
        q = pick[int(rng.integers(len(pick)))]
        row = {c: "" for c in MMBENCH_COLUMNS}
        row.update({
            "index": i, "question": q["question"], "hint": q["hint"], "answer": q["answer"],
            "category": q["category"], "l2-category": q["l2-category"],
            "image": base64.b64encode(png_bytes(render(scene))).decode("ascii"),
            "source": "shapes-world", "comment": "", "split": "dev",
        })
        for ch, opt in zip(OPTION_LETTERS, q["options"]):
            row[ch] = opt
        rows.append(row)
    if circular:
        rows += [rotate_question(r, k) for k in range(1, 4) for r in rows[:n]
                 if k < sum(1 for ch in OPTION_LETTERS if r[ch] != "")]
    return rows


def open_question_rows(n: int, seed: int = HELDOUT_SEED, image_size: int = 64,
                       object_size: str = "standard") -> list[dict]:
    """``n`` open questions in the training's own phrasing (``world.open_questions``), one
    scene each, categories colour, shape and count in turn: rows ``{index, image (base64 PNG),
    question, answer, category}`` for ``cheers.eval.answering.answer_rows``."""
    if n < 1:
        raise InputError(f"n={n}; must be >= 1")
    cats = ("colour", "shape", "count")
    rows = []
    for i in range(n):
        rng = _rng(seed, _STREAM_OPEN, i)
        while True:  # a scene of one shape drawn several times has no colour question
            scene = sample_scene(rng, image_size, object_size=object_size)
            pick = [q for q in open_questions(scene) if q["category"] == cats[i % len(cats)]]
            if pick:
                break
        q = pick[int(rng.integers(len(pick)))]
        rows.append({"index": i, "question": q["question"], "answer": q["answer"], "category": q["category"],
                     "image": base64.b64encode(png_bytes(render(scene))).decode("ascii")})
    return rows


def write_mmbench_tsv(path: str, n: int, seed: int = HELDOUT_SEED, image_size: int = 64,
                      circular: bool = True, object_size: str = "standard") -> list[dict]:
    """The MMBench TSV (columns ``MMBENCH_COLUMNS``, tab-separated, base64 PNG images) of
    ``mmbench_rows``. Returns the rows."""
    rows = mmbench_rows(n, seed, image_size, circular, object_size)
    if os.path.dirname(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", newline="") as fp:
        w = csv.DictWriter(fp, fieldnames=list(MMBENCH_COLUMNS), delimiter="\t", lineterminator="\n")
        w.writeheader()
        for r in rows:
            w.writerow(r)
    return rows


def _corpus(shard_dir: Path) -> list[str]:
    """Every caption and conversation turn in the shards of ``shard_dir``, read with the
    training loader's shard index."""
    from cheers.train.data import read_shard_records

    texts = []
    for path in sorted(shard_dir.glob("*.tar")):
        for _key, rec in read_shard_records(path):
            texts.append(rec.get("text", ""))
            texts += [t["value"].replace("<image>", "") for t in rec.get("conversations", [])]
    return texts


def train_text_tokenizer(shard_dirs: list[Path], extra: list[str], vocab_size: int = 512):
    """Byte-level BPE over the shards' texts plus ``extra``. Every sample also carries the
    chat template (the system turn, the role names): it enters the corpus at that frequency,
    or BPE leaves it in single letters (a 53-token generation prompt instead of 30)."""
    from cheers.text_tokenizer import DEFAULT_SYSTEM, train_bpe

    corpus = list(extra)
    for d in shard_dirs:
        corpus += _corpus(d)
    corpus += [DEFAULT_SYSTEM, "system", "user", "assistant"] * len(corpus)  # as the template encodes them
    return train_bpe(corpus, vocab_size=vocab_size)


def make_tokenizer(tok_dir: Path, shard_dirs: list[Path], seed: int, object_size: str,
                   vocab_size: int = 512) -> None:
    """The world's tokenizer in ``tok_dir``, made once: BPE over the shards' texts and 200
    MMBench prompts (their option layout appears in no training sample)."""
    from cheers.shapes.texts import format_mmbench_prompt

    if (tok_dir / "tokenizer.json").is_file():
        return
    extra = [format_mmbench_prompt(r["question"], [r[c] for c in "ABCD" if r[c]], r["hint"] or None)
             for r in mmbench_rows(200, seed=seed + 100, circular=False, object_size=object_size)]
    train_text_tokenizer(shard_dirs, extra, vocab_size).save(tok_dir)


def main(argv: list[str] | None = None) -> None:
    """``python -m cheers.shapes.dataset --out DIR``: training shards of the shapes world in DIR
    and, in DIR/tokenizer, a byte-level BPE over their texts sized for the flavour it trains."""
    import argparse

    from tqdm import tqdm

    from cheers.config import flavour
    from cheers.shapes.scenes import OBJECT_SIZES

    ap = argparse.ArgumentParser(prog="python -m cheers.shapes.dataset", description=main.__doc__)
    ap.add_argument("--out", type=Path, required=True, help="folder for shapes-000000.tar, ... and tokenizer/")
    ap.add_argument("--samples", type=int, default=2000, help="samples in all (default: 2000)")
    ap.add_argument("--samples-per-shard", type=int, default=500, help="default: 500")
    ap.add_argument("--seed", type=int, default=TRAIN_SEED, help=f"default: {TRAIN_SEED}")
    ap.add_argument("--flavour", choices=("debug", "shapes"), default="shapes",
                    help="the model flavour the tokenizer is for: its vocabulary fits llm.vocab_size (default: shapes)")
    ap.add_argument("--object-size", choices=sorted(OBJECT_SIZES), default="standard", help="default: standard")
    ap.add_argument("--workers", type=int, default=1, help="processes writing shards (default: 1)")
    args = ap.parse_args(argv)
    with tqdm(total=args.samples, desc="shards", unit="sample") as bar:
        shards = write_shards(str(args.out), args.samples, seed=args.seed, samples_per_shard=args.samples_per_shard,
                              i2t_turns=3, workers=args.workers, progress=bar.update,
                              object_size=args.object_size)
    tok_dir = args.out / "tokenizer"
    (tok_dir / "tokenizer.json").unlink(missing_ok=True)  # made for these shards and this flavour
    make_tokenizer(tok_dir, [args.out], args.seed, args.object_size,
                   vocab_size=flavour(args.flavour).llm.vocab_size)
    print(f"wrote {len(shards)} shards ({args.samples} samples) to {args.out} and a tokenizer to {tok_dir}")


if __name__ == "__main__":
    main()


__all__ = [
    "DEFAULT_MIX", "HELDOUT_SEED", "MMBENCH_COLUMNS", "TRAIN_SEED", "make_sample",
    "mmbench_rows", "png_bytes", "read_geneval_metadata", "rotate_question",
    "write_geneval_metadata", "write_geneval_reference", "write_mmbench_tsv", "write_shards",
]
