"""``cheers demo``: the shapes world end to end on a CPU, with no download.

Writes the data (WebDataset shards), trains a byte-level BPE tokenizer, the tiny VAE and the
tiny semantic encoder (then frozen), trains the whole Cheers model through the project's
trainer, then generates images for held-out GenEval-style prompts and answers held-out
MMBench-style questions, scores both with the shapes evaluator (GenEval rules, CircularEval),
asks held-out open questions without options (``evaluate_open``), and writes a report folder:

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

    def elapsed(self) -> float:
        return time.monotonic() - self.start


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
    flags = {"i2t_turns": "--i2t-turns", "mcq_answer": "--mcq-answer"}
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
            if was != value:
                raise CheersError(f"{folder} holds shards written with {flags[key]} {was}, not {value}: "
                                  f"use another --out, or {flags[key]} {was}")
    text_tokenizer_dir = out / "tokenizer"
    if not (text_tokenizer_dir / "tokenizer.json").is_file():
        from cheers.shapes.dataset import mmbench_rows
        from cheers.shapes.texts import format_mmbench_prompt

        extra = [format_mmbench_prompt(r["question"], [r[c] for c in "ABCD" if r[c]], r["hint"] or None)
                  for r in mmbench_rows(200, seed=seed + 100, circular=False)]
        train_text_tokenizer([data, easy], extra).save(text_tokenizer_dir)
    log(f"data: {n_train} samples in {data}, {n_train // 3} simple ones in {easy}; tokenizer in {text_tokenizer_dir}")
    return data, text_tokenizer_dir


def build_init(out: Path, text_tokenizer_dir: Path, vae_seconds: float, semantic_seconds: float, seed: int, log,
               overrides: list[str] = ()) -> Path:
    """The starting model: the tiny VAE trained first (and copied into the pixel decoder), then
    the tiny semantic encoder pretrained on dense labels (``cheers.shapes.semantic``). The model
    is configs/shapes.yaml's with the run's ``model.*`` overrides, as the training run builds it."""
    from cheers.checkpoint import save_pretrained
    from cheers.model import CheersModel
    from cheers.shapes.autoencoder import train_vae
    from cheers.shapes.semantic import train_semantic_encoder
    from cheers.text_tokenizer import TextTokenizer

    init = out / "init"
    if (init / "model.safetensors").is_file():
        return init
    cfg = shapes_run_config(overrides).model
    tok = TextTokenizer.from_dir(text_tokenizer_dir)
    if tok.special != cfg.tokens or tok.vocab_size > cfg.llm.vocab_size:
        raise CheersError(f"tokenizer {text_tokenizer_dir} does not fit the shapes flavour")
    vae, losses = train_vae(cfg.tokenizer.vae, cfg.tokenizer.image_size, seconds=vae_seconds, seed=seed, desc="vae")
    log(f"vae: {len(losses)} steps, reconstruction loss {np.mean(losses[:10]):.4f} -> {np.mean(losses[-10:]):.4f}")
    encoder, sem_losses, acc = train_semantic_encoder(
        cfg.tokenizer.siglip, None, cfg.tokenizer.image_size, seconds=semantic_seconds, seed=seed,
        desc="semantic encoder")
    log(f"semantic encoder: {len(sem_losses)} steps, loss {np.mean(sem_losses[:10]):.3f} -> "
        f"{np.mean(sem_losses[-10:]):.3f}; patch accuracy " + ", ".join(f"{k} {v:.2f}" for k, v in acc.items()))
    torch.manual_seed(seed)
    model = CheersModel(cfg)
    model.init_weights()
    model.tokenizer.vae.load_state_dict(vae.state_dict())
    model.tokenizer.pixel_decoder.decoder.load_state_dict(vae.decoder.state_dict())
    model.tokenizer.pixel_decoder.bn.load_state_dict(vae.bn.state_dict())
    model.tokenizer.siglip.load_state_dict(encoder.state_dict())
    save_pretrained(model, init)
    (init / "vae_losses.json").write_text(json.dumps(losses))
    return init


def shapes_run_config(overrides: list[str]):
    """configs/shapes.yaml with dotted overrides: the one place the demo builds its config."""
    from cheers.train.config import run_config_from_dict

    return run_config_from_dict(merge(load_yaml(CONFIG), parse_overrides(list(overrides))))


def run_training(out: Path, data: Path, text_tokenizer_dir: Path, init: Path, seconds: float, overrides: list[str],
                 device: str, log, name: str = "run"):
    from cheers.train.trainer import train

    run_dir = out / name
    over = [f"data.shards=['{data}/*.tar']", f"data.text_tokenizer_dir={text_tokenizer_dir}", f"train.init_from={init}",
            f"train.out_dir={run_dir}", f"train.device={device}", f"train.max_seconds={seconds:.0f}"]
    cfg = shapes_run_config(over + list(overrides))
    log(f"training for {seconds / 60:.1f} min (at most {cfg.train.steps} steps) in {run_dir}")
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


def evaluate_mmbench(pipe, out: Path, n: int, seed: int, log) -> dict:
    """MMBench-style questions with CircularEval through ``cheers.eval.mmbench``, answered by
    greedy decoding in batches; acc.csv / acc.json in ``out/mmbench``."""
    from cheers.eval import mmbench
    from cheers.eval.answering import answer_rows
    from cheers.shapes.dataset import mmbench_rows

    rows = mmbench_rows(n, seed=seed, circular=True)
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


def evaluate_open(pipe, out: Path, n: int, seed: int, log) -> dict:
    """Held-out open questions in the training's own phrasing (colour of a shape, shape of a
    colour, counts), right when the answer's first word is the truth. Not an MMBench score:
    beside it, it tells whether the model sees the answer apart from whether it can find that
    answer's letter among options. Answers in ``out/open_answers.json``."""
    from cheers.eval.answering import answer_rows
    from cheers.shapes.dataset import open_question_rows

    rows = open_question_rows(n, seed=seed)
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


