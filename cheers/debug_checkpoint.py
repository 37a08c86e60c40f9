"""A randomly initialised debug-flavour checkpoint with a byte-level BPE tokenizer.

It exercises every command (generate, edit, understand, chat, convert) in seconds with no
download; its outputs are noise. ``cheers demo`` trains a real model on the shapes world.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from cheers.cli_args import OneLineParser, non_negative_int, output_folder
from cheers.config import flavour
from cheers.text_tokenizer import TextTokenizer, train_bpe

CORPUS = [
    "a photo of a red circle", "a blue square above a green triangle", "two yellow stars",
    "What colour is the circle?", "How many squares are there?", "The answer is B.",
    "You are a helpful assistant.", "system", "user", "assistant", "\n",
]


def make_debug_checkpoint(out: str | Path, seed: int = 0):
    """Write ``config.json``, ``model.safetensors`` and ``tokenizer.json`` of a random debug model."""
    from cheers.checkpoint import save_pretrained
    from cheers.model import CheersModel

    tok: TextTokenizer = train_bpe(CORPUS * 4, vocab_size=320)
    base = flavour("debug")
    cfg = dataclasses.replace(base, llm=dataclasses.replace(base.llm, vocab_size=tok.vocab_size),
                              tokens=tok.special)
    torch.manual_seed(seed)
    model = CheersModel(cfg)
    model.init_weights()
    save_pretrained(model, out)
    tok.save(out)
    return model, tok


def main(argv: list[str] | None = None) -> None:
    ap = OneLineParser(prog="cheers debug-checkpoint", description=__doc__)
    ap.add_argument("--out", type=output_folder, default=Path("outputs/debug-checkpoint"), help="the folder to write")
    ap.add_argument("--seed", type=non_negative_int, default=0, help="seed of the random weights")
    args = ap.parse_args(argv)
    make_debug_checkpoint(args.out, args.seed)
    print(f"wrote a random debug-flavour checkpoint to {args.out}")
