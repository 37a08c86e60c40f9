"""cheers demo: what people do with released weights, on the shapes world and a CPU, with no download.

1. loads the trained shapes model that ships in the package (``cheers.shapes.release``) and
   scores it: GenEval on held-out prompts (the analytic detector), MMBench CircularEval and open
   questions on held-out images;
2. fine-tunes it with LoRA (configs/lora-shapes.yaml) on something it has never seen, a new
   word for a colour ("scarlet" for red), and scores it again, with the new word's held-out
   prompts before and after;
3. writes DIR/index.html (both evaluations, sample grids, the loss curve, how to go on),
   DIR/metrics.json, DIR/adapter/ (the LoRA adapters), DIR/checkpoint/ (them merged into the
   model, also cached for `cheers generate`).

``--from-scratch`` instead trains the whole model from random initialisation (the shipped VAE
and semantic encoder stay), then scores it the same way.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import torch
from tqdm import tqdm

from cheers.cli_args import OneLineParser, non_negative_int, number, output_folder, positive_int

FINETUNE_STEPS = 300
FROM_SCRATCH_STEPS = 1000
# on top of configs/lora-shapes.yaml: mostly text-to-image, as the new word is a caption word
FINETUNE_OVERRIDES = ("data.ratios={t2i: 0.85, i2t: 0.15, text: 0.0}", "train.progress=false")


def eta(seconds: float) -> str:
    """``about N min (ends HH:MM)`` for ``seconds`` from now."""
    return f"about {seconds / 60:.0f} min (ends {time.strftime('%H:%M', time.localtime(time.time() + seconds))})"


class Log:
    """Lines stamped with the minutes since the demo began, printed and kept for log.txt."""

    def __init__(self):
        self.start, self.lines = time.monotonic(), []

    def minutes(self) -> float:
        return (time.monotonic() - self.start) / 60

    def __call__(self, msg: str) -> None:
        self.lines.append(f"[{self.minutes():5.1f} min] {msg}")
        tqdm.write(self.lines[-1])


def parse_args(argv):
    from cheers.shapes.release import MODEL_FILE
    from cheers.shapes.scenes import OBJECT_SIZES

    ap = OneLineParser(prog="cheers demo", description=__doc__)
    ap.add_argument("--out", type=output_folder, default=Path("outputs/shapes-demo"),
                    help="the report's folder (default outputs/shapes-demo)")
    ap.add_argument("--model", type=Path, default=MODEL_FILE,
                    help="the packed shapes model to start from (default: the one the package ships)")
    ap.add_argument("--steps", type=positive_int, default=None,
                    help=f"optimiser steps of fine-tuning (default {FINETUNE_STEPS}) or, with --from-scratch, "
                         f"of training (default {FROM_SCRATCH_STEPS})")
    ap.add_argument("--from-scratch", action="store_true",
                    help="train the whole model from random initialisation instead of fine-tuning the shipped one")
    ap.add_argument("--finetune-samples", type=positive_int, default=4000,
                    help="fine-tuning samples to write, half of them with the new word (default 4000)")
    ap.add_argument("--samples", type=positive_int, default=30000,
                    help="--from-scratch: training samples to write (default 30000)")
    ap.add_argument("--object-size", choices=list(OBJECT_SIZES), default=None,
                    help="--from-scratch: the world's object sizes (default: the shipped model's world)")
    ap.add_argument("--curriculum", type=number(0.0, 1.0, high_open=True), default=0.35,
                    help="--from-scratch: share of the steps on one- and two-object scenes first (default 0.35)")
    ap.add_argument("--eval-prompts", type=positive_int, default=16,
                    help="GenEval prompts per tag, 4 images each (default 16: 64 images a tag)")
    ap.add_argument("--eval-questions", type=positive_int, default=100,
                    help="MMBench questions before rotations, and open questions (default 100)")
    ap.add_argument("--word-prompts", type=positive_int, default=16,
                    help="held-out prompts naming the new word, 4 images each (default 16)")
    ap.add_argument("--device", default="cpu", help="torch device (default cpu)")
    ap.add_argument("--seed", type=non_negative_int, default=0, help="seed of data and training (default 0)")
    ap.add_argument("--threads", type=non_negative_int, default=0, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--no-cache", action="store_true",
                    help="do not copy the final checkpoint to the default location of `cheers generate`")
    ap.add_argument("overrides", nargs="*",
                    help="dotted overrides of the training recipe: configs/lora-shapes.yaml for fine-tuning, "
                         "configs/shapes.yaml with --from-scratch (train.lr=...)")
    args = ap.parse_args(argv)
    if not args.from_scratch and not args.model.is_file():
        ap.error(f"--model {args.model}: file not found (python -m cheers.shapes.release makes it)")
    return args


def check_overrides(args) -> None:
    """Build the training config the overrides go into, so that a bad one fails before any work."""
    from cheers.shapes.release import unpack_model
    from cheers.shapes.training import shapes_run_config
    from cheers.train.config import lora_run_config

    if args.from_scratch:
        shapes_run_config(args.overrides)
    else:
        lora_run_config(unpack_model(args.model), shards=[], out_dir=args.out / "finetune", steps=1,
                        overrides=[*FINETUNE_OVERRIDES, *args.overrides])


def evaluate(pipe, out: Path, args, log, object_size: str, word: bool) -> dict:
    """Every held-out measure of ``pipe``, in ``out``: the GenEval / MMBench / open-question
    row, and with ``word`` the new word's prompts."""
    from cheers.shapes.evaluate import evaluate_model
    from cheers.shapes.finetune import evaluate_new_word

    result = evaluate_model(pipe, out, eval_prompts=args.eval_prompts, eval_questions=args.eval_questions,
                            seed=args.seed + 1, object_size=object_size, log=log)
    if word:
        result["new_word"] = evaluate_new_word(pipe, out / "new-word", n_prompts=args.word_prompts, seed=args.seed + 2)
        log(f"new word: drawn in its colour {result['new_word']['word']:.3f}; "
            f"the colour's own name {result['new_word']['colour']:.3f}")
    return result


