"""The argument layer every command line shares (``cheers``, ``cheers eval``, ``cheers serve``,
``cheers quantize``, ...): each bad value is refused before any model work, with one line on
stderr and exit status 2.

``OneLineParser`` is an ``argparse.ArgumentParser`` whose errors are that one line and whose
help shows each option's default; the ``type=`` helpers refuse counts that are not positive,
numbers that are not finite or out of range, and files that are not readable images. The
checkpoint (``checkpoint_args`` / ``open_pipeline``), sampling (``sampling_args`` /
``sampling_options``) and output (``image_outputs``, ``save_png``) arguments are written here
once.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import sys
from collections.abc import Callable
from pathlib import Path

from cheers.config import EDIT_STRENGTH, SAMPLERS
from cheers.errors import CheckpointError, InputError

# what a command says when it defaults to the demo's checkpoint and finds none
NO_CHECKPOINT_HINT = ("Run `cheers demo` (CPU, a few minutes) to fine-tune the shipped shapes model and cache it "
                      "there, or make a random tiny one with `cheers debug-checkpoint` and pass it with --ckpt.")

# suffixes that say "an image file" but not one we write: refused rather than taken as a folder
_OTHER_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".webp", ".gif", ".bmp", ".tif", ".tiff")


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps descriptions as written and ends an option's help with ``(default: ...)``, unless
    the help already speaks of its default or there is none to show (None, False, empty)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if (not action.option_strings or "default" in text.lower() or default is None or default is False
                or default is argparse.SUPPRESS or (isinstance(default, (list, tuple)) and not default)):
            return text
        return f"{text} (default: %(default)s)"


class OneLineParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors are one line on stderr (``prog: error: ...``), status 2,
    and whose help shows every option's default (``HelpFormatter``, also for its subparsers)."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {' '.join(message.split())}\n")


def fail(prog: str, message: str) -> None:
    """Print ``prog: error: message`` as one line on stderr and exit with status 2."""
    sys.stderr.write(f"{prog}: error: {' '.join(str(message).split())}\n")
    sys.exit(2)


def integer(minimum: int) -> Callable[[str], int]:
    """A ``type=`` for an integer of at least ``minimum``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{value} must be >= {minimum}")
        return value

    parse.__name__ = "integer"  # argparse names the type in some messages
    return parse


positive_int = integer(1)  # counts
non_negative_int = integer(0)  # seeds, thread counts (0: the default)


def number(low: float, high: float = math.inf, *, low_open: bool = False,
           high_open: bool = False) -> Callable[[str], float]:
    """A ``type=`` for a finite float from ``low`` to ``high`` (ends closed unless ``low_open``
    / ``high_open``; ``high`` may be infinite, ``low`` is finite)."""
    if math.isinf(high):
        span = f"must be {'>' if low_open else '>='} {low:g}"
    else:
        span = f"must lie in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"{text} is not a finite number")
        if value < low or value > high or (low_open and value == low) or (high_open and value == high):
            raise argparse.ArgumentTypeError(f"{value:g}: {span}")
        return value

    parse.__name__ = "number"  # argparse names the type in some messages
    return parse


