"""What a shapes checkpoint predicts from noised held-out scenes: one row per scene, the scene,
then for each t the noisy input xt and the clean image the model predicts from it (decoded),
conditional on the scene's caption. Prints the latent MSE of the prediction at each t.

    python benchmarks/shapes_denoise_grid.py --ckpt outputs/shapes-demo/checkpoint --out outputs/denoise.png

Shows at which noise level the model finds each property of the scene (position, colour,
shape): generation from pure noise can only be as good as the predictions at the noisy end.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from cheers.flow_head import transport
from cheers.pipeline import Pipeline, to_pil
from cheers.shapes.autoencoder import scene_pixels
from cheers.shapes.scenes import sample_scene
from cheers.shapes.texts import caption


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True, help="PNG to write")
    ap.add_argument("--times", type=float, nargs="+", default=[0.1, 0.2, 0.35, 0.5, 0.7, 0.9])
    ap.add_argument("--kinds", nargs="+", default=["single"] * 4 + ["two"] * 2)
    ap.add_argument("--seed", type=int, default=7)
    args = ap.parse_args(argv)
    pipe = Pipeline.from_pretrained(args.ckpt)
    model, size = pipe.model.eval(), pipe.image_size
    rng = np.random.default_rng(args.seed)
    scenes = [sample_scene(rng, size, kind) for kind in args.kinds]
    captions = [caption(s, rng) for s in scenes]
    pixels = scene_pixels(scenes)  # [B, 3, S, S]
    # the x1 head's sampler divides by max(1 - t, t_min); a velocity head by 1 - t
    tc = pipe.cfg.transport
    t_min = tc.x1_loss_t_min if tc.prediction == "x1" else 0.0
    cell = size + 2
    sheet = Image.new("RGB", (cell * (1 + 2 * len(args.times)), cell * len(scenes)), "white")
    for i, p in enumerate(pixels):
        sheet.paste(to_pil(p), (0, cell * i))
    with torch.no_grad():
        x1 = model.tokenizer.encode(pixels)  # [B, C, G, G]
        prefix = pipe.engine.prefill([pipe.text_tokenizer.t2i_prompt(c) for c in captions], [[] for _ in scenes])
        noise = torch.randn(x1.shape, generator=torch.Generator().manual_seed(args.seed))
        for j, t in enumerate(args.times):
            xt = transport.interpolate(x1, noise, torch.full((len(scenes),), t))
            v = pipe.engine.image_velocity(prefix, xt, t, cfg_scale=1.0)  # conditional only
            x1_pred = transport.x1_from_velocity(v, xt, torch.full((len(scenes),), t), t_min=t_min)
            for k, lat in enumerate((xt, x1_pred)):
                for i, img in enumerate(model.tokenizer.decode(lat).clamp(0, 1)):
                    sheet.paste(to_pil(img), (cell * (1 + 2 * j + k), cell * i))
            print(f"t {t:.2f}: latent MSE of the predicted clean image {float(((x1_pred - x1) ** 2).mean()):.4f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(args.out)
    for i, c in enumerate(captions):
        print(f"row {i}: {c}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