def finetune(args, log) -> dict:
    """The default demo: score the shipped model, LoRA-fine-tune it on the new word, score again."""
    from cheers.pipeline import Pipeline
    from cheers.shapes.finetune import NEW_WORD, write_new_word_shards
    from cheers.shapes.release import read_model_log, unpack_model
    from cheers.train.checkpoint import export
    from cheers.train.trainer import finetune_lora

    steps = args.steps or FINETUNE_STEPS
    shipped = unpack_model(args.model)
    object_size = read_model_log(args.model)["recipe"]["object_size"]
    log(f"the shipped model {args.model} ({object_size} objects) unpacked to {shipped}")
    t0 = time.monotonic()
    before = evaluate(Pipeline.from_pretrained(shipped, device=args.device), args.out / "before", args, log,
                      object_size, word=True)
    eval_seconds = time.monotonic() - t0
    data = write_new_word_shards(args.out / "data-new-word", args.finetune_samples, seed=args.seed,
                                 object_size=object_size)
    log(f"LoRA fine-tuning {steps} steps on '{NEW_WORD}' in {args.out / 'finetune'}")
    t0 = time.monotonic()
    adapter = args.out / "adapter"
    result = finetune_lora(shipped, [f"{data}/*.tar"], args.out / "finetune", steps=steps, export_to=adapter,
                           overrides=[*FINETUNE_OVERRIDES, f"train.seed={args.seed}", f"train.device={args.device}",
                                      *args.overrides])
    log(f"fine-tuned {result.step} steps in {(time.monotonic() - t0) / 60:.1f} min; evaluating again, "
        f"{eta(eval_seconds)}")
    ckpt = args.out / "checkpoint"  # the adapters merged: a plain checkpoint for `cheers generate`
    export(result.out_dir, ckpt, ema=result.ema, merge=True)
    shutil.copy(shipped / "tokenizer.json", ckpt / "tokenizer.json")
    after = evaluate(Pipeline.from_pretrained(shipped, device=args.device, lora=adapter), args.out / "after", args,
                     log, object_size, word=True)
    return {"before": before, "after": after, "history": result.history, "steps": result.step, "ckpt": ckpt,
            "object_size": object_size, "what": f"LoRA-fine-tuned {result.step} steps on the new word '{NEW_WORD}'"}


