"""The trained shapes model that ships in the package, as released weights do for the real model.

``cheers/assets/shapes_model.safetensors`` holds the whole Cheers model of the ``shapes`` flavour
(fp16 on disk), its config and text tokenizer, and the log of the run that made it, in the
file's metadata (``read_model_log``). One command makes it:

    python -m cheers.shapes.release --work outputs/shapes-release --out cheers/assets/shapes_model.safetensors

It writes the world's training shards (``RECIPE.object_size`` objects), trains the shapes
flavour from the shipped VAE and semantic encoder (``cheers.shapes.parts``) for ``--steps``
optimiser steps at a constant learning rate after warm-up (configs/shapes.yaml otherwise),
exports the EMA weights, scores them on held-out prompts and questions and packs the file. A run
in ``--work`` that already holds the exported step is packed as it is, and a killed run goes on
from its last checkpoint: ``benchmarks/shapes_scaling.py`` trains the same run and scores it along
the way.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from cheers.errors import CheersError

MODEL_FILE = Path(__file__).resolve().parent.parent / "assets" / "shapes_model.safetensors"
MAX_BYTES = 16 * 2**20


@dataclass(frozen=True)
class Recipe:
    """What the shipped model is trained on and for how long."""

    object_size: str = "large"
    samples: int = 30000
    seed: int = 0
    schedule_steps: int = 16000  # train.steps; with a constant rate only the warm-up depends on it
    steps: int = 6000


RECIPE = Recipe()
# the run config on top of configs/shapes.yaml: a rate that does not decay, so any step is a model
RUN_OVERRIDES = ("train.schedule=constant", "train.ckpt_every=250", "train.keep_last=2", "train.progress=false")


def train_to(work: Path, step: int, recipe: Recipe = RECIPE, overrides: tuple[str, ...] = (), log=print):
    """Train (or go on training) the recipe's run in ``work`` to ``step``; returns the trainer's
    result. ``work`` holds data, tokenizer, the starting model and the run."""
    from cheers.shapes.parts import PARTS_FILE
    from cheers.shapes.training import build_init, prepare_world, run_training

    data, tok_dir = prepare_world(work, recipe.samples, recipe.seed, recipe.object_size, log)
    init = build_init(work, tok_dir, PARTS_FILE, seed=recipe.seed, log=log, overrides=list(overrides))
    result, _ = run_training(work, data, tok_dir, init, [*RUN_OVERRIDES, *overrides, f"train.stop_after={step}"],
                             "cpu", log, steps=recipe.schedule_steps, seed=recipe.seed)
    return result


def export_step(work: Path, step: int, recipe: Recipe = RECIPE, overrides: tuple[str, ...] = (), log=print) -> Path:
    """``work/model-STEP``: the EMA weights at ``step`` with the tokenizer, trained if missing."""
    from cheers.train.checkpoint import export

    folder = work / f"model-{step}"
    if (folder / "model.safetensors").is_file() and (folder / "tokenizer.json").is_file():
        return folder
    result = train_to(work, step, recipe, overrides, log)
    if result.step != step:
        raise CheersError(f"the run in {work} stopped at step {result.step}, not {step}")
    export(result.checkpoint, folder, ema=result.ema)
    shutil.copy(work / "tokenizer" / "tokenizer.json", folder / "tokenizer.json")
    return folder


def pack_model(folder: Path, path: Path, log: dict) -> int:
    """Write the exported checkpoint ``folder`` (config, weights, tokenizer) as one safetensors
    file with fp16 weights and ``log`` in its metadata; returns its size in bytes."""
    weights = load_file(str(folder / "model.safetensors"))
    half = {k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in weights.items()}
    meta = {"config": (folder / "config.json").read_text(), "tokenizer": (folder / "tokenizer.json").read_text(),
            "log": json.dumps(log)}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(half, str(path), metadata=meta)
    size = path.stat().st_size
    if size > MAX_BYTES:
        raise CheersError(f"{path} is {size / 2**20:.1f} MB, over the package's {MAX_BYTES / 2**20:.0f} MB")
    return size


def _metadata(path: Path) -> dict:
    if not Path(path).is_file():
        raise CheersError(f"shapes model file not found: {path} (python -m cheers.shapes.release makes it)")
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
    except (OSError, SafetensorError) as e:
        raise CheersError(f"{path}: not a readable safetensors file ({e})") from e
    missing = [k for k in ("config", "tokenizer", "log") if k not in meta]
    if missing:
        raise CheersError(f"{path}: not a packed shapes model, its metadata lacks {missing}")
    return meta


def read_model_log(path: Path = MODEL_FILE) -> dict:
    """The training and evaluation figures stored in a packed model."""
    return json.loads(_metadata(path)["log"])


def unpack_model(path: Path = MODEL_FILE, folder: Path | None = None) -> Path:
    """A checkpoint folder ``Pipeline.from_pretrained`` loads (fp32 weights, config, tokenizer)
    for the packed model ``path``; by default cached under ``$CHEERS_HOME`` by the file's hash,
    so a new file never meets an old folder."""
    from cheers.pipeline import default_checkpoint

    meta = _metadata(path)
    if folder is None:
        digest = hashlib.sha256(Path(path).read_bytes()).hexdigest()[:12]
        folder = default_checkpoint().parent / f"shapes-model-{digest}"
    if (folder / "model.safetensors").is_file():
        return folder
    tmp = folder.with_name(folder.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    weights = {k: (v.float() if v.is_floating_point() else v) for k, v in load_file(str(path)).items()}
    save_file(weights, str(tmp / "model.safetensors"))
    (tmp / "config.json").write_text(meta["config"])
    (tmp / "tokenizer.json").write_text(meta["tokenizer"])
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    return folder


def main(argv: list[str] | None = None) -> int:
    from cheers.cli_args import OneLineParser, non_negative_int, positive_int

    ap = OneLineParser(prog="python -m cheers.shapes.release", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("outputs/shapes-release"),
                    help="the run's folder: data, tokenizer, checkpoints (default outputs/shapes-release)")
    ap.add_argument("--out", type=Path, default=Path("outputs/shapes_model.safetensors"),
                    help="the file to write (default outputs/shapes_model.safetensors; the package's is "
                         "cheers/assets/shapes_model.safetensors)")
    ap.add_argument("--steps", type=positive_int, default=RECIPE.steps,
                    help=f"optimiser steps (default {RECIPE.steps})")
    ap.add_argument("--eval-prompts", type=positive_int, default=16, help="GenEval prompts per tag, 4 images each")
    ap.add_argument("--eval-questions", type=positive_int, default=320, help="MMBench and open questions")
    ap.add_argument("--threads", type=non_negative_int, default=0, help="torch CPU threads (default: torch's choice)")
    args = ap.parse_args(argv)
    if args.out.suffix != ".safetensors":
        ap.error(f"--out {args.out}: expected a path ending in .safetensors")
    if args.threads:
        torch.set_num_threads(args.threads)
    from cheers.pipeline import Pipeline
    from cheers.shapes.evaluate import evaluate_model

    recipe = Recipe(steps=args.steps)
    t0 = time.perf_counter()
    folder = export_step(args.work, args.steps, recipe)
    history = [json.loads(line) for line in (args.work / "run" / "metrics.jsonl").read_text().splitlines()
               if line.strip()] if (args.work / "run" / "metrics.jsonl").is_file() else []
    pipe = Pipeline.from_pretrained(folder)
    scores = evaluate_model(pipe, args.work / f"eval-{args.steps}", eval_prompts=args.eval_prompts,
                            eval_questions=args.eval_questions, seed=recipe.seed + 1,
                            object_size=recipe.object_size)["row"]
    first = [h for h in history if h["step"] <= 10]
    last = [h for h in history if h["step"] > args.steps - 100 and h["step"] <= args.steps]
    log = {"recipe": asdict(recipe), "overrides": list(RUN_OVERRIDES), "torch": torch.__version__,
           "loss_first": first[0]["loss"] if first else None,
           "loss_last_100_steps": sum(h["loss"] for h in last) / len(last) if last else None,
           "scores": scores, "seconds": round(time.perf_counter() - t0, 1),
           "command": "python -m cheers.shapes.release --steps " + str(args.steps)}
    size = pack_model(folder, args.out, log)
    print(json.dumps(log, indent=1))
    print(f"wrote {args.out} ({size / 2**20:.1f} MB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