def write_loss_plot(history: list[dict], vae_losses: list[float], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    steps = [h["step"] for h in history]
    for key in ("loss", "ce", "flow"):
        if history and key in history[0]:
            axes[0].plot(steps, [h[key] for h in history], label=key)
    axes[0].set_xlabel("step")
    axes[0].set_yscale("log")
    axes[0].legend()
    axes[0].set_title("Cheers training")
    axes[1].plot(vae_losses)
    axes[1].set_yscale("log")
    axes[1].set_xlabel("step")
    axes[1].set_title("VAE reconstruction")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# the quality floors of the 15-minute CPU demo (the shapes-world issue): what proves the loop learns
GENEVAL_FLOORS = {"overall": 0.2, "single_object": 0.45, "two_object": 0.15, "colors": 0.4}
MMBENCH_FLOOR = 0.3


def write_html(out: Path, metrics: dict) -> None:
    def table_rows(scores: dict, floors: dict | None = None) -> str:
        def floor(k: str, v: float) -> str:
            if not floors or k not in floors:
                return "<td></td>"
            return f"<td>floor {floors[k]:.2f}: {'met' if v >= floors[k] else 'not met'}</td>"

        return "".join(f"<tr><td>{html.escape(k)}</td><td>{v:.3f}</td>{floor(k, v)}</tr>" for k, v in scores.items())

    m = metrics["mmbench"]
    rows = table_rows(metrics["geneval"], GENEVAL_FLOORS)
    mrows = table_rows(metrics["mmbench_detail"], {"Overall": MMBENCH_FLOOR})
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


def main(argv: list[str] | None = None) -> int:
    ap = OneLineParser(prog="cheers demo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=output_folder, default=Path("outputs/shapes-demo"),
                    help="the run's folder (data, checkpoints, report)")
    ap.add_argument("--minutes", type=number(0.0, low_open=True), default=15.0,
                    help="wall-clock budget for the whole demo (> 0)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--seed", type=non_negative_int, default=0)
    ap.add_argument("--samples", type=positive_int, default=30000, help="training samples to write")
    ap.add_argument("--eval-prompts", type=positive_int, default=16, help="GenEval prompts per tag")
    ap.add_argument("--eval-questions", type=positive_int, default=100, help="MMBench questions (before rotations)")
    ap.add_argument("--curriculum", type=number(0.0, 1.0, high_open=True), default=0.35,
                    help="fraction of the training time spent on one- and two-object scenes first (0: none)")
    ap.add_argument("--curriculum-t2i-only", action="store_true",
                    help="the curriculum's first run trains text-to-image alone (better first images, weaker "
                         "answers: benchmarks/RESULTS.md, Shapes world)")
    ap.add_argument("--i2t-turns", type=positive_int, default=3,
                    help="questions per understanding sample: every answer is a training target for the cost "
                         "of one image through the vision tokenizer")
    ap.add_argument("--mcq-answer", choices=("option", "letter"), default="option",
                    help="how understanding samples answer multiple-choice questions: with the option's text "
                         "(MMBench's rule-based extraction reads the letter back from it) or with the letter")
    ap.add_argument("--threads", type=non_negative_int, default=0, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--no-cache", action="store_true", help="do not copy the checkpoint to the default location")
    ap.add_argument("overrides", nargs="*", help="dotted overrides of configs/shapes.yaml (train.lr=...)")
    args = ap.parse_args(argv)
    shapes_run_config(args.overrides)  # a bad override is refused before any work
    from cheers.pipeline import Pipeline, default_checkpoint

    if args.threads:
        torch.set_num_threads(args.threads)
    budget = Budget(args.minutes)
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    lines: list[str] = []

    def log(msg: str) -> None:
        lines.append(f"[{budget.elapsed() / 60:5.1f} min] {msg}")
        tqdm.write(lines[-1])

    data, text_tokenizer_dir = prepare(out, args.samples, args.seed, log, args.i2t_turns, args.mcq_answer)
    # the semantic encoder gets 15% (3,000 steps at 15 minutes; patch shape accuracy 0.49,
    # against 0.34 after the 1,000 steps of 5%)
    init = build_init(out, text_tokenizer_dir, vae_seconds=0.16 * budget.total, semantic_seconds=0.15 * budget.total,
                      seed=args.seed, log=log, overrides=args.overrides)
    eval_reserve = min(0.12 * budget.total, 120.0)  # evaluation takes about a minute on a CPU
    from cheers.train.checkpoint import export

    seconds = max(60.0, budget.left() - eval_reserve)
    history: list[dict] = []
    offset = 0  # optimiser steps of the curriculum's first run
    if args.curriculum > 0:  # simple scenes first, then everything
        only_t2i = ["data.ratios={t2i: 1.0, i2t: 0.0, text: 0.0}"] if args.curriculum_t2i_only else []
        first, _ = run_training(out, out / "data-easy", text_tokenizer_dir, init, args.curriculum * seconds,
                                [*only_t2i, *args.overrides], args.device, log, name="run-easy")
        init = out / "init-easy"
        export(first.checkpoint, init, ema=first.ema)  # the averaged weights sample better
        history += first.history
        offset = first.step
        seconds = max(60.0, budget.left() - eval_reserve)
    result, run_dir = run_training(out, data, text_tokenizer_dir, init, seconds, args.overrides, args.device, log)
    history += [{**h, "step": h["step"] + offset} for h in result.history]
    result.history = history
    result.step += offset

    ckpt = out / "checkpoint"
    export(result.checkpoint, ckpt, ema=result.ema)
    shutil.copy(text_tokenizer_dir / "tokenizer.json", ckpt / "tokenizer.json")
    pipe = Pipeline.from_pretrained(ckpt, device=args.device)
    tc = pipe.cfg.transport
    gen = evaluate_geneval(pipe, out, args.eval_prompts, args.seed + 1, tc.sample_steps, tc.cfg_scale, log)
    mmb = evaluate_mmbench(pipe, out, args.eval_questions, args.seed + 1, log)
    opened = evaluate_open(pipe, out, args.eval_questions, args.seed + 1, log)

    scores = gen["scores"]
    tags = ["single_object", "two_object", "counting", "colors", "position", "color_attr"]
    metrics = {
        "geneval": {"overall": scores["overall"], **{t: scores.get(t, 0.0) for t in tags}},
        "mmbench": {"overall": mmb["acc"].get("Overall", 0.0)},
        "mmbench_detail": mmb["acc"],
        "open_questions": opened,
        "train": {"steps": result.step, "final": result.history[-1] if result.history else {},
                  "skipped_samples": result.skipped},
        "wall_minutes": budget.elapsed() / 60,
    }
    metrics["summary"] = (f"{result.step} training steps; GenEval overall {scores['overall']:.3f}; "
                          f"MMBench CircularEval {metrics['mmbench']['overall']:.3f}; "
                          f"{metrics['wall_minutes']:.1f} minutes in all.")
    write_grid(gen["samples"], out / "grid.png")
    vae_losses = json.loads((out / "init" / "vae_losses.json").read_text())
    write_loss_plot(result.history, vae_losses, out / "loss.png")
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
