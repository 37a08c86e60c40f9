"""Learning curves of the shapes ladder (``shapes_ladder_rungs.py``): one rung trained for a fixed
number of optimiser steps through the project's trainer, scored at step points on held-out
GenEval-style prompts.

    python benchmarks/shapes_ladder.py --rung R0 --steps 2000 [--out DIR] [--work DIR] [overrides ...]

Every rung trains on text-to-image samples of one- and two-object scenes with the recipe of
configs/shapes.yaml (the overrides change it), on the same shards, tokenizer and, for R4 / R5,
the pretrained semantic encoder and VAE the package ships (``cheers.shapes.parts``). At each point (default
250, 500, 1000, 2000) it samples 4 images for each of ``--prompts`` held-out prompts per tag
(colors, single_object, two_object: 128 images per tag by default) from the EMA weights and
reports the GenEval tags, the share of images whose largest object has the prompt's colour
(colors prompts), on single_object prompts (which name the shape only) the share whose largest
object has the prompt's shape and the share with exactly one object (coherent), the share of
empty images, and seconds per step. Writes DIR/ladder.json, DIR/curve.png and a sample grid per
point; ``--rescore`` scores the kept checkpoints again with these measures, and ``--loss-by-time``
adds to each point the pixel error of the clean image the model predicts at fixed noise times
(where in the denoising a rung falls behind another).

    python benchmarks/shapes_ladder.py compare FIGURE.png DIR [DIR ...]

prints the runs' points as markdown tables and draws their shape and coherence curves.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

from cheers.errors import CheersError
from cheers.shapes.scenes import SCENE_KINDS

TAGS = ("colors", "single_object", "two_object")


def prepare_world(work: Path, n_samples: int, rung: str, seed: int, parts_file: Path | None = None,
                  object_size: str = "standard", kinds: tuple[str, ...] = ("single", "two")
                  ) -> tuple[Path, Path, dict]:
    """Shards of ``kinds`` scenes and a tokenizer in ``work``, made once; for R4 / R5 the
    pretrained parts of ``parts_file`` (default: the ones the package ships, ``cheers.shapes.parts``)."""
    from cheers.shapes.dataset import train_text_tokenizer, write_shards
    from cheers.shapes.parts import PARTS_FILE, load_parts
    from cheers.shapes.training import shapes_run_config

    data, tok_dir = work / "data", work / "tokenizer"
    if not (data / "manifest.json").is_file():
        print(f"writing {n_samples} text-to-image samples to {data}", flush=True)
        write_shards(str(data), n_samples=n_samples, seed=seed, image_size=64, mix={"t2i": 1.0},
                     kinds=kinds, samples_per_shard=2000, workers=os.cpu_count() or 1,
                     object_size=object_size)
    manifest = json.loads((data / "manifest.json").read_text())
    written = (manifest.get("object_size", "standard"), tuple(manifest.get("kinds") or ()))
    if written != (object_size, tuple(kinds)):
        raise CheersError(f"{data} holds {written[0]} objects of scene kinds {written[1]}, not {object_size} "
                          f"objects of {tuple(kinds)}: use another --work")
    if not (tok_dir / "tokenizer.json").is_file():
        train_text_tokenizer([data], []).save(tok_dir)
    parts: dict = {}
    if rung in ("R4", "R5"):
        parts = load_parts(parts_file or PARTS_FILE, shapes_run_config([]).model.tokenizer)
    return data, tok_dir, parts


class RungTask:
    """The trainer's task for one rung (``train.task`` protocol)."""

    def __init__(self, rung: str, parts: dict, tok_dir: Path, token_px: int | None = None, pixel_scale: float = 1.0,
                 llm_time: bool = False):
        self.rung, self.parts, self.tok_dir, self.token_px = rung, parts, tok_dir, token_px
        self.pixel_scale, self.llm_time = pixel_scale, llm_time

    def build_model(self, cfg):
        from shapes_ladder_rungs import build_rung

        return build_rung(cfg, self.rung, self.parts, self.token_px, self.pixel_scale, self.llm_time)

    def build_collate(self, cfg):
        from cheers.collate import make_collate

        return make_collate(cfg.model, str(self.tok_dir))


