"""cheers demo: the shapes world end to end on a CPU, with no download.

Writes the data (WebDataset shards), trains a byte-level BPE tokenizer, starts from the tiny
VAE and semantic encoder shipped in the package (cheers.shapes.parts; both stay frozen), trains
the whole Cheers model through the project's trainer for a fixed number of steps, then
generates images for held-out GenEval-style prompts and answers held-out MMBench-style
questions, scores both with the shapes evaluator (GenEval rules, CircularEval), asks held-out
open questions without options, and writes a report folder:

    DIR/index.html  DIR/grid.png  DIR/loss.png  DIR/metrics.json  DIR/checkpoint/
"""

from __future__ import annotations

import argparse
import html
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from tqdm import tqdm

from cheers.cli_args import OneLineParser, non_negative_int, number, output_folder, positive_int
from cheers.config import load_yaml, merge, parse_overrides
from cheers.errors import CheersError

CONFIG = Path(__file__).resolve().parent.parent / "configs" / "shapes.yaml"


class Budget:
    """Wall-clock budget split between the phases of the demo."""

    def __init__(self, minutes: float):
        self.start = time.monotonic()
        self.total = minutes * 60.0

    def left(self) -> float:
        return self.total - (time.monotonic() - self.start)


def _corpus(shard_dir: Path) -> list[str]:
    """Every caption and conversation turn in the shards of ``shard_dir``, read with the
    training loader's shard index."""
    from cheers.train.data import _Shard

    texts = []
    for path in sorted(shard_dir.glob("*.tar")):
        shard = _Shard(str(path))
        try:
            for _key, members in shard.samples:
                if "json" not in members:
                    continue
                rec = json.loads(shard.read(members["json"]))
                texts.append(rec.get("text", ""))
                texts += [t["value"].replace("<image>", "") for t in rec.get("conversations", [])]
        finally:
            shard.close()
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


