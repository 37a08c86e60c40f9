"""``cheers eval``: GenEval, DPG-Bench, MMBench and MME, and all four on the shapes world.

    cheers eval geneval generate --metadata evaluation_metadata.jsonl --out outputs/geneval
    cheers eval geneval score outputs/geneval --out outputs/geneval/results.jsonl --detector shapes
    cheers eval geneval summary outputs/geneval/results.jsonl --out outputs/geneval
    cheers eval dpg generate --prompts dpg_bench/prompts --out outputs/dpg
    cheers eval dpg score outputs/dpg --csv dpg_bench/dpg_bench.csv --out outputs/dpg-report
    cheers eval mmbench run --tsv MMBench_DEV_EN.tsv --out outputs/mmbench
    cheers eval mmbench score --pred predictions.xlsx --out outputs/mmbench
    cheers eval mme run --tsv MME.tsv --out outputs/mme
    cheers eval mme score --pred predictions.tsv --out outputs/mme
    cheers eval shapes --out outputs/shapes-eval     # all four on the shapes checkpoint

The checkpoint defaults to the shapes demo's (``cheers demo``); the official external models
(Mask2Former, CLIP, mPLUG) are used only from local files given on the command line.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from cheers.cli_args import (
    OneLineParser,
    checkpoint_args,
    non_negative_int,
    open_pipeline,
    positive_int,
    sampling_args,
    sampling_options,
)


def _answer_args(p: argparse.ArgumentParser, max_new_tokens: int) -> None:
    p.add_argument(
        "--batch-size", type=positive_int, default=16, help="questions answered together"
    )
    p.add_argument("--max-new-tokens", type=positive_int, default=max_new_tokens, help="longest answer, in tokens")


def _judge_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--judge-url",
        default=None,
        help="OpenAI-compatible API base, used only when the rule-based matcher reads nothing",
    )
    p.add_argument("--judge-model", default=None, help="the judge's model name at --judge-url")
    p.add_argument(
        "--judge-key-env", default="OPENAI_API_KEY", help="environment variable with the key"
    )


def _judge(args):
    if not args.judge_url and not args.judge_model:
        return None
    from cheers.eval.judge import Judge

    return Judge(args.judge_url, args.judge_model, key_env=args.judge_key_env)


# --------------------------------------------------------------------------- commands


def geneval_generate(args) -> None:
    from cheers.eval import geneval

    meta = geneval.read_metadata(args.metadata)
    res = geneval.generate(
        open_pipeline(args),
        meta,
        args.out,
        n=args.n,
        seed=args.seed,
        batch_size=args.batch_size,
        **sampling_options(args),
    )
    print(
        f"geneval: {res['written']} prompt(s) generated, {res['skipped']} already done, in {args.out}"
    )


def geneval_score(args) -> None:
    from cheers.eval import geneval
    from cheers.eval.geneval_rules import GenEvalConfig

    if args.detector == "shapes":
        detector, colours = geneval.shapes_scorer()
    else:
        detector, colours = geneval.official_scorer(
            detector_config=args.detector_config,
            detector_ckpt=args.detector_ckpt,
            class_names=args.class_names,
            clip_ckpt=args.clip_ckpt,
            clip_arch=args.clip_arch,
            device=args.device,
        )
    out = args.out or Path(args.imagedir) / "results.jsonl"
    records = geneval.score(args.imagedir, out, detector, colours, GenEvalConfig(**args.options))
    print(f"geneval: scored {len(records)} images -> {out}")


def geneval_summary(args) -> None:
    from cheers.eval import geneval

    scores = geneval.write_summary(args.results, args.out)
    print(geneval.summary_table(scores))


def dpg_generate(args) -> None:
    from cheers.eval import dpg

    res = dpg.generate(
        open_pipeline(args),
        args.prompts,
        args.out,
        seed=args.seed,
        batch_size=args.batch_size,
        **sampling_options(args),
    )
    print(f"dpg: {res['written']} grid(s) written, {res['skipped']} already done, in {args.out}")


def _vqa(args):
    if args.vqa == "shapes":
        from cheers.eval.shapes_sets import ShapesVQA

        return ShapesVQA()
    from cheers.eval.dpg import MplugVQA

    return MplugVQA(args.vqa_model_dir, device=args.device)


def dpg_score(args) -> None:
    from cheers.eval import dpg

    items = dpg.read_questions(args.csv, skip_first_row=not args.keep_first_row)
    result = dpg.score_folder(
        args.imagedir, items, _vqa(args), resolution=args.resolution, pic_num=args.pic_num
    )
    print(dpg.write_report(result, args.out))


def mmbench_run(args) -> None:
    from cheers.eval import mmbench

    acc = mmbench.run(
        open_pipeline(args),
        args.tsv,
        args.out,
        judge=_judge(args),
        circular=not args.vanilla,
        prompt_style=args.prompt_style,
        batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens,
    )
    print(f"predictions: {args.out / 'predictions.tsv'}")
    print("(no answers in the TSV: not scored)" if acc is None else mmbench.format_acc(acc))


def mmbench_score(args) -> None:
    from cheers.eval import mmbench

    print(
        mmbench.format_acc(
            mmbench.score_file(
                str(args.pred), args.out, circular=not args.vanilla, judge=_judge(args)
            )
        )
    )


def mme_run(args) -> None:
    from cheers.eval import mme

    result = mme.run(
        open_pipeline(args),
        str(args.tsv),
        args.out,
        judge=_judge(args),
        batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens,
    )
    print(mme.format_report(result))


def mme_score(args) -> None:
    from cheers.eval import mme

    print(mme.format_report(mme.score_file(str(args.pred), args.out, judge=_judge(args))))


def shapes(args) -> None:
    """All four benchmarks on the shapes world through the same code paths."""
    import time

    from cheers.eval import dpg, geneval, mmbench, mme
    from cheers.eval.shapes_sets import ShapesVQA, shapes_summary, write_dpg_set, write_mme_tsv
    from cheers.shapes.dataset import write_geneval_metadata, write_mmbench_tsv

    out: Path = args.out
    pipe = open_pipeline(args)
    sampling = sampling_options(args)
    meta = write_geneval_metadata(
        str(out / "geneval_metadata.jsonl"), args.prompts_per_tag, seed=args.data_seed
    )
    n_geneval, n_dpg = 4 * len(meta), 4 * args.dpg_prompts
    print(f"[1/4] GenEval: {n_geneval} images (the longest part, with DPG-Bench's {n_dpg})", flush=True)
    t0 = time.perf_counter()
    written = geneval.generate(
        pipe, meta, out / "geneval", n=4, seed=args.seed, batch_size=args.batch_size, **sampling
    )["written"]
    per_image = (time.perf_counter() - t0) / max(4 * written, 1)
    detector, colours = geneval.shapes_scorer()
    records = geneval.score(out / "geneval", out / "geneval" / "results.jsonl", detector, colours)
    geneval_scores = geneval.write_summary(records, out / "geneval")

    estimate = f", about {n_dpg * per_image / 60:.1f} min at GenEval's rate" if written else ""
    print(f"[2/4] DPG-Bench: {n_dpg} images{estimate}", flush=True)
    csv_path = write_dpg_set(out / "dpg", args.dpg_prompts, seed=args.data_seed)
    dpg.generate(
        pipe,
        out / "dpg" / "prompts",
        out / "dpg" / "images",
        seed=args.seed,
        batch_size=args.batch_size,
        **sampling,
    )
    result = dpg.score_folder(out / "dpg" / "images", dpg.read_questions(csv_path), ShapesVQA())
    dpg.write_report(result, out / "dpg")

    print(f"[3/4] MMBench: {args.questions} questions", flush=True)
    write_mmbench_tsv(str(out / "mmbench.tsv"), args.questions, seed=args.data_seed)
    acc = mmbench.run(
        pipe,
        str(out / "mmbench.tsv"),
        out / "mmbench",
        batch_size=args.answer_batch_size,
        max_new_tokens=args.max_new_tokens,
    )

    print(f"[4/4] MME: {args.questions} images, two questions each", flush=True)
    write_mme_tsv(out / "mme.tsv", args.questions, seed=args.data_seed)
    res = mme.run(
        pipe,
        str(out / "mme.tsv"),
        out / "mme",
        batch_size=args.answer_batch_size,
        max_new_tokens=args.max_new_tokens,
    )
    summary = shapes_summary(geneval_scores, result["summary"], acc, res)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2))


# --------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    ap = OneLineParser(prog="cheers eval", description=__doc__)
    bench = ap.add_subparsers(dest="bench", required=True)

    g = bench.add_parser("geneval", help="GenEval").add_subparsers(dest="action", required=True)
    p = g.add_parser("generate", help="images in the official layout (resumable)")
    p.add_argument("--metadata", type=Path, required=True, help="evaluation_metadata.jsonl")
    p.add_argument("--out", type=Path, required=True, help="the folder of the official layout")
    p.add_argument("--n", type=positive_int, default=4, help="images per prompt")
    checkpoint_args(p, lora=False)
    sampling_args(p, batch_size=8)
    p.set_defaults(fn=geneval_generate)
    p = g.add_parser("score", help="the official rules over a detector -> results.jsonl")
    p.add_argument("imagedir", type=Path, help="the folder `geneval generate` wrote")
    p.add_argument(
        "--out", type=Path, default=None, help="results.jsonl (default: IMAGEDIR/results.jsonl)"
    )
    p.add_argument("--detector", choices=["shapes", "mask2former"], default="shapes",
                   help="the shapes world's analytic detector, or the official Mask2Former")
    p.add_argument(
        "--detector-config", default=None, help="mmdetection 2.x Mask2Former config file"
    )
    p.add_argument("--detector-ckpt", default=None, help="Mask2Former Swin-S COCO .pth")
    p.add_argument("--class-names", default=None, help="GenEval's evaluation/object_names.txt")
    p.add_argument("--clip-ckpt", default=None, help="local open_clip weights (OpenAI ViT-L-14)")
    p.add_argument("--clip-arch", default="ViT-L-14", help="open_clip architecture of --clip-ckpt")
    p.add_argument("--device", default="cpu", help="where the scorers run: cpu, cuda, cuda:N")
    p.add_argument(
        "--options",
        nargs="*",
        help="KEY=VALUE: threshold, counting_threshold, max_objects, "
        "max_overlap, position_threshold (as the official --options)",
    )
    p.set_defaults(fn=geneval_score)
    p = g.add_parser("summary", help="summary.json and the official table from results.jsonl")
    p.add_argument("results", type=Path, help="the results.jsonl of `geneval score`")
    p.add_argument("--out", type=Path, required=True, help="the folder for summary.json")
    p.set_defaults(fn=geneval_summary)

    d = bench.add_parser("dpg", help="DPG-Bench").add_subparsers(dest="action", required=True)
    p = d.add_parser("generate", help="one 2x2 grid <name>.png per <name>.txt (resumable)")
    p.add_argument("--prompts", type=Path, required=True, help="a folder of <name>.txt prompts")
    p.add_argument("--out", type=Path, required=True, help="the folder for the grids")
    checkpoint_args(p, lora=False)
    sampling_args(p, batch_size=8)
    p.set_defaults(fn=dpg_generate)
    p = d.add_parser("score", help="VQA with dependency zeroing")
    p.add_argument("imagedir", type=Path, help="the folder `dpg generate` wrote")
    p.add_argument("--csv", type=Path, required=True, help="dpg_bench.csv")
    p.add_argument("--out", type=Path, required=True, help="the report's folder")
    p.add_argument("--vqa", choices=["shapes", "mplug"], default="shapes",
                   help="the shapes world's answerer, or the official mPLUG-large")
    p.add_argument(
        "--vqa-model-dir", default=None, help="local mPLUG-large VQA folder (ModelScope)"
    )
    p.add_argument(
        "--resolution", type=positive_int, default=None, help="tile side (default: half the width)"
    )
    p.add_argument("--pic-num", type=positive_int, default=4, help="tiles scored per grid")
    p.add_argument(
        "--keep-first-row",
        action="store_true",
        help="read the CSV's first question too (the official reader skips it)",
    )
    p.add_argument("--device", default="cpu", help="where the VQA model runs: cpu, cuda, cuda:N")
    p.set_defaults(fn=dpg_score)

    for name, run_fn, score_fn, tokens in (
        ("mmbench", mmbench_run, mmbench_score, 32),
        ("mme", mme_run, mme_score, 16),
    ):
        s = bench.add_parser(name, help=name.upper()).add_subparsers(dest="action", required=True)
        p = s.add_parser("run", help="answer the TSV, write predictions.tsv, score")
        p.add_argument("--tsv", type=Path, required=True, help="the benchmark's TSV")
        p.add_argument("--out", type=Path, required=True, help="the folder for predictions and scores")
        checkpoint_args(p, lora=False)
        _answer_args(p, tokens)
        _judge_args(p)
        p.set_defaults(fn=run_fn)
        q = s.add_parser("score", help="score a VLMEvalKit predictions file (TSV or XLSX)")
        q.add_argument("--pred", type=Path, required=True, help="the predictions file")
        q.add_argument("--out", type=Path, required=True, help="the folder for the scores")
        _judge_args(q)
        q.set_defaults(fn=score_fn)
        if name == "mmbench":
            p.add_argument("--prompt-style", choices=["llava", "vlmevalkit"], default="llava",
                           help="how a question and its options are laid out in the prompt")
            for x in (p, q):
                x.add_argument(
                    "--vanilla", action="store_true", help="score rows alone, not CircularEval"
                )

    p = bench.add_parser("shapes", help="all four benchmarks on the shapes world")
    p.add_argument("--out", type=Path, default=Path("outputs/shapes-eval"), help="the folder of every result")
    checkpoint_args(p, lora=False)
    sampling_args(p, batch_size=8)
    p.add_argument(
        "--prompts-per-tag", type=positive_int, default=8, help="GenEval prompts per tag"
    )
    p.add_argument("--dpg-prompts", type=positive_int, default=24, help="DPG-Bench prompts")
    p.add_argument(
        "--questions", type=positive_int, default=60, help="MMBench questions and MME images"
    )
    p.add_argument("--answer-batch-size", type=positive_int, default=32, help="questions answered together")
    p.add_argument("--max-new-tokens", type=positive_int, default=8, help="longest answer, in tokens")
    p.add_argument(
        "--data-seed", type=non_negative_int, default=1, help="seed of the held-out shapes sets"
    )
    p.set_defaults(fn=shapes)
    return ap


# inputs that must exist, by argument: (how the message names it, a file or a folder)
_INPUTS = {
    "metadata": ("--metadata", "file"),
    "tsv": ("--tsv", "file"),
    "csv": ("--csv", "file"),
    "pred": ("--pred", "file"),
    "results": ("RESULTS", "file"),
    "prompts": ("--prompts", "folder"),
    "imagedir": ("IMAGEDIR", "folder"),
    "ckpt": ("--ckpt", "folder"),
}


def _geneval_options(ap: argparse.ArgumentParser, pairs: list[str]) -> dict:
    """``--options KEY=VALUE ...`` as ``GenEvalConfig`` keyword arguments of the right types."""
    from cheers.eval.geneval_rules import GenEvalConfig

    keys = sorted(GenEvalConfig.__dataclass_fields__)
    options = {}
    for opt in pairs:
        key, _, value = opt.partition("=")
        if key not in keys or not value:
            ap.error(f"--options {opt!r}: expected KEY=VALUE with KEY one of {keys}")
        kind = type(getattr(GenEvalConfig(), key))
        try:
            options[key] = kind(value)
        except ValueError:
            ap.error(f"--options {opt!r}: {key} takes a {kind.__name__}, got {value!r}")
    return options


def check_args(ap: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse, before any model or scorer loads, what would fail later: a missing input, half a
    judge, a bad ``--options``. (The external scorers name their own missing files.)"""
    for dest, (name, kind) in _INPUTS.items():
        path = getattr(args, dest, None)
        if path is not None and not (path.is_file() if kind == "file" else path.is_dir()):
            ap.error(f"{name} {path}: no such {kind}")
    if hasattr(args, "judge_url") and bool(args.judge_url) != bool(args.judge_model):
        ap.error("a judge needs both --judge-url and --judge-model")
    if hasattr(args, "options"):
        args.options = _geneval_options(ap, args.options or [])


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    check_args(ap, args)
    args.fn(args)
    return 0


__all__ = ["build_parser", "main"]