def sampling_batches(cfg, tok, meta: list[dict], n_images: int, batch: int):
    """(records, seeds, Batch of cond + null rows) chunks over every image to draw."""
    from cheers.sequence import expand_placeholders, null_prompt, pack

    jobs = [(i, m, k) for i, m in enumerate(meta) for k in range(n_images)]
    dummy = torch.zeros(3, cfg.tokenizer.image_size, cfg.tokenizer.image_size)
    for start in range(0, len(jobs), batch):
        chunk = jobs[start:start + batch]
        seqs = []
        for null in (False, True):
            for _i, m, _k in chunk:
                ids, _ = tok.t2i_sample(m["prompt"])
                seqs.append(expand_placeholders(null_prompt(ids, cfg) if null else ids, None, cfg,
                                                [dummy], [True]))
        # one sequence per row: the batch's images stay in ``seqs`` order, which ``sample`` needs
        yield chunk, pack(seqs, cfg)


def evaluate(model, cfg, tok, meta: list[dict], *, n_images: int, steps: int, cfg_scale: float,
             seed: int, batch: int = 32) -> tuple[dict, list]:
    """Scores of ``n_images`` samples per record, and (record, images) per record for a grid."""
    from PIL import Image
    from shapes_ladder_rungs import sample

    from cheers.eval.geneval_rules import detection_colours, evaluate_image
    from cheers.eval.shapes_detector import detect

    model.eval()
    shape = model.latent_shape
    per_tag: dict[str, list[bool]] = {t: [] for t in TAGS}
    colour_right, shape_right, coherent, empty = [], [], [], []
    images_of: dict[int, list] = {}
    for chunk, b in sampling_batches(cfg, tok, meta, n_images, batch):
        # one noise per (record position, image): repeated prompts get fresh draws
        noise = torch.stack([torch.randn(*shape, generator=torch.Generator().manual_seed(
            seed * 1_000_003 + i * n_images + k)) for i, _m, k in chunk])
        latents = sample(model, b, noise, steps=steps, cfg_scale=cfg_scale,
                         shift=cfg.transport.sample_shift)
        with torch.no_grad():
            pixels = model.decode(latents).clamp(0, 1)
        arr = (pixels.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
        for (i, m, _k), a in zip(chunk, arr):
            img = Image.fromarray(a)
            images_of.setdefault(i, []).append(img)
            dets = detect(img)
            rec = evaluate_image(dets, m, image=img, color_classifier=detection_colours)
            per_tag[m["tag"]].append(bool(rec["correct"]))
            empty.append(not dets)
            largest = max(dets, key=lambda d: d["area"]) if dets else None
            first = m["include"][0]
            if "color" in first:
                colour_right.append(largest is not None and largest["colour"] == first["color"])
            if m["tag"] == "single_object":  # the prompt names the shape only, as in GenEval's tag
                shape_right.append(largest is not None and largest["class"] == first["class"])
                coherent.append(len(dets) == 1)
    model.train()
    scores = {t: float(np.mean(v)) for t, v in per_tag.items() if v}
    scores.update(colour_right=float(np.mean(colour_right)), shape_right=float(np.mean(shape_right)),
                  coherent=float(np.mean(coherent)),
                  empty=float(np.mean(empty)), images=len(empty))
    return scores, [(m, images_of[i]) for i, m in enumerate(meta)]


def write_curve(points: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    steps = [p["step"] for p in points]
    for key in ("colour_right", "shape_right", "coherent", "colors", "single_object", "two_object", "empty"):
        ax.plot(steps, [p.get(key, float("nan")) for p in points], marker="o", label=key,
                linestyle="--" if key == "empty" else "-")
    ax.set_xscale("log", base=2)
    ax.set_xticks(steps, [str(s) for s in steps])
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("optimiser steps")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def run_label(record: dict) -> str:
    """A rung's run in a few words: the rung and what its arguments change."""
    parts = [record["rung"]]
    if record.get("token_px"):
        parts.append(f"{record['token_px']} px tokens")
    if record.get("llm_time"):
        parts.append("time into the LLM")
    if record.get("scene_kinds", ["single", "two"]) != ["single", "two"]:
        parts.append("all scene kinds" if len(record["scene_kinds"]) == len(SCENE_KINDS)
                     else "+".join(record["scene_kinds"]))
    for o in record.get("overrides", []):
        if o.startswith("model.llm.num_hidden_layers="):
            parts.append(f"{o.split('=')[1]} LLM layers")
        elif o != "train.schedule=constant":
            parts.append(o)
    return ", ".join(parts)


TABLE = ("coherent", "shape_right", "colour_right", "single_object", "two_object", "colors")


def compare(runs: list[Path], figure: Path) -> str:
    """Markdown tables of the runs' points (the scores, then the error by time where measured)
    and one figure of their shape and coherence curves."""
    from shapes_scaling import draw_runs

    records = [json.loads((r / "ladder.json").read_text()) for r in runs]
    lines = ["| run | step | " + " | ".join(TABLE) + " |", "|---|---|" + "---|" * len(TABLE)]
    timed = []
    for rec in records:
        label = run_label(rec)
        for p in rec["points"]:
            lines.append(f"| {label} | {p['step']} | " + " | ".join(f"{p[k]:.3f}" for k in TABLE) + " |")
            if "error_by_time" in p:
                timed.append((label, p))
    if timed:
        times = timed[0][1]["error_times"]
        lines += ["", "| run | step | " + " | ".join(f"t = {t:g}" for t in times) + " |",
                  "|---|---|" + "---|" * len(times)]
        lines += [f"| {label} | {p['step']} | " + " | ".join(f"{1000 * e:.1f}" for e in p["error_by_time"]) + " |"
                  for label, p in timed]
    draw_runs(records, ("shape_right", "coherent"), run_label, figure, panel=(5.0, 3.8))
    return "\n".join(lines)


def parse_args(argv):
    from shapes_ladder_rungs import RUNGS

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rung", required=True, choices=list(RUNGS))
    ap.add_argument("--steps", type=int, default=2000, help="optimiser steps of the run (its schedule's length)")
    ap.add_argument("--points", type=int, nargs="+", default=[250, 500, 1000, 2000],
                    help="steps at which to score (those past --steps are dropped; --steps is always one)")
    ap.add_argument("--out", type=Path, default=None, help="default: outputs/shapes-ladder/RUNG")
    ap.add_argument("--work", type=Path, default=Path("outputs/shapes-ladder/work"),
                    help="shared shards, tokenizer and pretrained parts (made once)")
    ap.add_argument("--samples", type=int, default=16000, help="training samples to write (once)")
    ap.add_argument("--prompts", type=int, default=32, help="held-out prompts per tag (4 images each)")
    ap.add_argument("--sample-steps", type=int, default=None, help="Euler steps (default: the flavour's)")
    ap.add_argument("--cfg", dest="cfg_scale", type=float, default=None, help="guidance scale (default: the flavour's)")
    ap.add_argument("--token-px", type=int, default=None, help="R0-R3: pixels per image token a side")
    ap.add_argument("--llm-time", action="store_true",
                    help="R2 / R3: add the time embedding to the LLM's image tokens (the LLM otherwise never sees t)")
    ap.add_argument("--loss-by-time", action="store_true",
                    help="for the kept checkpoints of DIR/ladder.json, the pixel error of the clean-image "
                         "prediction at fixed noise times on held-out scenes, without training")
    ap.add_argument("--rescore", action="store_true",
                    help="score the kept checkpoints of the points in DIR/ladder.json again, without training")
    ap.add_argument("--stop-at", type=int, default=None,
                    help="leave after the point at this step; run again with the same arguments to go on")
    ap.add_argument("--pixel-scale", type=float, default=1.0,
                    help="R0-R4: the pixel latent is scale * (2 p - 1) (p in [0, 1])")
    ap.add_argument("--parts", type=Path, default=None,
                    help="R4 / R5: pretrained VAE and semantic encoder (default: the package's)")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--object-size", choices=["standard", "large"], default="standard",
                    help="the world's object sizes (cheers.shapes.scenes.OBJECT_SIZES)")
    ap.add_argument("--scene-kinds", nargs="+", choices=list(SCENE_KINDS), default=["single", "two"],
                    help="scene layouts of the training shards (default: single two)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("overrides", nargs="*", help="dotted overrides of configs/shapes.yaml")
    args = ap.parse_args(argv)
    if args.steps < 1:
        ap.error(f"--steps must be >= 1, got {args.steps}")
    if args.llm_time and args.rung not in ("R2", "R3"):
        ap.error(f"--llm-time applies to R2 and R3 (their LLM reads the image tokens), not {args.rung}")
    if args.prompts < 1 or args.samples < 1:
        ap.error("--prompts and --samples must be >= 1")
    if args.cfg_scale is not None and not (math.isfinite(args.cfg_scale) and args.cfg_scale >= 0):
        ap.error(f"--cfg must be finite and >= 0, got {args.cfg_scale}")
    if args.sample_steps is not None and args.sample_steps < 1:
        ap.error(f"--sample-steps must be >= 1, got {args.sample_steps}")
    args.points = sorted({p for p in args.points if 0 < p < args.steps} | {args.steps})
    args.out = args.out or Path("outputs/shapes-ladder") / args.rung
    return args


def main(argv: list[str] | None = None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    if argv[:1] == ["compare"]:  # compare FIGURE.png DIR [DIR ...]
        if len(argv) < 3:
            raise SystemExit("usage: shapes_ladder.py compare FIGURE.png DIR [DIR ...]")
        missing = [d for d in argv[2:] if not (Path(d) / "ladder.json").is_file()]
        if missing:
            raise SystemExit(f"compare: no ladder.json in {', '.join(missing)}")
        print(compare([Path(d) for d in argv[2:]], Path(argv[1])))
        return 0
    args = parse_args(argv)
    from shapes_ladder_rungs import RUNGS, rung_config

    from cheers.shapes.dataset import write_geneval_metadata
    from cheers.shapes.report import write_grid
    from cheers.shapes.training import shapes_run_config
    from cheers.text_tokenizer import TextTokenizer
    from cheers.train.checkpoint import list_checkpoints
    from cheers.train.trainer import train

    if args.threads:
        torch.set_num_threads(args.threads)
    data, tok_dir, parts = prepare_world(args.work, args.samples, args.rung, args.seed, args.parts, args.object_size,
                                         tuple(args.scene_kinds))
    run_dir = args.out / "run"
    trainable = "['*', '!tokenizer.siglip']" if args.rung == "R4" else (
        "['*']" if args.rung != "R5" else None)
    over = [f"data.shards=['{data}/*.tar']", f"data.text_tokenizer_dir={tok_dir}",
            "data.ratios={t2i: 1.0, i2t: 0.0, text: 0.0}", f"train.out_dir={run_dir}",
            f"train.steps={args.steps}", f"train.seed={args.seed}", "train.progress=false", "train.keep_last=8",
            *([f"train.trainable={trainable}"] if trainable else []), *args.overrides]
    cfg = shapes_run_config(over)
    cfg = dataclasses.replace(cfg, model=rung_config(cfg.model, args.rung, args.token_px))
    task = RungTask(args.rung, parts, tok_dir, args.token_px, args.pixel_scale, args.llm_time)
    tok = TextTokenizer.from_dir(tok_dir)
    meta = [m for m in write_geneval_metadata(str(args.out / "geneval_metadata.jsonl"), args.prompts,
                                              seed=args.seed + 1) if m["tag"] in TAGS]
    tc = cfg.model.transport
    steps = args.sample_steps or tc.sample_steps
    cfg_scale = tc.cfg_scale if args.cfg_scale is None else args.cfg_scale
    record = {"rung": args.rung, "what": RUNGS[args.rung], "steps": args.steps, "token_px": args.token_px,
              "object_size": args.object_size, "scene_kinds": args.scene_kinds,
              "pixel_scale": args.pixel_scale, "llm_time": args.llm_time,
              "overrides": args.overrides, "sample_steps": steps, "cfg_scale": cfg_scale,
              "images_per_tag": 4 * args.prompts, "threads": torch.get_num_threads(), "points": []}
    done = 0
    previous = args.out / "ladder.json"
    if previous.is_file():  # a run left with --stop-at (or killed) goes on from its last point
        old = json.loads(previous.read_text())
        same = all(old.get(k) == record[k] for k in ("rung", "steps", "token_px", "pixel_scale", "overrides", "cfg_scale")) \
            and old.get("object_size", "standard") == args.object_size \
            and old.get("llm_time", False) == args.llm_time \
            and old.get("scene_kinds", ["single", "two"]) == args.scene_kinds
        if not same:
            raise CheersError(f"{previous} holds another run ({old.get('rung')}, {old.get('overrides')}): "
                              "use another --out")
        record["points"] = old["points"]
        done = record["points"][-1]["step"] if record["points"] else 0
    if args.loss_by_time:
        return loss_by_time(args, record, run_dir, task, cfg, tok, meta)
    if args.rescore:
        return rescore(args, record, run_dir, task, cfg, tok, meta, steps, cfg_scale)
    for point in args.points:
        if point <= done:
            continue
        if args.stop_at is not None and point > args.stop_at:
            break
        t0 = time.perf_counter()
        result = train(dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, stop_after=point)), task)
        wall = time.perf_counter() - t0
        ckpt = result.checkpoint or list_checkpoints(run_dir)[-1]  # None: the point was trained, not scored
        model = load_rung(task, cfg, ckpt, result.ema, args.rung)
        t1 = time.perf_counter()
        scores, samples = evaluate(model, cfg.model, tok, meta, n_images=4, steps=steps, cfg_scale=cfg_scale,
                                   seed=args.seed + 1)
        final = result.history[-1] if result.history else {}
        row = {"step": result.step, "seconds_per_step": wall / max(result.step - done, 1),
               "eval_seconds": time.perf_counter() - t1, "flow": final.get("flow"), "noise_per_image": True, **scores}
        done = result.step
        record["points"].append(row)
        write_grid([s for tag in TAGS for s in samples if s[0]["tag"] == tag][::max(1, args.prompts // 4)][:12],
                   args.out / f"grid-{result.step}.png")
        (args.out / "ladder.json").write_text(json.dumps(record, indent=1) + "\n")
        write_curve(record["points"], args.out / "curve.png", f"{args.rung}: {RUNGS[args.rung]}")
        print(json.dumps({"rung": args.rung, **{k: (round(v, 3) if isinstance(v, float) else v)
                                                 for k, v in row.items()}}), flush=True)
    return 0


def load_rung(task, cfg, ckpt: Path, ema: bool, rung: str):
    """The rung's model with a checkpoint's (EMA) weights."""
    from cheers.train.checkpoint import full_state_from_checkpoint

    _, weights = full_state_from_checkpoint(ckpt, ema=ema)
    model = task.build_model(cfg.model)
    model.init_weights()
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if unexpected or [k for k in missing if not k.endswith("lm_head.weight")]:
        raise CheersError(f"checkpoint {ckpt} does not fit {rung}: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return model


def kept_points(args, record: dict, run_dir: Path, task, cfg, flag: str):
    """(row, model) for each point of ``record`` whose checkpoint the run kept; a point without
    its checkpoint is named and left as it is."""
    if not record["points"]:
        raise CheersError(f"{flag}: {args.out / 'ladder.json'} holds no scored points")
    for row in record["points"]:
        ckpt = run_dir / f"step_{row['step']:07d}"
        if not ckpt.is_dir():
            print(f"no checkpoint {ckpt}: step {row['step']} is left as it is", flush=True)
            continue
        yield row, load_rung(task, cfg, ckpt, cfg.train.ema_decay > 0, args.rung)


def rescore(args, record: dict, run_dir: Path, task, cfg, tok, meta: list[dict], steps: int, cfg_scale: float) -> int:
    """Score each point of ``record`` whose checkpoint the run kept again with today's measures
    (the points' other figures stay)."""
    for row, model in kept_points(args, record, run_dir, task, cfg, "--rescore"):
        scores, _ = evaluate(model, cfg.model, tok, meta, n_images=4, steps=steps, cfg_scale=cfg_scale,
                             seed=args.seed + 1)
        row.update(scores)
        (args.out / "ladder.json").write_text(json.dumps(record, indent=1) + "\n")
        print(json.dumps({"rung": args.rung, "rescored": True, **{k: (round(v, 3) if isinstance(v, float) else v)
                                                                   for k, v in row.items()}}), flush=True)
    write_curve(record["points"], args.out / "curve.png", f"{args.rung}: {record['what']}")
    return 0


LOSS_TIMES = (0.05, 0.15, 0.25, 0.35, 0.5, 0.65, 0.8, 0.95)


@torch.no_grad()
def prediction_error_by_time(model, cfg, tok, meta: list[dict], object_size: str, seed: int,
                             times=LOSS_TIMES) -> list[float]:
    """Mean squared pixel error of the model's clean-image prediction at each noise time in
    ``times`` (t = 0 is noise), over two reference scenes per single_object record, one noise
    draw shared by every t. In pixels, so rungs with other latents compare."""
    from cheers.flow_head.transport import interpolate, x1_from_velocity
    from cheers.sequence import expand_placeholders, pack
    from cheers.shapes.autoencoder import scene_pixels
    from cheers.shapes.scenes import scene_for_metadata

    model.eval()
    rng = np.random.default_rng([seed, 17])
    recs = [m for m in meta if m["tag"] == "single_object" for _ in range(2)]
    scenes = [scene_for_metadata(m, rng, cfg.tokenizer.image_size, object_size) for m in recs]
    pixels = scene_pixels(scenes)
    batch = pack([expand_placeholders(tok.t2i_sample(m["prompt"])[0], None, cfg, [im], [True])
                  for m, im in zip(recs, pixels)], cfg)
    x1 = model.encode(pixels)
    x0 = torch.randn(x1.shape, generator=torch.Generator().manual_seed(seed))
    errors = []
    for t0 in times:
        t = torch.full((x1.shape[0],), float(t0))
        xt = interpolate(x1, x0, t)
        x1_pred = x1_from_velocity(model.velocity_at(batch, xt, t), xt, t, t_min=cfg.transport.x1_loss_t_min)
        errors.append(float(((model.decode(x1_pred) - pixels) ** 2).mean()))
    return errors


def loss_by_time(args, record: dict, run_dir: Path, task, cfg, tok, meta: list[dict]) -> int:
    """``prediction_error_by_time`` of every point whose checkpoint the run kept, stored in the
    point's row of DIR/ladder.json (``error_by_time``, with ``error_times``)."""
    for row, model in kept_points(args, record, run_dir, task, cfg, "--loss-by-time"):
        row["error_times"] = list(LOSS_TIMES)
        row["error_by_time"] = prediction_error_by_time(model, cfg.model, tok, meta, args.object_size, args.seed + 1)
        (args.out / "ladder.json").write_text(json.dumps(record, indent=1) + "\n")
        print(json.dumps({"rung": args.rung, "step": row["step"],
                          "error_by_time": [round(v, 4) for v in row["error_by_time"]]}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
