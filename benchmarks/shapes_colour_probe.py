"""Where a shapes-ladder checkpoint takes an object's colour from: the prompt, or the noisy image.

    python benchmarks/shapes_colour_probe.py --run outputs/shapes-ladder/R0 --step 1000 [--scenes 64]

For held-out one-object scenes noised to each time t, the checkpoint predicts the clean image
twice: from a prompt that names the object's true colour, and from one that names another
colour (same shape). Inside the true object's mask the predicted colour is read as the palette
colour whose direction from the grey background is nearest; the probe reports, per t, how often
that colour is the prompt's (true prompt; wrong prompt) and how often the image's (wrong
prompt), conditionally and with the harness's guidance scale, and the tint (distance from the
background). A model that has learned the prompt follows it at small t, where the image holds
no colour yet; chance is 0.1. Writes RUN/colour_probe-STEP.json.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import shapes_ladder  # noqa: E402  (the harness beside this file)


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", type=Path, required=True, help="a shapes_ladder.py --out folder")
    ap.add_argument("--step", type=int, required=True, help="the checkpoint's step (RUN/run/step_NNNNNNN)")
    ap.add_argument("--scenes", type=int, default=64)
    ap.add_argument("--times", type=float, nargs="+", default=[0.0, 0.05, 0.1, 0.2, 0.4])
    ap.add_argument("--work", type=Path, default=Path("outputs/shapes-ladder/work"),
                    help="the harness's shards and tokenizer")
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args(argv)
    if args.scenes < 1 or not all(0.0 <= t < 1.0 for t in args.times):
        ap.error("--scenes must be >= 1 and every --times value in [0, 1)")
    if not (args.run / "ladder.json").is_file():
        ap.error(f"{args.run}: no ladder.json (not a shapes_ladder.py --out folder)")
    return args


@torch.no_grad()
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from shapes_ladder_rungs import rung_config

    from cheers.flow_head import transport
    from cheers.shapes.scenes import (
        BACKGROUND,
        COLOURS,
        PALETTE,
        object_masks,
        render,
        sample_scene,
    )
    from cheers.shapes.training import shapes_run_config
    from cheers.text_tokenizer import TextTokenizer
    from cheers.train.checkpoint import full_state_from_checkpoint

    if args.threads:
        torch.set_num_threads(args.threads)
    record = json.loads((args.run / "ladder.json").read_text())
    rung = record["rung"]
    ckpt = args.run / "run" / f"step_{args.step:07d}"
    if not ckpt.is_dir():
        raise SystemExit(f"{ckpt}: no such checkpoint")
    _, tok_dir, parts = shapes_ladder.prepare_world(args.work, 16000, rung, 0)
    cfg = shapes_run_config([f"data.text_tokenizer_dir={tok_dir}", *record["overrides"]])
    mcfg = rung_config(cfg.model, rung, record["token_px"])
    task = shapes_ladder.RungTask(rung, parts, tok_dir, record["token_px"], record.get("pixel_scale", 1.0))
    model = task.build_model(mcfg)
    model.init_weights()
    model.load_state_dict(full_state_from_checkpoint(ckpt, ema=True)[1], strict=False)
    model.eval()
    tok = TextTokenizer.from_dir(tok_dir)

    rng = np.random.default_rng(123)
    scenes = [sample_scene(rng, mcfg.tokenizer.image_size, kind="single") for _ in range(args.scenes)]
    pixels = torch.stack([torch.from_numpy(render(s)).permute(2, 0, 1).float() / 255 for s in scenes])
    masks = [torch.from_numpy(object_masks(s)[0]) for s in scenes]
    true = [s.objects[0].colour for s in scenes]
    wrong = [COLOURS[(COLOURS.index(c) + 1 + int(rng.integers(len(COLOURS) - 1))) % len(COLOURS)] for c in true]
    background = torch.tensor(BACKGROUND, dtype=torch.float32) / 255
    directions = F.normalize(torch.tensor([PALETTE[c] for c in COLOURS], dtype=torch.float32) / 255 - background, dim=-1)
    x1 = model.encode(pixels)
    n = len(scenes)
    cfg_scale = record["cfg_scale"]

    def colours_of(images: torch.Tensor) -> tuple[list[str], list[float]]:
        offsets = [img[:, m].mean(1) - background for img, m in zip(images, masks)]
        names = [COLOURS[int((directions @ F.normalize(d, dim=0)).argmax())] for d in offsets]
        return names, [float(d.norm()) for d in offsets]

    rows = []
    for t in args.times:
        x0 = torch.randn(x1.shape, generator=torch.Generator().manual_seed(7))
        tt = torch.full((n,), t)
        xt = transport.interpolate(x1, x0, tt)
        row = {"t": t}
        for name, colours in (("true", true), ("wrong", wrong)):
            meta = [{"prompt": f"a photo of a {c} {s.objects[0].shape}"} for c, s in zip(colours, scenes)]
            (_, batch), = shapes_ladder.sampling_batches(mcfg, tok, meta, 1, 2 * n)
            v = model.velocity_at(batch, torch.cat([xt, xt]), torch.cat([tt, tt]))
            for guide, scale in (("cond", 1.0), ("cfg", cfg_scale)):
                guided = v[n:] + scale * (v[:n] - v[n:])
                x1_pred = transport.x1_from_velocity(guided, xt, tt, mcfg.transport.x1_loss_t_min)
                got, tint = colours_of(model.decode(x1_pred).clamp(0, 1))
                row[f"{name}_prompt/{guide}/follows_prompt"] = float(np.mean([g == c for g, c in zip(got, colours)]))
                if name == "wrong":
                    row[f"{name}_prompt/{guide}/follows_image"] = float(np.mean([g == c for g, c in zip(got, true)]))
                row[f"{name}_prompt/{guide}/tint"] = float(np.mean(tint))
        rows.append(row)
        print(json.dumps({k: round(v, 3) for k, v in row.items()}), flush=True)
    out = args.run / f"colour_probe-{args.step}.json"
    out.write_text(json.dumps({"rung": rung, "step": args.step, "scenes": n, "cfg_scale": cfg_scale, "rows": rows},
                              indent=1) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
