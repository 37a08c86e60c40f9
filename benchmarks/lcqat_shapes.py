"""2-bit Cheers on the shapes world: the demo's evaluations before and after quantizing the LLM.

    python benchmarks/lcqat_shapes.py --ckpt outputs/shapes-demo/checkpoint \
        --data 'outputs/shapes-demo/data/*.tar' --out outputs/lcqat-shapes [--qat-seconds 240]

Rows, each scored with the demo's GenEval-shapes and MMBench-shapes (CircularEval) protocols
on the same held-out prompts and questions:

    fp         the checkpoint as trained
    rtn-g64    round-to-nearest 2-bit, groups of 64 (2.5 bits/weight; fake-quantized)
    lcqat-ptq  `cheers quantize --method lcqat` (packed, ~2 bits/weight + SU/SV)
    lcqat-qat  + QAT through the trainer (configs/lcqat_shapes.yaml), distilled from fp

Writes ``OUT/metrics.json`` and prints a table. CPU minutes: PTQ ~1, QAT ``--qat-seconds``,
each evaluation a few (fewer with ``--eval-prompts`` / ``--eval-questions`` / ``--sample-steps``).
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
QAT_CONFIG = ROOT / "configs" / "lcqat_shapes.yaml"
ROWS = ("fp", "rtn-g64", "lcqat-ptq", "lcqat-qat")


def evaluate(pipe, out: Path, args, log) -> dict:
    """GenEval-shapes overall and MMBench-shapes overall of a loaded checkpoint."""
    # the demo's evaluation helpers; the one place to re-point when they move to cheers.eval
    from cheers.shapes.evaluate import evaluate_geneval, evaluate_mmbench

    out.mkdir(parents=True, exist_ok=True)
    tc = pipe.cfg.transport
    steps = args.sample_steps or tc.sample_steps
    gen = evaluate_geneval(pipe, out, args.eval_prompts, args.seed + 1, steps, tc.cfg_scale, log)
    mmb = evaluate_mmbench(pipe, out, args.eval_questions, args.seed + 1, log)
    return {
        "geneval": gen["scores"]["overall"],
        "mmbench": mmb["acc"].get("Overall", 0.0),
        "geneval_detail": {k: v for k, v in gen["scores"].items() if isinstance(v, float)},
        "mmbench_detail": mmb["acc"],
    }


@torch.no_grad()
def heldout_losses(pipe, folder: Path, shards: list[str], n_batches: int, device: str) -> dict:
    """Mean CE and flow loss over fixed held-out batches (same samples, times and noise
    for every row): a measure that moves even where the task scores are near zero."""
    from cheers.collate import make_collate
    from cheers.train.config import DataConfig
    from cheers.train.data import SampleLoader

    model = pipe.model
    data = DataConfig(
        shards=list(shards),
        text_tokenizer_dir=str(folder),
        shuffle_buffer=1,
        ratios={"t2i": 0.5, "i2t": 0.4, "text": 0.1},
    )
    loader = SampleLoader(data, image_size=model.cfg.tokenizer.image_size, seed=1234)
    collate = make_collate(model.cfg, folder)
    gen = torch.Generator(device=device).manual_seed(1234)
    ce = flow = 0.0
    for _ in range(n_batches):
        batch = collate(loader.next_batch(16)).to(device)
        out = model(batch, generator=gen)
        ce += float(out["ce"]) / n_batches
        flow += float(out["flow"]) / n_batches
    return {"heldout_ce": ce, "heldout_flow": flow}


def run_qat(
    ckpt: Path,
    ptq: Path,
    shards: list[str],
    out: Path,
    seconds: float,
    device: str,
    overrides: list[str],
) -> Path:
    """QAT with configs/lcqat_shapes.yaml from the PTQ folder; returns the packed export."""
    from cheers.train.checkpoint import export
    from cheers.train.config import load_run_config
    from cheers.train.trainer import train

    run = out / "qat-run"
    shutil.rmtree(run, ignore_errors=True)  # a fresh run each time (the PTQ state resumes instead)
    shard_list = ", ".join(f"'{s}'" for s in shards)
    cfg = load_run_config(
        QAT_CONFIG,
        [
            f"train.init_from={ckpt}",
            f"lcqat.init={ptq}",
            f"data.shards=[{shard_list}]",
            f"data.text_tokenizer_dir={ckpt}",
            f"train.out_dir={run}",
            f"train.max_seconds={seconds}",
            f"train.device={device}",
            "train.resume=never",
            *overrides,
        ],
    )
    result = train(cfg)
    folder = out / "lcqat-qat"
    export(result.checkpoint, folder)
    shutil.copy(ckpt / "tokenizer.json", folder / "tokenizer.json")
    (folder / "train.json").write_text(
        json.dumps({"steps": result.step, "history": result.history}, indent=1)
    )
    return folder


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--ckpt", type=Path, default=None, help="shapes checkpoint (default: the demo's cache)"
    )
    ap.add_argument(
        "--data",
        action="append",
        default=None,
        help="training shards for calibration and QAT (default: shapes data written here)",
    )
    ap.add_argument("--out", type=Path, default=Path("outputs/lcqat-shapes"))
    ap.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated subset of {ROWS}")
    ap.add_argument("--calib-samples", type=int, default=128)
    ap.add_argument("--finetune-steps", type=int, default=100, help="PTQ: Adam steps per block")
    ap.add_argument("--qat-seconds", type=float, default=240.0)
    ap.add_argument(
        "--train-samples", type=int, default=4000, help="shapes samples to write without --data"
    )
    ap.add_argument("--eval-prompts", type=int, default=8, help="GenEval prompts per tag")
    ap.add_argument(
        "--eval-questions", type=int, default=60, help="MMBench questions before rotations"
    )
    ap.add_argument(
        "--sample-steps", type=int, default=None, help="sampler steps (default: the checkpoint's)"
    )
    ap.add_argument("--heldout-batches", type=int, default=8, help="held-out loss batches of 16")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("overrides", nargs="*", help="dotted overrides of configs/lcqat_shapes.yaml")
    args = ap.parse_args(argv)
    from cheers.pipeline import Pipeline, default_checkpoint
    from cheers.quantize import quantize_checkpoint
    from cheers.shapes.dataset import HELDOUT_SEED, write_shards

    if args.threads:
        torch.set_num_threads(args.threads)
    ckpt = args.ckpt or default_checkpoint()
    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    unknown = sorted(set(rows) - set(ROWS))
    if unknown:
        ap.error(f"unknown row {unknown[0]!r}; rows: {ROWS}")
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()

    def log(msg: str) -> None:
        print(f"[{(time.monotonic() - t0) / 60:5.1f} min] {msg}", flush=True)

    shards = args.data
    if shards is None:
        shards = write_shards(
            str(out / "data"),
            n_samples=args.train_samples,
            seed=args.seed + 11,
            image_size=64,
            samples_per_shard=1000,
        )
    heldout = write_shards(
        str(out / "heldout"),
        n_samples=256,
        seed=HELDOUT_SEED + 7,
        image_size=64,
        samples_per_shard=256,
    )
    metrics: dict[str, dict] = {}
    folders = {"fp": ckpt}
    if "rtn-g64" in rows:
        _, s = quantize_checkpoint(
            ckpt, out / "rtn-g64", method="rtn", group_size=64, progress=False
        )
        folders["rtn-g64"] = out / "rtn-g64"
        metrics["rtn-g64"] = {"bits_per_weight": s["bits_per_weight"]}
    if "lcqat-ptq" in rows or "lcqat-qat" in rows:
        _, s = quantize_checkpoint(
            ckpt,
            out / "lcqat-ptq",
            method="lcqat",
            calib=shards,
            samples=args.calib_samples,
            state_dir=out / "ptq-state",
            finetune_steps=args.finetune_steps,
            seed=args.seed,
        )
        folders["lcqat-ptq"] = out / "lcqat-ptq"
        metrics["lcqat-ptq"] = {
            "bits_per_weight": s["bits_per_weight"],
            "ptq_seconds": s["seconds"],
        }
        log(f"lcqat PTQ: {s['bits_per_weight']:.3f} bits/weight in {s['seconds']:.0f} s")
    if "lcqat-qat" in rows:
        folders["lcqat-qat"] = run_qat(
            ckpt, folders["lcqat-ptq"], shards, out, args.qat_seconds, args.device, args.overrides
        )
        steps = json.loads((folders["lcqat-qat"] / "train.json").read_text())["steps"]
        metrics["lcqat-qat"] = {
            "bits_per_weight": metrics["lcqat-ptq"]["bits_per_weight"],
            "qat_steps": steps,
        }
    for row in rows:
        log(f"evaluating {row}: {folders[row]}")
        pipe = Pipeline.from_pretrained(folders[row], device=args.device)  # once for both measures
        metrics.setdefault(row, {}).update(
            heldout_losses(pipe, folders[row], heldout, args.heldout_batches, args.device)
        )
        metrics[row].update(evaluate(pipe, out / "eval" / row, args, log))
        (out / "metrics.json").write_text(json.dumps(metrics, indent=1) + "\n")

    print(
        f"\n{'row':10s} {'bits/w':>7s} {'CE':>7s} {'flow':>7s} {'GenEval':>8s} {'MMBench':>8s}  (CE, flow: held out)"
    )
    for row in rows:
        m = metrics[row]
        bits = f"{m['bits_per_weight']:.3f}" if "bits_per_weight" in m else "32"
        print(
            f"{row:10s} {bits:>7s} {m['heldout_ce']:7.4f} {m['heldout_flow']:7.4f} "
            f"{m['geneval']:8.3f} {m['mmbench']:8.3f}"
        )
    print(f"wrote {out / 'metrics.json'} ({(time.monotonic() - t0) / 60:.1f} min)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