def check_image(path: str | Path) -> Path:
    """``path`` if it is a file PIL can open and verify; else ``InputError`` naming it."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such image file")
    try:
        with Image.open(path) as im:
            im.verify()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise InputError(f"{path}: not a readable image ({e})") from None
    return path


def image_file(text: str) -> Path:
    """A ``type=`` for an input image: it must open and verify."""
    try:
        return check_image(text)
    except InputError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def non_empty(text: str) -> str:
    if not text.strip():
        raise argparse.ArgumentTypeError("must not be empty")
    return text


def image_outputs(out: Path, names: list[str], *, protect: tuple[Path, ...] = ()) -> list[Path]:
    """Where a command writes its images, by the ``--out`` rule every image command follows:
    a path ending in ``.png`` is the one image's file; anything else is a folder that receives
    ``<name>.png`` per image. The folder (or the file's folder) is created here, before any
    model work, and a bad ``--out`` raises ``InputError``: a ``.png`` path for several images,
    another image suffix, an existing file used as a folder, or an output over a ``protect`` path.
    """
    if not names:
        raise InputError("no images to write")
    suffix = out.suffix.lower()
    if suffix == ".png":
        if len(names) != 1:
            raise InputError(f"--out {out} names one PNG file, but {len(names)} images would be written; "
                             "give a folder instead")
        if out.is_dir():
            raise InputError(f"--out {out} is a folder; a path ending in .png names a file")
        paths, folder = [out], out.parent
    elif suffix in _OTHER_IMAGE_SUFFIXES:
        raise InputError(f"--out {out}: images are written as PNG; give a folder or a path ending in .png")
    else:
        if out.exists() and not out.is_dir():
            raise InputError(f"--out {out} is a file, not a folder (a single image's path must end in .png)")
        paths, folder = [out / f"{name}.png" for name in names], out
    for p in paths:
        if any(p.resolve() == q.resolve() for q in protect):
            raise InputError(f"--out {out} would overwrite the input image {p}; give another --out")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise InputError(f"--out {out}: cannot create the folder {folder} ({e.strerror or e})") from None
    return paths


def output_folder(text: str) -> Path:
    """A ``type=`` for an output folder: anything but an existing file."""
    path = Path(text)
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{path} is a file, not a folder")
    return path


OUT_HELP = "a folder (one <name>.png per image) or a path ending in .png for a single image"


def image_meta(*, prompt: str, seed: int, steps: int, cfg_scale: float, shift: float, sampler: str,
               ckpt: str, **extra) -> dict:
    """What a written image carries about how it was made (``save_png``, ``png_bytes_with_meta``)."""
    return {"prompt": prompt, "seed": seed, "steps": steps, "cfg": cfg_scale, "shift": shift, "sampler": sampler,
            "ckpt": ckpt, **extra}


def _png_info(meta: dict):
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("cheers", json.dumps(meta))
    return info


def save_png(image, path: Path, meta: dict) -> None:
    """``image`` as ``path`` (a PNG carrying ``meta`` as JSON in a ``cheers`` text chunk) and
    ``meta`` beside it as ``<name>.json``."""
    image.save(path, pnginfo=_png_info(meta))
    path.with_suffix(".json").write_text(json.dumps(meta, indent=2) + "\n")


def png_bytes_with_meta(image, meta: dict) -> bytes:
    """The PNG ``save_png`` writes, as bytes (what the server sends)."""
    buf = io.BytesIO()
    image.save(buf, format="PNG", pnginfo=_png_info(meta))
    return buf.getvalue()


def checkpoint_args(p: argparse.ArgumentParser, *, load: bool = True, lora: bool = True,
                    what: str = "checkpoint folder") -> None:
    """``--ckpt`` and ``--device``, and with ``load`` how the pipeline loads (``model_load_args``)."""
    p.add_argument("--ckpt", type=Path, default=None,
                   help=f"{what} (default: the shapes model `cheers demo` caches in $CHEERS_HOME, ~/.cache/cheers)")
    p.add_argument("--device", default="cpu", help="where the model runs: cpu, cuda, cuda:N")
    if load:
        model_load_args(p, lora=lora)


def checkpoint_path(args: argparse.Namespace) -> Path:
    """``--ckpt``, or the demo's cached checkpoint; a missing folder is an error that, for the
    default, says how to make one."""
    from cheers.pipeline import default_checkpoint

    ckpt = args.ckpt or default_checkpoint()
    if not ckpt.is_dir():
        hint = f" {NO_CHECKPOINT_HINT}" if args.ckpt is None else ""
        raise CheckpointError(f"checkpoint folder not found: {ckpt}.{hint}")
    return ckpt


def open_pipeline(args: argparse.Namespace):
    """The ``Pipeline`` of ``checkpoint_args``' flags, checked before anything loads."""
    from cheers.pipeline import Pipeline

    ckpt = checkpoint_path(args)
    return Pipeline.from_pretrained(ckpt, device=args.device, **model_load_options(args))


def sampling_args(p: argparse.ArgumentParser, *, batch_size: int | None = None) -> None:
    """``--steps``, ``--cfg``, ``--shift``, ``--sampler``, ``--seed`` (and ``--batch-size`` when
    given a default): how images are sampled. Unset steps / cfg / shift are the checkpoint's."""
    p.add_argument("--steps", type=positive_int, default=None, help="sampling steps (default: the checkpoint's)")
    p.add_argument("--cfg", dest="cfg_scale", type=number(0.0), default=None,
                   help="classifier-free guidance scale, >= 0 (default: the checkpoint's)")
    p.add_argument("--shift", type=number(0.0, low_open=True), default=None,
                   help="time shift a > 0 of t -> a t / (1 + (a - 1) t) (default: the checkpoint's)")
    p.add_argument("--sampler", choices=SAMPLERS, default=SAMPLERS[0],
                   help="ODE sampler: euler (the released model's) or heun (second order)")
    p.add_argument("--seed", type=non_negative_int, default=0, help="noise seed; the i-th image uses seed + i")
    if batch_size is not None:
        p.add_argument("--batch-size", type=positive_int, default=batch_size, help="images sampled together")


def sampling_options(args: argparse.Namespace) -> dict:
    """The ``Pipeline.generate`` / ``sample`` keywords of ``sampling_args``' flags."""
    return {"steps": args.steps, "cfg_scale": args.cfg_scale, "shift": args.shift, "sampler": args.sampler}


def strength_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--strength", type=number(0.0, 1.0, low_open=True), default=EDIT_STRENGTH,
                   help="how much of the image is regenerated, in (0, 1]: sampling starts at t = 1 - strength")


def model_load_args(p: argparse.ArgumentParser, *, lora: bool = True) -> None:
    """``--lora`` (with ``lora``), ``--weights`` and ``--offload``: how a command loads its
    checkpoint (``Pipeline.from_pretrained``)."""
    if lora:
        p.add_argument("--lora", type=Path, default=None, metavar="DIR",
                       help="a LoRA adapter folder (`cheers export` of a LoRA run), applied without merging")
    p.add_argument("--weights", choices=["int8", "fp8"], default=None,
                   help="weight-only int8 / fp8 LLM and flow-head linears (torchao); fp8 needs a GPU of "
                        "compute capability 8.9 or more")
    p.add_argument("--offload", choices=["model", "sequential"], default=None,
                   help="keep the weights in CPU memory and move them to the GPU when used: a part (model) "
                        "or a block (sequential) at a time; needs --device cuda")


def model_load_options(args: argparse.Namespace) -> dict:
    """``Pipeline.from_pretrained`` keywords of ``model_load_args``' flags, checked against this
    machine (``InputError`` names the flag) before any loading."""
    from cheers.low_memory import check_options

    check_options(args.device, args.weights, args.offload)
    options = {"weights": args.weights, "offload": args.offload}
    if getattr(args, "lora", None) is not None:
        if not args.lora.is_dir():
            raise InputError(f"--lora {args.lora}: no such folder")
        options["lora"] = args.lora
    return options
