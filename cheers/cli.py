"""The cheers command line: a thin shell over the Python API.

Every argument is checked before any model work; a bad one prints one line naming the problem
and exits with status 2 (no traceback). Commands that write images take --out the same way:
a folder (one <name>.png per image), or a path ending in .png for a single image.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from cheers.cli_args import (
    OUT_HELP,
    OneLineParser,
    check_image,
    checkpoint_args,
    fail,
    image_file,
    image_meta,
    image_outputs,
    non_empty,
    non_negative_int,
    number,
    open_pipeline,
    output_folder,
    positive_int,
    sampling_args,
    save_png,
    strength_arg,
)
from cheers.config import ANSWER_TOKENS, FLAVOURS
from cheers.errors import CheersError


def cmd_generate(args) -> None:
    from tqdm import tqdm

    prompts = list(args.prompt or [])
    if args.prompts:
        if not args.prompts.is_file():
            raise CheersError(f"prompts file not found: {args.prompts}")
        prompts += [ln.strip() for ln in args.prompts.read_text().splitlines() if ln.strip()]
    if not prompts:
        raise CheersError("give a non-empty --prompt or a --prompts file")
    jobs = [p for p in prompts for _ in range(args.n)]
    paths = image_outputs(args.out, [f"{i:05d}" for i in range(len(jobs))])
    pipe = open_pipeline(args)
    if args.size is not None and args.size != pipe.image_size:
        raise CheersError(f"--size {args.size}: this checkpoint generates {pipe.image_size} px images "
                          f"(a multiple of its {pipe.cfg.tokenizer.siglip.patch_size * 2} px token grid)")
    steps, cfg_scale, shift = pipe.sampling_settings(args.steps, args.cfg_scale, args.shift)
    batches = -(-len(jobs) // args.batch_size)
    bar = tqdm(total=batches * steps, desc=f"generate ({batches} batch{'es' if batches > 1 else ''})", unit="step")
    images = pipe.generate(jobs, seed=args.seed, batch_size=args.batch_size, steps=steps, cfg_scale=cfg_scale,
                           shift=shift, sampler=args.sampler, callback=lambda _n: bar.update(1))
    bar.close()
    for i, (prompt, img, path) in enumerate(zip(jobs, images, paths, strict=True)):
        save_png(img, path, image_meta(prompt=prompt, seed=args.seed + i, steps=steps, cfg_scale=cfg_scale,
                                       shift=shift, sampler=args.sampler, ckpt=str(args.ckpt or "shapes-demo")))
    print(f"wrote {len(jobs)} image{'s' if len(jobs) > 1 else ''} to {args.out}")


def cmd_edit(args) -> None:
    (path,) = image_outputs(args.out, [args.image.stem], protect=(args.image,))
    pipe = open_pipeline(args)
    steps, cfg_scale, shift = pipe.sampling_settings(args.steps, args.cfg_scale, args.shift)
    img = pipe.edit(args.image, args.prompt, strength=args.strength, seed=args.seed, steps=steps,
                    cfg_scale=cfg_scale, shift=shift, sampler=args.sampler)
    save_png(img, path, image_meta(prompt=args.prompt, seed=args.seed, steps=steps, cfg_scale=cfg_scale, shift=shift,
                                   sampler=args.sampler, ckpt=str(args.ckpt or "shapes-demo"),
                                   source=str(args.image), strength=args.strength))
    print(f"wrote {path}")


def _decode_kwargs(args) -> dict:
    return {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature, "top_p": args.top_p,
            "seed": args.seed}


def cmd_understand(args) -> None:
    pipe = open_pipeline(args)
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
    from cheers.text_tokenizer import copy_tokenizer_files

    model = compose(args.llm, args.siglip, args.vae, strict=not args.no_strict)
    save_pretrained(model, args.out)
    copy_tokenizer_files(args.llm, args.out)
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


def build_parser() -> argparse.ArgumentParser:
    ap = OneLineParser(prog="cheers", description=__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True, metavar="COMMAND")

    p = sub.add_parser("generate", help="generate images from text prompts")
    checkpoint_args(p)
    p.add_argument("--prompt", action="append", type=non_empty, help="a prompt (repeatable)")
    p.add_argument("--prompts", type=Path, help="a file with one prompt per line")
    p.add_argument("--n", type=positive_int, default=1, help="images per prompt")
    p.add_argument("--size", type=positive_int, default=None,
                   help="image size in pixels, checked against the checkpoint's (default: the checkpoint's)")
    p.add_argument("--out", type=Path, default=Path("outputs/generate"), help=OUT_HELP + " (files 00000.png, ...)")
    sampling_args(p, batch_size=4)
    p.set_defaults(fn=cmd_generate)

    p = sub.add_parser("edit", help="edit an image following a prompt")
    checkpoint_args(p)
    p.add_argument("--image", type=image_file, required=True, help="the image to edit")
    p.add_argument("--prompt", type=non_empty, required=True, help="what the edited image shows")
    strength_arg(p)
    p.add_argument("--out", type=Path, default=Path("outputs/edit"), help=OUT_HELP + " (named after --image)")
    sampling_args(p)
    p.set_defaults(fn=cmd_edit)

    for name, fn in (("understand", cmd_understand), ("chat", cmd_chat)):
        p = sub.add_parser(name, help="answer a question about images" if name == "understand"
                           else "chat about images, interactively")
        checkpoint_args(p)
        p.add_argument("--image", type=image_file, action="append", required=name == "understand",
                       help="an image the question is about (repeatable)")
        if name == "understand":
            p.add_argument("--question", type=non_empty, required=True, help="the question")
        p.add_argument("--max-new-tokens", type=positive_int, default=ANSWER_TOKENS, help="longest answer, in tokens")
        p.add_argument("--temperature", type=number(0.0), default=0.0, help="sampling temperature, >= 0 (0: greedy)")
        p.add_argument("--top-p", type=number(0.0, 1.0, low_open=True), default=1.0,
                       help="nucleus sampling: the share of probability sampled from, in (0, 1]")
        p.add_argument("--seed", type=non_negative_int, default=0, help="seed of the token sampling")
        p.set_defaults(fn=fn)

    p = sub.add_parser("convert", help="rewrite a checkpoint in the official or our layout")
    p.add_argument("src", type=Path, help="the checkpoint folder to read")
    p.add_argument("dst", type=Path, help="the folder to write")
    p.add_argument("--to", choices=["official", "cheers"], required=True,
                   help="the layout to write: the released model's (official) or this package's (cheers)")
    p.set_defaults(fn=cmd_convert)

    p = sub.add_parser("init", help="compose a starting point from pretrained parts")
    p.add_argument("--llm", type=Path, required=True, help="a Hugging Face Qwen2 folder (weights and tokenizer)")
    p.add_argument("--siglip", type=Path, required=True, help="a SigLIP2 vision folder")
    p.add_argument("--vae", type=Path, required=True, help="a diffusers VAE folder (or a model folder with a vae/ subfolder)")
    p.add_argument("--out", type=output_folder, default=Path("outputs/cheers-init"), help="the folder to write")
    p.add_argument("--no-strict", action="store_true", help="load what fits instead of failing")
    p.set_defaults(fn=cmd_init)

    p = sub.add_parser("info", help="parameter count of a flavour, part by part")
    p.add_argument("--flavour", default="cheers-1.5b", choices=sorted(FLAVOURS), help="the model flavour")
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
        sys.stdout.flush()  # a closed pipe shows here, inside the handler, not at interpreter exit
    except CheersError as e:
        fail(f"cheers {args.cmd}", str(e))
    except KeyboardInterrupt:
        sys.exit(130)
    except BrokenPipeError:
        # the reader went away (`cheers info | head -1`): what is left to print goes nowhere
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)


if __name__ == "__main__":
    main()