def from_scratch(args, log) -> dict:
    """``--from-scratch``: data, tokenizer, the starting model, a curriculum of two runs."""
    from cheers.pipeline import Pipeline
    from cheers.shapes.parts import PARTS_FILE
    from cheers.shapes.release import RECIPE
    from cheers.shapes.training import build_init, prepare, run_training
    from cheers.train.checkpoint import export

    steps = args.steps or FROM_SCRATCH_STEPS
    object_size = args.object_size or RECIPE.object_size
    data, tok_dir = prepare(args.out, args.samples, args.seed, log, object_size=object_size)
    init = build_init(args.out, tok_dir, PARTS_FILE, seed=args.seed, log=log, overrides=args.overrides)
    first_steps = min(round(args.curriculum * steps), steps - 1)  # the second run gets at least one
    history, offset = [], 0
    if first_steps:  # simple scenes first, then everything
        t0 = time.monotonic()
        first, _ = run_training(args.out, args.out / "data-easy", tok_dir, init, args.overrides, args.device, log,
                                steps=first_steps, name="run-easy", seed=args.seed)
        per_step = (time.monotonic() - t0) / max(first.step, 1)
        init = args.out / "init-easy"
        export(first.checkpoint, init, ema=first.ema)  # the averaged weights sample better
        history, offset = list(first.history), first.step
        log(f"{per_step:.2f} s a step; the demo ends in {eta((steps - first_steps) * per_step * 1.1 + 60.0)}")
    result, _ = run_training(args.out, data, tok_dir, init, args.overrides, args.device, log,
                             steps=steps - first_steps, seed=args.seed)
    history += [{**h, "step": h["step"] + offset} for h in result.history]
    ckpt = args.out / "checkpoint"
    export(result.checkpoint, ckpt, ema=result.ema)
    shutil.copy(tok_dir / "tokenizer.json", ckpt / "tokenizer.json")
    log(f"trained {offset + result.step} steps; evaluating")
    after = evaluate(Pipeline.from_pretrained(ckpt, device=args.device), args.out / "after", args, log,
                     object_size, word=False)
    return {"before": None, "after": after, "history": history, "steps": offset + result.step, "ckpt": ckpt,
            "object_size": object_size, "what": f"trained from scratch for {offset + result.step} steps"}


def main(argv: list[str] | None = None) -> int:
    from cheers.pipeline import default_checkpoint
    from cheers.shapes.report import write_report

    args = parse_args(argv)
    check_overrides(args)  # a bad override is refused before any work
    if args.threads:
        torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    log = Log()
    run = from_scratch(args, log) if args.from_scratch else finetune(args, log)
    metrics = write_report(args.out, run, seed=args.seed, minutes=log.minutes())
    if not args.no_cache:
        cache = default_checkpoint()
        shutil.rmtree(cache, ignore_errors=True)
        cache.parent.mkdir(parents=True, exist_ok=True)
        shutil.copytree(run["ckpt"], cache)
        log(f"checkpoint cached at {cache}: `cheers generate` and `cheers understand` use it by default")
    log(metrics["summary"])
    (args.out / "log.txt").write_text("\n".join(log.lines) + "\n")
    print(f"report: {args.out / 'index.html'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
