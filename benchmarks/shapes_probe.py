"""A short text-to-image probe on the shapes world: train from a demo's starting point for a
fixed time, then score GenEval tags on held-out prompts from pure noise. For comparing recipe
and flavour options quickly, one job at a time.

    cheers demo --out outputs/base --no-cache          # once: data, tokenizer, init/
    python benchmarks/shapes_probe.py --demo outputs/base --out outputs/probe1 --seconds 300 \
        [--scenes easy] [--tags single_object colors] [overrides of configs/shapes.yaml ...]

Prints one line: steps, final flow loss, and the per-tag scores at each CFG scale.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch

from cheers.demo import generate_and_score, run_training
from cheers.pipeline import Pipeline
from cheers.shapes.dataset import write_geneval_metadata
from cheers.train.checkpoint import export


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--demo", type=Path, required=True, help="a `cheers demo --out` folder (data, tokenizer, init)")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--seconds", type=float, default=300.0)
    ap.add_argument("--scenes", choices=("easy", "all"), default="easy",
                    help="easy: the curriculum's one- and two-object scenes")
    ap.add_argument("--init", type=Path, default=None, help="start from this export (default: DEMO/init)")
    ap.add_argument("--tags", nargs="+", default=["single_object", "colors", "two_object"])
    ap.add_argument("--prompts", type=int, default=16, help="held-out prompts per tag (4 images each)")
    ap.add_argument("--cfg-scale", type=float, nargs="+", default=[1.5, 3.0])
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    data = args.demo / ("data-easy" if args.scenes == "easy" else "data")
    over = ["data.ratios={t2i: 1.0, i2t: 0.0, text: 0.0}", "train.progress=false", *args.overrides]
    result, run_dir = run_training(args.out, data, args.demo / "tokenizer", args.init or args.demo / "init",
                                   args.seconds, over, "cpu", print, name="run")
    ckpt = args.out / "checkpoint"
    export(result.checkpoint, ckpt, ema=result.ema)
    shutil.copy(args.demo / "tokenizer" / "tokenizer.json", ckpt / "tokenizer.json")
    pipe = Pipeline.from_pretrained(ckpt, device="cpu")
    final = result.history[-1] if result.history else {}
    line = {"steps": result.step, "flow": round(final.get("flow", float("nan")), 3), "overrides": args.overrides}
    meta = [m for m in write_geneval_metadata(str(args.out / "meta.jsonl"), args.prompts, seed=1)
            if m["tag"] in args.tags]
    for w in args.cfg_scale:
        scores, _ = generate_and_score(pipe, meta, args.out / f"geneval-cfg{w:g}", seed=1,
                                       steps=pipe.cfg.transport.sample_steps, cfg_scale=w, progress=False)
        line[f"cfg {w:g}"] = {k: round(v, 3) for k, v in scores.items() if isinstance(v, float)}
    (args.out / "probe.json").write_text(json.dumps(line) + "\n")
    print(json.dumps(line))


if __name__ == "__main__":
    main()
