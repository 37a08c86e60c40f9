"""Where shape emerges: a step-budgeted learning curve of the whole shapes model (the ``shapes``
flavour, text-to-image and understanding together), scored at step points on held-out prompts
and questions.

    python benchmarks/shapes_scaling.py --object-size large --steps 16000 --out DIR [--stop-at N] [overrides ...]

The run trains ``--steps`` optimiser steps of configs/shapes.yaml at a constant learning rate
after warm-up (so that every point is a model one could stop at, and the run can be extended),
from the pretrained VAE and semantic encoder the package ships, on ``--samples`` training
samples of the world with ``--object-size`` objects. At each point it exports the EMA weights
and measures, on held-out sets drawn in the same world:

- GenEval (the shapes detector with GenEval's rules): every tag, ``4 * --eval-prompts`` images each;
- on the single-object images: *coherent*, the share with exactly one object, and *shape*, the
  share whose largest object has the prompt's shape; on the colors images, *colour*, the share
  whose largest object has the prompt's colour;
- MMBench CircularEval over ``--eval-questions`` questions (a fifth of them on shape, a fifth on
  colour), and open shape / colour / count questions (``--eval-questions`` in all).

Writes DIR/scaling.json (a row per point), DIR/curve.png and DIR/grid-STEP.png. Killed or left
with ``--stop-at``, the same command goes on from the last checkpoint (``train.ckpt_every``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

from cheers.errors import CheersError

GENEVAL_TAGS = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
# the run's identity: a scaling.json written with other values is another run
IDENTITY = ("object_size", "steps", "samples", "seed", "overrides", "eval_prompts", "eval_questions")


def prepare_world(work: Path, n_samples: int, seed: int, object_size: str) -> tuple[Path, Path]:
    """Training shards (the demo's task mix and three questions per understanding sample) and a
    tokenizer over them, made once in ``work``."""
    from cheers.demo import train_text_tokenizer
    from cheers.shapes.dataset import mmbench_rows, write_shards
    from cheers.shapes.texts import format_mmbench_prompt

    data, tok_dir = work / "data", work / "tokenizer"
    manifest = data / "manifest.json"
    if manifest.is_file():
        written = json.loads(manifest.read_text())
        if (written.get("object_size", "standard"), written["n_samples"], written["seed"]) != (object_size, n_samples, seed):
            raise CheersError(f"{data} holds another world ({written.get('object_size', 'standard')} objects, "
                              f"{written['n_samples']} samples, seed {written['seed']}): use another --out")
    else:
        print(f"writing {n_samples} samples ({object_size} objects) to {data}", flush=True)
        write_shards(str(data), n_samples=n_samples, seed=seed, image_size=64, mix={"t2i": 0.75, "i2t": 0.2, "text": 0.05},
                     samples_per_shard=2000, i2t_turns=3, mcq_answer="option", workers=os.cpu_count() or 1,
                     object_size=object_size)
    if not (tok_dir / "tokenizer.json").is_file():
        extra = [format_mmbench_prompt(r["question"], [r[c] for c in "ABCD" if r[c]], r["hint"] or None)
                 for r in mmbench_rows(200, seed=seed + 100, circular=False, object_size=object_size)]
        train_text_tokenizer([data], extra).save(tok_dir)
    return data, tok_dir


def image_measures(records: list[dict]) -> dict:
    """coherent / shape on single-object images, colour on colors images (largest object)."""
    from PIL import Image

    from cheers.eval.shapes_detector import detect

    coherent, shape_right, colour_right = [], [], []
    for rec in records:
        tag = rec["tag"]
        if tag not in ("single_object", "colors"):
            continue
        dets = detect(Image.open(rec["filename"]).convert("RGB"))
        largest = max(dets, key=lambda d: d["area"]) if dets else None
        want = json.loads(rec["metadata"])["include"][0]
        if tag == "single_object":
            coherent.append(len(dets) == 1)
            shape_right.append(largest is not None and largest["class"] == want["class"])
        else:
            colour_right.append(largest is not None and largest["colour"] == want["color"])
    return {"coherent": float(np.mean(coherent)), "shape_right": float(np.mean(shape_right)),
            "colour_right": float(np.mean(colour_right)), "single_images": len(coherent)}


def evaluate_point(ckpt: Path, tok_dir: Path, out: Path, args) -> tuple[dict, list]:
    """Every measure of one exported checkpoint; (row, GenEval samples for a grid)."""
    import shutil

    from cheers.demo import evaluate_geneval, evaluate_mmbench, evaluate_open
    from cheers.pipeline import Pipeline

    shutil.copy(tok_dir / "tokenizer.json", ckpt / "tokenizer.json")
    pipe = Pipeline.from_pretrained(ckpt, device="cpu")
    tc = pipe.cfg.transport
    quiet = lambda _msg: None  # noqa: E731 - the row is printed whole below
    gen = evaluate_geneval(pipe, out, args.eval_prompts, args.seed + 1, tc.sample_steps, tc.cfg_scale, quiet)
    row = {f"geneval_{t}": gen["scores"].get(t) for t in GENEVAL_TAGS}
    row["geneval_overall"] = gen["scores"]["overall"]
    row.update(image_measures(gen["records"]))
    mmb = evaluate_mmbench(pipe, out, args.eval_questions, args.seed + 1, quiet, object_size=args.object_size)["acc"]
    row.update({f"mmbench_{k.lower()}": v for k, v in mmb.items()})
    opened = evaluate_open(pipe, out, args.eval_questions, args.seed + 1, quiet, object_size=args.object_size)
    row.update({f"open_{k}": v for k, v in opened.items()})
    return row, gen["samples"]


CURVES = ("coherent", "shape_right", "colour_right", "geneval_overall", "mmbench_shape", "mmbench_colour",
          "open_shape", "open_colour")


def write_curve(points: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    steps = [p["step"] for p in points]
    for key in CURVES:
        ax.plot(steps, [p.get(key, float("nan")) for p in points], marker="o", label=key,
                linestyle="--" if key.startswith(("mmbench", "open")) else "-")
    ax.set_xscale("log", base=2)
    ax.set_xticks(steps, [str(s) for s in steps])
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("optimiser steps")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def parse_args(argv):
    from cheers.shapes.scenes import OBJECT_SIZES

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--object-size", choices=list(OBJECT_SIZES), default="standard",
                    help="the world's object sizes (cheers.shapes.scenes.OBJECT_SIZES; default standard)")
    ap.add_argument("--steps", type=int, default=16000, help="optimiser steps of the run (default 16000)")
    ap.add_argument("--points", type=int, nargs="+", default=[1000, 2000, 4000, 8000, 16000],
                    help="steps at which to score (those past --steps are dropped; --steps is always one)")
    ap.add_argument("--stop-at", type=int, default=None,
                    help="leave after the point at this step; the same command goes on from there")
    ap.add_argument("--out", type=Path, required=True, help="the run's folder")
    ap.add_argument("--samples", type=int, default=30000, help="training samples to write (default 30000)")
    ap.add_argument("--eval-prompts", type=int, default=16, help="GenEval prompts per tag, 4 images each (default 16)")
    ap.add_argument("--eval-questions", type=int, default=320,
                    help="MMBench questions (a fifth per category) and open questions (default 320)")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("overrides", nargs="*", help="dotted overrides of configs/shapes.yaml")
    args = ap.parse_args(argv)
    for name in ("steps", "samples", "eval_prompts", "eval_questions"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    args.points = sorted({p for p in args.points if 0 < p < args.steps} | {args.steps})
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from cheers.demo import build_init, run_training, shapes_run_config, write_grid
    from cheers.shapes.parts import PARTS_FILE
    from cheers.train.checkpoint import export

    shapes_run_config(args.overrides)  # a bad override is refused before any work
    if args.threads:
        torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    data, tok_dir = prepare_world(args.out, args.samples, args.seed, args.object_size)
    init = build_init(args.out, tok_dir, PARTS_FILE, seed=args.seed, log=print, overrides=args.overrides)
    record = {k: getattr(args, k) for k in IDENTITY}
    record.update(points=[], threads=torch.get_num_threads(), schedule="constant after 40 warm-up steps")
    path = args.out / "scaling.json"
    if path.is_file():
        old = json.loads(path.read_text())
        if any(old.get(k) != record[k] for k in IDENTITY):
            raise CheersError(f"{path} holds another run ({ {k: old.get(k) for k in IDENTITY} }): use another --out")
        record["points"] = old["points"]
    done = record["points"][-1]["step"] if record["points"] else 0
    over = ["train.schedule=constant", "train.ckpt_every=250", "train.keep_last=2", "train.progress=false",
            *args.overrides]
    for point in args.points:
        if point <= done:
            continue
        if args.stop_at is not None and point > args.stop_at:
            break
        t0 = time.perf_counter()
        result, _run_dir = run_training(args.out, data, tok_dir, init, [*over, f"train.stop_after={point}"], "cpu",
                                        print, steps=args.steps, seed=args.seed)
        wall = time.perf_counter() - t0
        ckpt = args.out / f"model-{result.step}"
        export(result.checkpoint, ckpt, ema=result.ema)
        t1 = time.perf_counter()
        row, samples = evaluate_point(ckpt, tok_dir, args.out / f"eval-{result.step}", args)
        final = result.history[-1] if result.history else {}
        row = {"step": result.step, "seconds_per_step": wall / max(result.step - done, 1),
               "eval_seconds": time.perf_counter() - t1, "loss": final.get("loss"), "flow": final.get("flow"),
               "ce": final.get("ce"), **row}
        done = result.step
        record["points"].append(row)
        by_tag: dict[str, list] = {}
        for s in samples:
            by_tag.setdefault(s[0]["tag"], []).append(s)
        write_grid([s for tag in ("single_object", "colors", "two_object") for s in by_tag.get(tag, [])[:4]],
                   args.out / f"grid-{result.step}.png")
        path.write_text(json.dumps(record, indent=1) + "\n")
        write_curve(record["points"], args.out / "curve.png",
                    f"shapes flavour, {args.object_size} objects, {args.steps}-step run")
        print(json.dumps({k: (round(v, 3) if isinstance(v, float) and math.isfinite(v) else v)
                          for k, v in row.items()}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
