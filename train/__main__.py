"""``python -m cheers.train --config X.yaml [dotted.key=value ...]`` (also under torchrun).

``main(argv)`` is what ``cheers train ...`` calls; ``export_main(argv)`` is ``cheers export``.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

from cheers.cli_args import OneLineParser
from cheers.errors import CheersError


def _setup_logging() -> None:
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format=f"%(asctime)s [rank{rank}] %(name)s %(levelname)s: %(message)s",
    )


def main(argv: list[str] | None = None) -> int:
    """Train (or resume) from a YAML config and dotted overrides; returns the exit code."""
    parser = OneLineParser(
        prog="cheers train",
        description="Train Cheers. Launch with torchrun --nproc_per_node=N for several processes.",
    )
    parser.add_argument("--config", help="YAML recipe: a path, or the name of a shipped one "
                        "(debug, shapes, lcqat_shapes, cheers-1.5b-align, ...); defaults apply without one")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.lr=3e-4")
    args = parser.parse_args(argv)
    from .config import load_run_config

    try:  # the recipe and the overrides are checked before any model or data work
        cfg = load_run_config(args.config, args.overrides)
    except CheersError as e:
        parser.error(str(e))
    _setup_logging()
    from .trainer import train

    try:
        result = train(cfg)
    except CheersError as e:
        logging.getLogger("cheers.train").error("%s: %s", type(e).__name__, e)
        return 2
    logging.getLogger("cheers.train").info("done at step %d in %s", result.step, result.out_dir)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and __name__ == "__main__":
        # everything is written and the group is gone; skip interpreter finalisation, where
        # gloo's worker threads have been seen to abort (rarely) after a clean run
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    return 0


def export_main(argv: list[str] | None = None) -> int:
    """Write a checkpoint as a plain folder: config.json + model.safetensors."""
    parser = OneLineParser(prog="cheers export", description=export_main.__doc__)
    parser.add_argument("checkpoint", help="a step_XXXXXXX folder, or a run folder (its latest)")
    parser.add_argument("out", help="folder to write")
    parser.add_argument("--ema", action="store_true", help="export the EMA weights")
    parser.add_argument("--merge", action="store_true",
                        help="a LoRA run: fold the adapters into the base and write a plain checkpoint "
                             "(default: the adapter folder that --lora reads)")
    args = parser.parse_args(argv)
    if not Path(args.checkpoint).is_dir():
        parser.error(f"checkpoint folder not found: {args.checkpoint}")
    _setup_logging()
    from .checkpoint import export

    try:
        export(args.checkpoint, args.out, ema=args.ema, merge=args.merge)
    except CheersError as e:
        logging.getLogger("cheers.train").error("%s: %s", type(e).__name__, e)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
