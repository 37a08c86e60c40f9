"""The cheers command line: a thin shell over the Python API.

Every argument is checked before any model work; a bad one prints one line naming the problem
and exits with status 2 (no traceback). Commands that write images take --out the same way:
a folder (one <name>.png per image), or a path ending in .png for a single image.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from cheers.cli_args import (
    OneLineParser,
    check_image,
    fail,
    image_file,
    image_outputs,
    model_load_args,
    model_load_options,
    non_empty,
    non_negative_int,
    number,
    output_folder,
    positive_int,
)
from cheers.config import FLAVOURS
from cheers.errors import CheersError


def _ckpt_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ckpt", type=Path, default=None,
                   help="checkpoint folder (default: the shapes demo checkpoint made by `cheers demo`)")
    p.add_argument("--device", default="cpu")
    model_load_args(p)


def open_pipeline(args):
    """The Pipeline of ``args.ckpt`` (default: the shapes demo's) on ``args.device``; a missing
    default folder is an error that says how to make it."""
    from cheers.pipeline import Pipeline, default_checkpoint

    ckpt = args.ckpt or default_checkpoint()
    if not ckpt.is_dir():
        hint = " Run `cheers demo` first to train the shapes-world model (CPU, ~15 min)." if args.ckpt is None else ""
        raise CheersError(f"checkpoint folder not found: {ckpt}.{hint}")
    return Pipeline.from_pretrained(ckpt, device=args.device, **model_load_options(args))


def _sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--steps", type=positive_int, default=None, help="sampling steps (default: the checkpoint's)")
    p.add_argument("--cfg", type=number(0.0), default=None,
                   help="classifier-free guidance scale, >= 0 (default: the checkpoint's)")
    p.add_argument("--shift", type=number(0.0, low_open=True), default=None,
                   help="time shift a > 0 of t -> a t / (1 + (a - 1) t) (default: the checkpoint's)")
    p.add_argument("--sampler", choices=["euler", "heun"], default="euler")
    p.add_argument("--seed", type=non_negative_int, default=0)


def _fill_sampling(args, pipe) -> None:
    """Unset --steps / --cfg / --shift take the checkpoint's ``transport`` settings (the released
    model's 80 / 9.5 / 0.5, the shapes model's own), so the saved settings are the ones used."""
    args.steps, args.cfg, args.shift = pipe.sampling_settings(args.steps, args.cfg, args.shift)


def _save_png(img, path: Path, meta: dict) -> None:
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("cheers", json.dumps(meta))
    img.save(path, pnginfo=info)
    path.with_suffix(".json").write_text(json.dumps(meta, indent=2) + "\n")


def cmd_generate(args) -> None:
    from tqdm import tqdm

    prompts = list(args.prompt or [])
    if args.prompts:
        if not args.prompts.is_file():
            raise CheersError(f"prompts file not found: {args.prompts}")
        prompts += [ln.strip() for ln in args.prompts.read_text().splitlines() if ln.strip()]
    if not prompts:
        raise CheersError("give a non-empty --prompt or a --prompts file")
    jobs = [(p, k) for p in prompts for k in range(args.n)]
    paths = image_outputs(args.out, [f"{i:05d}" for i in range(len(jobs))])
    pipe = open_pipeline(args)
    _fill_sampling(args, pipe)
    if args.size is not None and args.size != pipe.image_size:
        raise CheersError(f"--size {args.size}: this checkpoint generates {pipe.image_size} px images "
                          f"(a multiple of its {pipe.cfg.tokenizer.siglip.patch_size * 2} px token grid)")
    pipe.t2i_rows(prompts)  # a prompt too long for the model is refused before any sampling
    bar = tqdm(total=len(jobs) * args.steps, desc="generate", unit="step")
    for i in range(0, len(jobs), args.batch_size):
        chunk = jobs[i:i + args.batch_size]
        seed = args.seed + i
        per_step = len(chunk)
        images = pipe.generate([p for p, _ in chunk], seed=seed, batch_size=args.batch_size,
                               steps=args.steps, cfg_scale=args.cfg, shift=args.shift, sampler=args.sampler,
                               callback=lambda _n, k=per_step: bar.update(k))
        for j, ((prompt, _), img) in enumerate(zip(chunk, images)):
            meta = {"prompt": prompt, "seed": seed + j, "steps": args.steps, "cfg": args.cfg,
                    "shift": args.shift, "sampler": args.sampler, "ckpt": str(args.ckpt or "shapes-demo")}
            _save_png(img, paths[i + j], meta)
    bar.close()
    print(f"wrote {len(jobs)} image{'s' if len(jobs) > 1 else ''} to {args.out}")


def cmd_edit(args) -> None:
    (path,) = image_outputs(args.out, [args.image.stem], protect=(args.image,))
    pipe = open_pipeline(args)
    _fill_sampling(args, pipe)
    pipe.t2i_rows([args.prompt])
    img = pipe.edit(args.image, args.prompt, strength=args.strength, seed=args.seed, steps=args.steps,
                    cfg_scale=args.cfg, shift=args.shift, sampler=args.sampler)
    _save_png(img, path, {"prompt": args.prompt, "source": str(args.image), "strength": args.strength,
                          "seed": args.seed, "steps": args.steps, "cfg": args.cfg, "shift": args.shift})
    print(f"wrote {path}")


def _decode_kwargs(args) -> dict:
    return {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature, "top_p": args.top_p,
            "seed": args.seed}


def cmd_understand(args) -> None:
    pipe = open_pipeline(args)
    pipe.i2t_row(args.question, len(args.image))
    for piece in pipe.stream(args.image, args.question, **_decode_kwargs(args)):
        print(piece, end="", flush=True)
    print()


def cmd_chat(args) -> None:
    pipe = open_pipeline(args)
    images = list(args.image or [])
    print("cheers chat: type a question; `/image PATH` adds an image, `/reset` clears, `/quit` ends.")
    history: list = []
    while True:
        try:
            line = input("> ").strip()
        except EOFError:
            break
        if not line:
            continue
        if line in ("/quit", "/exit"):
            break
        if line == "/reset":
            images, history = [], []
            continue
        if line.startswith("/image "):
            try:
                images.append(check_image(line.split(" ", 1)[1].strip()))
            except CheersError as e:
                print(f"error: {e}")
                continue
            history = []  # a new image starts a new conversation about the images
            continue
        try:
            answer = ""
            for piece in pipe.stream(images, line, history=history, **_decode_kwargs(args)):
                answer += piece
                print(piece, end="", flush=True)
            print()
            history.append((line, answer))
        except CheersError as e:
            print(f"error: {e}")


def cmd_convert(args) -> None:
    from cheers.checkpoint import convert

    convert(args.src, args.dst, to=args.to)
    print(f"wrote {args.dst} ({args.to} layout)")


def cmd_init(args) -> None:
    from cheers.checkpoint import save_pretrained
    from cheers.compose import compose

    model = compose(args.llm, args.siglip, args.vae, strict=not args.no_strict)
    save_pretrained(model, args.out)
    if (args.llm / "tokenizer.json").is_file():
        import shutil

        for name in ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt"):
            if (args.llm / name).is_file():
                shutil.copy(args.llm / name, args.out / name)
    n = sum(p.numel() for p in model.parameters())
    print(f"wrote {args.out}: {n / 1e6:.1f}M parameters")


def cmd_info(args) -> None:
    import torch

    from cheers.config import flavour
    from cheers.model import CheersModel

    cfg = flavour(args.flavour)
    with torch.device("meta"):
        model = CheersModel(cfg)
    for name, child in [("tokenizer." + n, m) for n, m in model.tokenizer.named_children()] + [
            ("llm", model.llm)] + [("head." + n, m) for n, m in model.head.named_children()]:
        print(f"{name:28s} {sum(p.numel() for p in child.parameters()) / 1e6:10.2f}M")
    print(f"{'total (unique)':28s} {sum(p.numel() for p in model.parameters()) / 1e6:10.2f}M")
    print(f"LLM tokens per {cfg.tokenizer.image_size} px image: {cfg.tokens_per_image}")


def _forward(target: str, argv: list[str]) -> None:
    """Run ``module:function(argv)``; a non-zero return value becomes the exit status."""
    import importlib

    module, _, fn = target.partition(":")
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name and module.startswith(e.name):
            raise CheersError(f"this command is not available in this version ({module} is missing)") from e
        raise
    rc = getattr(mod, fn or "main")(argv)
    if rc:
        sys.exit(rc)


OUT_HELP = "a folder (one <name>.png per image) or a path ending in .png for a single image"


def build_parser() -> argparse.ArgumentParser:
    ap = OneLineParser(prog="cheers", description=__doc__,
                       formatter_class=lambda prog: argparse.RawDescriptionHelpFormatter(prog, max_help_position=26))
    sub = ap.add_subparsers(dest="cmd", required=True, metavar="COMMAND")

    p = sub.add_parser("generate", help="generate images from text prompts")
    _ckpt_arg(p)
    p.add_argument("--prompt", action="append", type=non_empty, help="a prompt (repeatable)")
    p.add_argument("--prompts", type=Path, help="a file with one prompt per line")
    p.add_argument("--n", type=positive_int, default=1, help="images per prompt")
    p.add_argument("--size", type=positive_int, default=None, help="image size (must match the checkpoint)")
    p.add_argument("--batch-size", type=positive_int, default=4)
    p.add_argument("--out", type=Path, default=Path("outputs/generate"), help=OUT_HELP + " (files 00000.png, ...)")
    _sampling_args(p)
    p.set_defaults(fn=cmd_generate)

    p = sub.add_parser("edit", help="edit an image following a prompt")
    _ckpt_arg(p)
    p.add_argument("--image", type=image_file, required=True)
    p.add_argument("--prompt", type=non_empty, required=True)
    p.add_argument("--strength", type=number(0.0, 1.0, low_open=True), default=0.9,
                   help="1 - start time, in (0, 1] (paper: start at t = 0.1)")
    p.add_argument("--out", type=Path, default=Path("outputs/edit"), help=OUT_HELP + " (named after --image)")
    _sampling_args(p)
    p.set_defaults(fn=cmd_edit)

    for name, fn in (("understand", cmd_understand), ("chat", cmd_chat)):
        p = sub.add_parser(name, help="answer a question about images" if name == "understand"
                           else "chat about images, interactively")
        _ckpt_arg(p)
        p.add_argument("--image", type=image_file, action="append", required=name == "understand")
        if name == "understand":
            p.add_argument("--question", type=non_empty, required=True)
        p.add_argument("--max-new-tokens", type=positive_int, default=128)
        p.add_argument("--temperature", type=number(0.0), default=0.0, help=">= 0 (0: greedy)")
        p.add_argument("--top-p", type=number(0.0, 1.0, low_open=True), default=1.0, help="in (0, 1]")
        p.add_argument("--seed", type=non_negative_int, default=0)
        p.set_defaults(fn=fn)

    p = sub.add_parser("convert", help="rewrite a checkpoint in the official or our layout")
    p.add_argument("src", type=Path)
    p.add_argument("dst", type=Path)
    p.add_argument("--to", choices=["official", "cheers"], required=True)
    p.set_defaults(fn=cmd_convert)

    p = sub.add_parser("init", help="compose a starting point from pretrained parts")
    p.add_argument("--llm", type=Path, required=True)
    p.add_argument("--siglip", type=Path, required=True)
    p.add_argument("--vae", type=Path, required=True)
    p.add_argument("--out", type=output_folder, default=Path("outputs/cheers-init"))
    p.add_argument("--no-strict", action="store_true", help="load what fits instead of failing")
    p.set_defaults(fn=cmd_init)

    p = sub.add_parser("info", help="parameter count of a flavour, part by part")
    p.add_argument("--flavour", default="cheers-1.5b", choices=sorted(FLAVOURS))
    p.set_defaults(fn=cmd_info)

    # commands with parsers of their own: `cheers NAME --help` shows their arguments
    for name, module, summary in (
            ("demo", "cheers.shapes.demo:main", "score the shipped shapes model, fine-tune it, score again"),
            ("debug-checkpoint", "cheers.debug_checkpoint:main", "write a random debug-flavour checkpoint"),
            ("eval", "cheers.eval.cli:main", "run GenEval, DPG-Bench, MMBench or MME"),
            ("quantize", "cheers.quantize:main", "quantize a checkpoint's LLM to 2 bits"),
            ("train", "cheers.train.__main__:main", "train from a YAML recipe with dotted overrides"),
            ("export", "cheers.train.__main__:export_main", "export a training checkpoint as a model folder"),
            ("data", "cheers.data_cli:main", "pack or check training data written as JSONL + image files"),
            ("serve", "cheers.serve.cli:main", "serve a checkpoint over HTTP")):
        p = sub.add_parser(name, help=summary, add_help=False)
        p.set_defaults(fn=None, module=module)
    return ap


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = build_parser()
    args, rest = ap.parse_known_args(argv)
    try:
        if args.fn is None:
            _forward(args.module, rest)
        else:
            if rest:
                ap.error(f"unrecognised arguments: {' '.join(rest)}")
            args.fn(args)
    except CheersError as e:
        fail(f"cheers {args.cmd}", str(e))
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
