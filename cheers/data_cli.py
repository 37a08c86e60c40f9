"""``cheers data``: write and check training data in the JSONL format of ``cheers.data_format``.

    cheers data pack --jsonl FILE --out DIR [--shard-size N] [--workers N]
    cheers data check DIR|FILE [--flavour NAME --tokenizer DIR | --config RUN.yaml]

``main(argv)`` returns the exit status: 0, or 1 when ``check`` found a problem; bad arguments
print one line and exit with status 2 before any work.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from cheers.cli_args import OneLineParser, fail, non_negative_int, output_folder, positive_int
from cheers.config import FLAVOURS
from cheers.data_format import SCHEMA
from cheers.errors import CheersError


def _measure_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("token lengths against max_seq_len (optional)")
    g.add_argument("--config", help="a run config (YAML path or shipped name): its model and "
                   "data.text_tokenizer_dir (and data.min_image_side unless --min-side is given)")
    g.add_argument("--flavour", choices=sorted(FLAVOURS), help="a model flavour instead of --config")
    g.add_argument("--tokenizer", type=Path, help="a folder with tokenizer.json (overrides the config's)")
    p.add_argument("--min-side", type=non_negative_int, default=None,
                   help="images whose short side is below this many pixels are refused (default 32)")
    p.add_argument("--max-issues", type=positive_int, default=20, help="issues printed per kind (default 20)")


def _meter_and_min_side(args):
    """The ``LengthMeter`` the arguments ask for (or None) and the minimum image side."""
    from cheers.data_format import LengthMeter

    model, tokenizer_dir, min_side = None, args.tokenizer, args.min_side
    if args.config and args.flavour:
        raise CheersError("give --config or --flavour, not both")
    if args.config:
        from cheers.train.config import load_run_config

        run = load_run_config(args.config)
        model = run.model
        tokenizer_dir = tokenizer_dir or (Path(run.data.text_tokenizer_dir) if run.data.text_tokenizer_dir else None)
        min_side = run.data.min_image_side if min_side is None else min_side
    elif args.flavour:
        from cheers.config import flavour

        model = flavour(args.flavour)
    min_side = 32 if min_side is None else min_side
    if model is None and tokenizer_dir is None:
        return None, min_side
    if model is None:
        raise CheersError("--tokenizer needs a model config for max_seq_len and the image tokens: add --flavour or --config")
    if tokenizer_dir is None:
        raise CheersError("token lengths need a text tokenizer: add --tokenizer DIR"
                          + (" or set data.text_tokenizer_dir in the config" if args.config else ""))
    from cheers.text_tokenizer import TextTokenizer

    return LengthMeter(model, TextTokenizer.from_dir(tokenizer_dir)), min_side


def cmd_pack(args) -> int:
    from tqdm import tqdm

    from cheers.data_format import pack

    if not args.jsonl.is_file():
        raise CheersError(f"--jsonl {args.jsonl}: no such file")
    meter, min_side = _meter_and_min_side(args)
    bars: dict[str, tqdm] = {}

    def progress(stage: str, n: int, total: int) -> None:
        if stage not in bars:
            for bar in bars.values():
                bar.close()
            bars[stage] = tqdm(total=total, desc=stage, unit=" lines" if stage == "check" else " samples")
        bars[stage].update(n)

    try:
        scan = pack(args.jsonl, args.out, shard_size=args.shard_size, workers=args.workers, min_side=min_side,
                    meter=meter, progress=progress)
    finally:
        for bar in bars.values():
            bar.close()
    print(scan.report(args.max_issues))
    from cheers.data_format import shard_paths, shard_pattern

    n = len(shard_paths(args.out)[0])
    print(f"wrote {len(scan.samples)} samples in {n} shard{'s' if n > 1 else ''} to {args.out} "
          f"(its manifest.json lists every skipped line)")
    print(f"train on them with: data.shards=\"['{shard_pattern(args.out, n)}']\"")
    return 0


def cmd_check(args) -> int:
    from tqdm import tqdm

    from cheers.data_format import scan_jsonl, scan_shards

    path: Path = args.path
    if not path.exists():
        raise CheersError(f"{path}: no such file or folder")
    meter, min_side = _meter_and_min_side(args)
    is_jsonl = path.is_file() and path.suffix != ".tar"
    lines = sum(1 for raw in path.open("rb") if raw.strip()) if is_jsonl else None
    with tqdm(total=lines, desc="check", unit=" records") as bar:
        if is_jsonl:
            scan = scan_jsonl(path, min_side=min_side, meter=meter, workers=args.workers, progress=bar.update)
        else:
            scan = scan_shards(path, min_side=min_side, meter=meter, progress=bar.update)
    print(scan.report(args.max_issues))
    return 1 if scan.problems else 0


def build_parser() -> argparse.ArgumentParser:
    ap = OneLineParser(prog="cheers data",
                       description="Write and check training data: JSONL lines pointing at image files.\n\n"
                                   + SCHEMA,
                       epilog="The trainer reads such a JSONL directly too: data.jsonl=\"['data.jsonl']\".")
    sub = ap.add_subparsers(dest="cmd", required=True, metavar="COMMAND")

    p = sub.add_parser("pack", help="check a JSONL and write its usable lines as WebDataset shards",
                       description="Check every line (as `cheers data check` does) and write the usable ones, "
                                   "in line order, as data-NNNNNN.tar shards + manifest.json in a new folder. "
                                   "Bad lines are reported by number and left out.")
    p.add_argument("--jsonl", type=Path, required=True, help="the JSONL file")
    p.add_argument("--out", type=output_folder, required=True, help="a new (or empty) folder for the shards")
    p.add_argument("--shard-size", type=positive_int, default=1000, help="samples per shard (default 1000)")
    p.add_argument("--workers", type=positive_int, default=4, help="threads that open images and write shards")
    _measure_args(p)
    p.set_defaults(fn=cmd_pack)

    p = sub.add_parser("check", help="check a JSONL, a shard folder or one .tar without training",
                       description="Count samples per task; name every line or record with a missing field, "
                                   "an unreadable or too small image, or too many tokens for max_seq_len; "
                                   "token-length percentiles with --flavour/--config and a tokenizer. "
                                   "Exit status 1 when a problem was found.")
    p.add_argument("path", type=Path, help="a .jsonl file, a folder of shards (manifest.json or *.tar), or a .tar")
    p.add_argument("--workers", type=positive_int, default=4, help="threads that open a JSONL's images")
    _measure_args(p)
    p.set_defaults(fn=cmd_check)
    return ap


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    try:
        return args.fn(args)
    except CheersError as e:
        fail(f"cheers data {args.cmd}", str(e))
    return 2
