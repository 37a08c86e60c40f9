"""Argument checks shared by the command lines: each bad value is refused before any model work,
with one line on stderr and exit status 2.

``OneLineParser`` is an ``argparse.ArgumentParser`` whose errors are that one line; the
``type=`` helpers below refuse counts that are not positive, numbers that are not finite or out
of range, and files that are not readable images; ``image_outputs`` applies the rule every
command that writes images follows for ``--out``.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable
from pathlib import Path

from cheers.errors import InputError

# suffixes that say "an image file" but not one we write: refused rather than taken as a folder
_OTHER_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".webp", ".gif", ".bmp", ".tif", ".tiff")


class OneLineParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors are one line on stderr (``prog: error: ...``), status 2."""

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