def prepare(out: Path, n_train: int, seed: int, log, i2t_turns: int = 1,
            mcq_answer: str = "letter") -> tuple[Path, Path]:
    """Shards (``i2t_turns`` questions per understanding sample, multiple choices answered as
    ``mcq_answer`` says) and tokenizer; returns (shard dir, tokenizer dir)."""
    from cheers.shapes.dataset import write_shards

    data, easy = out / "data", out / "data-easy"
    wanted = {"i2t_turns": i2t_turns, "mcq_answer": mcq_answer}
    # all scenes; then one- and two-object scenes, the curriculum's start
    for folder, n, kinds, offset in ((data, n_train, None, 0), (easy, n_train // 3, ("single", "two"), 50)):
        manifest = folder / "manifest.json"
        if not manifest.is_file():
            with tqdm(total=n, desc=f"data ({folder.name})", unit="sample", leave=False) as bar:
                write_shards(str(folder), n_samples=n, seed=seed + offset, image_size=64, samples_per_shard=2000,
                             kinds=kinds, workers=os.cpu_count() or 1, progress=bar.update, **wanted)
            continue
        written = json.loads(manifest.read_text())
        for key, value in wanted.items():
            # shards written before an option existed hold its default
            was = written.get(key, {"i2t_turns": 1, "mcq_answer": "letter"}[key])
            if was != value and key == "i2t_turns":
                raise CheersError(f"{folder} holds shards written with --i2t-turns {was}, not {value}: "
                                  f"use another --out, or --i2t-turns {was}")
            if was != value:
                raise CheersError(f"{folder} holds shards whose multiple-choice answers are the {was}, not the "
                                  f"{value}: use another --out")
    text_tokenizer_dir = out / "tokenizer"
    if not (text_tokenizer_dir / "tokenizer.json").is_file():
        from cheers.shapes.dataset import mmbench_rows
        from cheers.shapes.texts import format_mmbench_prompt

        extra = [format_mmbench_prompt(r["question"], [r[c] for c in "ABCD" if r[c]], r["hint"] or None)
                  for r in mmbench_rows(200, seed=seed + 100, circular=False)]
        train_text_tokenizer([data, easy], extra).save(text_tokenizer_dir)
    log(f"data: {n_train} samples in {data}, {n_train // 3} simple ones in {easy}; tokenizer in {text_tokenizer_dir}")
    return data, text_tokenizer_dir


def build_init(out: Path, text_tokenizer_dir: Path, parts_file: Path, seed: int, log,
               overrides: list[str] = ()) -> Path:
    """The starting model: configs/shapes.yaml's with the run's ``model.*`` overrides (as the
    training run builds it), with the pretrained VAE (copied into the pixel decoder) and semantic
    encoder of ``parts_file`` (``cheers.shapes.parts``), or trained here for the same fixed
    steps when that file is absent or does not fit the config."""
    from cheers.checkpoint import save_pretrained
    from cheers.model import CheersModel
    from cheers.shapes.parts import (
        install_parts,
        load_parts,
        read_parts_log,
        save_parts,
        train_parts,
    )
    from cheers.text_tokenizer import TextTokenizer

    init = out / "init"
    if (init / "model.safetensors").is_file():
        return init
    cfg = shapes_run_config(overrides).model
    tok = TextTokenizer.from_dir(text_tokenizer_dir)
    if tok.special != cfg.tokens or tok.vocab_size > cfg.llm.vocab_size:
        raise CheersError(f"tokenizer {text_tokenizer_dir} does not fit the shapes flavour")
    parts = None
    if parts_file.is_file():
        try:
            parts, plog, source = load_parts(parts_file, cfg.tokenizer), read_parts_log(parts_file), parts_file
        except CheersError as e:
            log(f"pretrained parts do not fit this config ({e}): training them")
    else:
        log(f"no pretrained parts at {parts_file}: training them")
    if parts is None:
        parts, plog = train_parts(cfg.tokenizer, seed=seed)
        source = out / "parts.safetensors"
        save_parts(source, parts, plog)
    if plog:
        acc = plog.get("semantic_patch_accuracy", {})
        log(f"pretrained parts from {source}: VAE {plog.get('vae_steps')} steps (loss {plog.get('vae_loss_end', 0):.4f}), "
            f"semantic encoder {plog.get('semantic_steps')} steps (patch accuracy "
            + ", ".join(f"{k} {v:.2f}" for k, v in acc.items()) + ")")
    torch.manual_seed(seed)
    model = CheersModel(cfg)
    model.init_weights()
    install_parts(model.tokenizer, parts, source=str(source))
    save_pretrained(model, init)
    return init


def shapes_run_config(overrides: list[str]):
    """configs/shapes.yaml with dotted overrides: the one place the demo builds its config."""
    from cheers.train.config import run_config_from_dict

    return run_config_from_dict(merge(load_yaml(CONFIG), parse_overrides(list(overrides))))


def run_training(out: Path, data: Path, text_tokenizer_dir: Path, init: Path, overrides: list[str], device: str,
                 log, *, steps: int, seconds: float | None = None, name: str = "run", seed: int = 0):
    """One training run of ``steps`` optimiser steps (its schedule's length), ended early by
    ``seconds`` of wall clock when given."""
    from cheers.train.trainer import train

    run_dir = out / name
    over = [f"data.shards=['{data}/*.tar']", f"data.text_tokenizer_dir={text_tokenizer_dir}", f"train.init_from={init}",
            f"train.out_dir={run_dir}", f"train.device={device}", f"train.steps={steps}", f"train.seed={seed}"]
    if seconds is not None:
        over.append(f"train.max_seconds={max(seconds, 1.0):.0f}")
    cfg = shapes_run_config(over + list(overrides))
    budget = f", at most {seconds / 60:.1f} min" if seconds is not None else ""
    log(f"training {steps} steps{budget} on {data.name} in {run_dir}")
    return train(cfg), run_dir


# --------------------------------------------------------------------------- evaluation


def generate_and_score(pipe, meta: list[dict], folder: Path, seed: int, steps: int, cfg_scale: float,
                       progress: bool = True) -> tuple[dict, list[dict]]:
    """4 images for each GenEval metadata row into ``folder`` (emptied first), scored by the
    shapes detector with GenEval's rules: (summary scores, per-image records)."""
    from cheers.eval import geneval

    shutil.rmtree(folder, ignore_errors=True)  # a rerun scores the new checkpoint, not old samples
    geneval.generate(pipe, meta, folder, n=4, seed=seed * 100_000, batch_size=32, steps=steps,
                     cfg_scale=cfg_scale, progress=progress)
    detector, colours = geneval.shapes_scorer()
    records = geneval.score(folder, folder / "results.jsonl", detector, colours)
    return geneval.write_summary(records, folder), records


def evaluate_geneval(pipe, out: Path, n_per_tag: int, seed: int, steps: int, cfg_scale: float, log) -> dict:
    """GenEval protocol on held-out shapes prompts through ``cheers.eval.geneval``: official
    folder layout, 4 images a prompt, the analytic detector in place of Mask2Former + CLIP."""
    from cheers.shapes.dataset import write_geneval_metadata

    folder = out / "geneval"
    meta = write_geneval_metadata(str(out / "geneval_metadata.jsonl"), n_per_tag, seed=seed)
    scores, records = generate_and_score(pipe, meta, folder, seed, steps, cfg_scale)
    per_prompt = [(m, [Image.open(folder / f"{i:05d}" / "samples" / f"{k:04d}.png").convert("RGB")
                       for k in range(4)]) for i, m in enumerate(meta)]
    log("geneval: " + ", ".join(f"{k} {v:.3f}" for k, v in scores.items() if isinstance(v, float)))
    return {"scores": scores, "samples": per_prompt, "records": records}


def evaluate_mmbench(pipe, out: Path, n: int, seed: int, log, object_size: str = "standard") -> dict:
    """MMBench-style questions with CircularEval through ``cheers.eval.mmbench``, answered by
    greedy decoding in batches; acc.csv / acc.json in ``out/mmbench``."""
    from cheers.eval import mmbench
    from cheers.eval.answering import answer_rows
    from cheers.shapes.dataset import mmbench_rows

    rows = mmbench_rows(n, seed=seed, circular=True, object_size=object_size)
    answers = answer_rows(pipe, rows, lambda r: mmbench.build_prompt(r, "llava"), source="shapes MMBench",
                          batch_size=32, max_new_tokens=6)
    preds = {r["index"]: a for r, a in zip(rows, answers)}
    acc = mmbench.score([{**r, "prediction": a} for r, a in zip(rows, answers)], out / "mmbench")
    (out / "mmbench_predictions.json").write_text(json.dumps({str(k): v for k, v in preds.items()}, indent=1))
    log("mmbench (circular): " + ", ".join(f"{k} {v:.3f}" for k, v in acc.items()))
    return {"acc": acc}


def open_answer(text: str) -> str:
    """The first word of an answer, lower case, without punctuation, number words as digits."""
    from cheers.shapes.texts import NUMBER_WORDS

    words = text.lower().replace(".", " ").replace(",", " ").split()
    if not words:
        return ""
    digits = {w: str(n) for n, w in NUMBER_WORDS.items()}
    return digits.get(words[0], words[0])


def evaluate_open(pipe, out: Path, n: int, seed: int, log, object_size: str = "standard") -> dict:
    """Held-out open questions in the training's own phrasing (colour of a shape, shape of a
    colour, counts), right when the answer's first word is the truth. Not an MMBench score:
    beside it, it tells whether the model sees the answer apart from whether it can find that
    answer's letter among options. Answers in ``out/open_answers.json``."""
    from cheers.eval.answering import answer_rows
    from cheers.shapes.dataset import open_question_rows

    rows = open_question_rows(n, seed=seed, object_size=object_size)
    answers = answer_rows(pipe, rows, lambda r: r["question"], source="shapes open questions",
                          batch_size=32, max_new_tokens=4)
    right: dict[str, list[bool]] = {}
    for r, a in zip(rows, answers):
        right.setdefault(r["category"], []).append(open_answer(a) == open_answer(r["answer"]))
    acc = {c: float(np.mean(v)) for c, v in right.items()}
    acc["overall"] = float(np.mean([x for v in right.values() for x in v]))
    (out / "open_answers.json").write_text(json.dumps(
        [{"index": r["index"], "question": r["question"], "truth": r["answer"], "answer": a}
         for r, a in zip(rows, answers)], indent=1))
    log("open questions: " + ", ".join(f"{k} {v:.3f}" for k, v in acc.items()))
    return acc


# --------------------------------------------------------------------------- report


def write_grid(samples, path: Path, per_row: int = 4, cell: int = 96) -> None:
    """Generated images with their prompts, one prompt per row."""
    rows = samples[: min(len(samples), 24)]
    label_w = 300
    grid = Image.new("RGB", (label_w + per_row * cell, len(rows) * cell), "white")
    draw = ImageDraw.Draw(grid)
    for r, (meta, images) in enumerate(rows):
        draw.text((6, r * cell + cell // 2 - 12), f"[{meta['tag']}]\n{meta['prompt']}"[:90], fill="black")
        for k, img in enumerate(images[:per_row]):
            grid.paste(img.resize((cell - 4, cell - 4), Image.NEAREST), (label_w + k * cell + 2, r * cell + 2))
    grid.save(path)


def write_loss_plot(history: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    steps = [h["step"] for h in history]
    for key in ("loss", "ce", "flow"):
        if history and key in history[0]:
            ax.plot(steps, [h[key] for h in history], label=key)
    ax.set_xlabel("step")
    ax.set_yscale("log")
    ax.legend()
    ax.set_title("Cheers training")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_html(out: Path, metrics: dict) -> None:
    def table_rows(scores: dict) -> str:
        return "".join(f"<tr><td>{html.escape(k)}</td><td>{v:.3f}</td></tr>" for k, v in scores.items())

    m = metrics["mmbench"]
    rows = table_rows(metrics["geneval"])
    mrows = table_rows(metrics["mmbench_detail"])
    orows = table_rows(metrics["open_questions"])
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>cheers shapes demo</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto}}td{{padding:2px 10px}}
table{{border-collapse:collapse}}tr:nth-child(even){{background:#f3f3f3}}</style></head><body>
<h1>cheers: the shapes-world demo</h1>
<p>{html.escape(metrics['summary'])}</p>
<h2>GenEval protocol (held-out prompts, 4 images each, analytic detector)</h2><table>{rows}</table>
<h2>MMBench protocol (held-out questions, CircularEval): overall {m['overall']:.3f}</h2><table>{mrows}</table>
<h2>Open questions (no options; the first word of the answer is right)</h2><table>{orows}</table>
<h2>Generated images</h2><img src="grid.png" alt="generated images with their prompts">
<h2>Loss curves</h2><img src="loss.png" alt="loss curves">
<p>Checkpoint: <code>checkpoint/</code>. Try <code>cheers generate --prompt "a red circle"</code>.</p>
</body></html>"""
    (out / "index.html").write_text(page)


# the default run's optimiser steps, chosen so that the whole demo fits well inside 20 minutes on 2 CPU cores
DEFAULT_STEPS = 1000


def eta(seconds: float) -> str:
    """``about N min (ends HH:MM)`` for ``seconds`` from now."""
    return f"about {seconds / 60:.0f} min (ends {time.strftime('%H:%M', time.localtime(time.time() + seconds))})"


def main(argv: list[str] | None = None) -> int:
    from cheers.shapes.parts import PARTS_FILE

    ap = OneLineParser(prog="cheers demo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=output_folder, default=Path("outputs/shapes-demo"),
                    help="the run's folder (data, checkpoints, report)")
    ap.add_argument("--steps", type=positive_int, default=DEFAULT_STEPS,
                    help="optimiser steps of training: the same seed gives the same run on any machine")
    ap.add_argument("--minutes", type=number(0.0, low_open=True), default=None,
                    help="a wall-clock budget for the whole demo instead: training stops when the rest "
                         "would overrun it, and the data and evaluation shrink with it")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--seed", type=non_negative_int, default=0)
    ap.add_argument("--samples", type=positive_int, default=30000, help="training samples to write")
    ap.add_argument("--eval-prompts", type=positive_int, default=16, help="GenEval prompts per tag")
    ap.add_argument("--eval-questions", type=positive_int, default=100, help="MMBench questions (before rotations)")
    ap.add_argument("--curriculum", type=number(0.0, 1.0, high_open=True), default=0.35,
                    help="fraction of the training steps spent on one- and two-object scenes first (0: none)")
    ap.add_argument("--i2t-turns", type=positive_int, default=3,
                    help="questions per understanding sample: every answer is a training target for the cost "
                         "of one image through the vision tokenizer")
    ap.add_argument("--parts", type=Path, default=PARTS_FILE,
                    help="pretrained VAE and semantic encoder (python -m cheers.shapes.parts); trained here "
                         "when absent")
    ap.add_argument("--threads", type=non_negative_int, default=0, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--no-cache", action="store_true", help="do not copy the checkpoint to the default location")
    ap.add_argument("overrides", nargs="*", help="dotted overrides of configs/shapes.yaml (train.lr=...)")
    args = ap.parse_args(argv)
    shapes_run_config(args.overrides)  # a bad override is refused before any work
    from cheers.pipeline import Pipeline, default_checkpoint
    from cheers.train.checkpoint import export

    if args.threads:
        torch.set_num_threads(args.threads)
    budget = Budget(args.minutes) if args.minutes is not None else None
    start = time.monotonic()
    share = 1.0 if budget is None else min(1.0, args.minutes / 15.0)  # data and evaluation shrink with a short budget
    samples = max(200, int(args.samples * share))
    eval_prompts = max(1, round(args.eval_prompts * share))
    eval_questions = max(4, round(args.eval_questions * share))
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    lines: list[str] = []

    def log(msg: str) -> None:
        lines.append(f"[{(time.monotonic() - start) / 60:5.1f} min] {msg}")
        tqdm.write(lines[-1])

    data, text_tokenizer_dir = prepare(out, samples, args.seed, log, args.i2t_turns, "option")
    init = build_init(out, text_tokenizer_dir, args.parts, seed=args.seed, log=log, overrides=args.overrides)
    # evaluation takes about a tenth of the default demo on a CPU
    eval_reserve = None if budget is None else 0.1 * budget.total + 10.0

    def seconds_left() -> float | None:
        return None if budget is None else budget.left() - eval_reserve

    first_steps = min(round(args.curriculum * args.steps), args.steps - 1)  # the second run gets at least one
    history: list[dict] = []
    offset = 0  # optimiser steps of the curriculum's first run
    if first_steps:  # simple scenes first, then everything
        left = seconds_left()
        t0 = time.monotonic()
        first, _ = run_training(out, out / "data-easy", text_tokenizer_dir, init, args.overrides, args.device, log,
                                steps=first_steps, seconds=None if left is None else args.curriculum * left,
                                name="run-easy", seed=args.seed)
        per_step = (time.monotonic() - t0) / max(first.step, 1)
        init = out / "init-easy"
        export(first.checkpoint, init, ema=first.ema)  # the averaged weights sample better
        history += first.history
        offset = first.step
        # the rest of training, then evaluation (about a tenth of the default demo)
        rest = (args.steps - first_steps) * per_step * 1.1 + 45.0
        if budget is not None:
            rest = min(rest, max(budget.left(), 0.0))
        log(f"{per_step:.2f} s a step; the demo ends in {eta(rest)}")
    result, run_dir = run_training(out, data, text_tokenizer_dir, init, args.overrides, args.device, log,
                                   steps=args.steps - first_steps, seconds=seconds_left(), seed=args.seed)
    log(f"trained {offset + result.step} steps; evaluating")
    history += [{**h, "step": h["step"] + offset} for h in result.history]
    result.history = history
    result.step += offset

    ckpt = out / "checkpoint"
    export(result.checkpoint, ckpt, ema=result.ema)
    shutil.copy(text_tokenizer_dir / "tokenizer.json", ckpt / "tokenizer.json")
    pipe = Pipeline.from_pretrained(ckpt, device=args.device)
    tc = pipe.cfg.transport
    gen = evaluate_geneval(pipe, out, eval_prompts, args.seed + 1, tc.sample_steps, tc.cfg_scale, log)
    mmb = evaluate_mmbench(pipe, out, eval_questions, args.seed + 1, log)
    opened = evaluate_open(pipe, out, eval_questions, args.seed + 1, log)

    scores = gen["scores"]
    tags = ["single_object", "two_object", "counting", "colors", "position", "color_attr"]
    wall = (time.monotonic() - start) / 60
    metrics = {
        "geneval": {"overall": scores["overall"], **{t: scores.get(t, 0.0) for t in tags}},
        "mmbench": {"overall": mmb["acc"].get("Overall", 0.0)},
        "mmbench_detail": mmb["acc"],
        "open_questions": opened,
        "train": {"steps": result.step, "final": result.history[-1] if result.history else {},
                  "skipped_samples": result.skipped},
        "seed": args.seed,
        "wall_minutes": wall,
    }
    metrics["summary"] = (f"{result.step} training steps; GenEval overall {scores['overall']:.3f}; "
                          f"MMBench CircularEval {metrics['mmbench']['overall']:.3f}; {wall:.1f} minutes in all.")
    by_tag: dict[str, list] = {}
    for sample in gen["samples"]:
        by_tag.setdefault(sample[0]["tag"], []).append(sample)
    write_grid([s for group in by_tag.values() for s in group[:4]], out / "grid.png")  # 4 prompts per tag
    write_loss_plot(result.history, out / "loss.png")
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    write_html(out, metrics)
    (out / "log.txt").write_text("\n".join(lines) + "\n")
    if not args.no_cache:
        cache = default_checkpoint()
        if cache.exists():
            shutil.rmtree(cache)
        cache.parent.mkdir(parents=True, exist_ok=True)
        shutil.copytree(ckpt, cache)
        log(f"checkpoint cached at {cache}: `cheers generate` and `cheers understand` use it by default")
    log(metrics["summary"])
    print(f"report: {out / 'index.html'}")
    return 0
