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

    python benchmarks/shapes_scaling.py compare FIGURE.png DIR [DIR ...]

prints the markdown table of the runs' points and draws their curves side by side.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

from cheers.errors import CheersError

# the run's identity: a scaling.json written with other values is another run
IDENTITY = ("object_size", "steps", "samples", "seed", "overrides", "eval_prompts", "eval_questions")


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


TABLE = ("coherent", "shape_right", "colour_right", "geneval_single_object", "geneval_two_object",
         "geneval_colors", "geneval_overall", "mmbench_overall", "mmbench_shape", "mmbench_colour", "open_shape",
         "open_colour")


def compare(runs: list[Path], figure: Path) -> str:
    """A markdown table of every point of ``runs`` (folders with scaling.json) and one figure of
    the shape, coherence and colour curves of all of them."""
    records = [json.loads((r / "scaling.json").read_text()) for r in runs]
    lines = ["| objects | step | " + " | ".join(TABLE) + " |", "|---|---|" + "---|" * len(TABLE)]
    for rec in records:
        for p in rec["points"]:
            cells = [f"{p[k]:.3f}" if isinstance(p.get(k), float) and math.isfinite(p[k]) else "-" for k in TABLE]
            lines.append(f"| {rec['object_size']} | {p['step']} | " + " | ".join(cells) + " |")
    draw_runs(records, ("shape_right", "coherent", "colour_right", "mmbench_shape", "open_shape"),
              lambda rec: f"{rec['object_size']} objects", figure)
    return "\n".join(lines)


def draw_runs(records: list[dict], keys, label, figure: Path, panel: tuple[float, float] = (3.2, 3.2)) -> None:
    """One panel per measure in ``keys``, one curve per run (``label(record)`` in the legend),
    over the steps of the runs' ``points``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(keys), figsize=(panel[0] * len(keys), panel[1]), sharey=True)
    for ax, key in zip(axes, keys):
        for rec in records:
            ax.plot([p["step"] for p in rec["points"]], [p.get(key, float("nan")) for p in rec["points"]],
                    marker="o", label=label(rec))
        ax.set_title(key, fontsize=9)
        ax.set_xlabel("optimiser steps (thousands)")
        ax.xaxis.set_major_formatter(lambda x, _pos: f"{x / 1000:g}")
        ax.set_ylim(-0.02, 1.02)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    figure.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(figure, dpi=100)
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
    if argv is None:
        argv = sys.argv[1:]
    if argv[:1] == ["compare"]:  # compare FIGURE.png RUN [RUN ...]
        if len(argv) < 3:
            raise SystemExit("usage: shapes_scaling.py compare FIGURE.png RUN_DIR [RUN_DIR ...]")
        print(compare([Path(r) for r in argv[2:]], Path(argv[1])))
        return 0
    args = parse_args(argv)
    from cheers.pipeline import Pipeline
    from cheers.shapes.evaluate import evaluate_model
    from cheers.shapes.release import Recipe, export_step
    from cheers.shapes.report import write_grid
    from cheers.shapes.training import shapes_run_config

    shapes_run_config(args.overrides)  # a bad override is refused before any work
    if args.threads:
        torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    recipe = Recipe(object_size=args.object_size, samples=args.samples, seed=args.seed, schedule_steps=args.steps)
    record = {k: getattr(args, k) for k in IDENTITY}
    record.update(points=[], threads=torch.get_num_threads(), schedule="constant after 40 warm-up steps")
    path = args.out / "scaling.json"
    if path.is_file():
        old = json.loads(path.read_text())
        if any(old.get(k) != record[k] for k in IDENTITY):
            raise CheersError(f"{path} holds another run ({ {k: old.get(k) for k in IDENTITY} }): use another --out")
        record["points"] = old["points"]
    done = record["points"][-1]["step"] if record["points"] else 0
    for point in args.points:
        if point <= done:
            continue
        if args.stop_at is not None and point > args.stop_at:
            break
        t0 = time.perf_counter()
        ckpt = export_step(args.out, point, recipe, tuple(args.overrides))
        wall = time.perf_counter() - t0
        t1 = time.perf_counter()
        result = evaluate_model(Pipeline.from_pretrained(ckpt), args.out / f"eval-{point}",
                                eval_prompts=args.eval_prompts, eval_questions=args.eval_questions,
                                seed=args.seed + 1, object_size=args.object_size)
        history = [json.loads(line) for line in (args.out / "run" / "metrics.jsonl").read_text().splitlines()]
        final = [h for h in history if h["step"] <= point][-1]
        row = {"step": point, "seconds_per_step": wall / max(point - done, 1),
               "eval_seconds": time.perf_counter() - t1, "loss": final.get("loss"), "flow": final.get("flow"),
               "ce": final.get("ce"), **result["row"]}
        done = point
        record["points"].append(row)
        by_tag: dict[str, list] = {}
        for s in result["samples"]:
            by_tag.setdefault(s[0]["tag"], []).append(s)
        write_grid([s for tag in ("single_object", "colors", "two_object") for s in by_tag.get(tag, [])[:4]],
                   args.out / f"grid-{point}.png")
        path.write_text(json.dumps(record, indent=1) + "\n")
        write_curve(record["points"], args.out / "curve.png",
                    f"shapes flavour, {args.object_size} objects, constant rate")
        print(json.dumps({k: (round(v, 3) if isinstance(v, float) and math.isfinite(v) else v)
                          for k, v in row.items()}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
