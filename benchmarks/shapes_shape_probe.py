"""Where along the understanding path the shape of an object is lost: probes of one large
object's shape at each stage the model reads an image through.

    python benchmarks/shapes_shape_probe.py [--model DIR] [--train 3000] [--test 600] [--threads 1]

On single-object scenes of the world (large objects):
- *detector after the VAE*: the share of VAE round trips (the shipped VAE) whose largest
  detected object has the scene's shape, and the share with exactly one object;
- *semantic encoder*: held-out accuracy of shape classifiers trained on the shipped semantic
  encoder's patch features of the rendered image, mean-pooled (linear) and flattened (linear,
  and an MLP of 256 hidden units);
- *image tokens*, with ``--model`` (a checkpoint folder, e.g. an exported step): the same
  classifiers on the model's LLM input tokens of the clean image (t = 1, as understanding sees it);
- *pixels*: an MLP on the flattened pixels, the reference.

Chance is 0.2 (five shapes). Prints one line per probe and writes nothing.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def fit_probe(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor,
              n_classes: int, hidden: int = 0, epochs: int = 100, seed: int = 0) -> float:
    """Held-out accuracy of a linear (``hidden=0``) or one-hidden-layer classifier trained with
    Adam on standardised features."""
    torch.manual_seed(seed)
    dim = train_x.shape[1]
    probe = (nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, n_classes)) if hidden
             else nn.Linear(dim, n_classes))
    opt = torch.optim.Adam(probe.parameters(), lr=1e-3, weight_decay=1e-4)
    mean, std = train_x.mean(0), train_x.std(0) + 1e-5
    for _ in range(epochs):
        for i in range(0, len(train_x), 256):
            loss = F.cross_entropy(probe((train_x[i:i + 256] - mean) / std), train_y[i:i + 256])
            opt.zero_grad()
            loss.backward()
            opt.step()
    with torch.no_grad():
        return float((probe((test_x - mean) / std).argmax(-1) == test_y).float().mean())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--model", type=Path, default=None, help="checkpoint folder whose image tokens to probe")
    ap.add_argument("--train", type=int, default=3000, help="training scenes of each probe")
    ap.add_argument("--test", type=int, default=600, help="held-out scenes of each probe")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    ap.add_argument("--seed", type=int, default=3)
    args = ap.parse_args(argv)
    if args.train < 10 or args.test < 10:
        ap.error("--train and --test must be at least 10")
    if args.model is not None and not (args.model / "config.json").is_file():
        ap.error(f"--model {args.model}: no config.json there (give a checkpoint folder)")
    torch.set_num_threads(args.threads)

    from PIL import Image

    from cheers.config import flavour
    from cheers.eval.shapes_detector import detect
    from cheers.shapes.autoencoder import scene_pixels
    from cheers.shapes.parts import PARTS_FILE, load_parts
    from cheers.shapes.scenes import SHAPES, sample_scene
    from cheers.tokenizer.siglip import SiglipVision
    from cheers.tokenizer.vae import VAE

    cfg = flavour("shapes").tokenizer
    parts = load_parts(PARTS_FILE, cfg)
    rng = np.random.default_rng(args.seed)

    def scenes(n: int):
        drawn = [sample_scene(rng, cfg.image_size, kind="single", object_size="large") for _ in range(n)]
        return scene_pixels(drawn), torch.tensor([SHAPES.index(s.objects[0].shape) for s in drawn])

    train_px, train_y = scenes(args.train)
    test_px, test_y = scenes(args.test)

    vae = VAE(cfg.vae)
    vae.load_state_dict(parts["vae"])
    vae.eval()
    with torch.no_grad():
        round_trip = vae.decode(vae.encode(test_px)).clamp(0, 1)
    right = one = 0
    for img, want in zip(round_trip, test_y):
        found = detect(Image.fromarray((img.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)))
        right += bool(found) and max(found, key=lambda d: d["area"])["class"] == SHAPES[want]
        one += len(found) == 1
    print(f"detector after the VAE: shape {right / args.test:.3f}, one object {one / args.test:.3f}", flush=True)

    encoder = SiglipVision(cfg.siglip)
    encoder.load_state_dict(parts["siglip"])
    encoder.eval()
    with torch.no_grad():
        train_f, test_f = encoder(train_px)[0], encoder(test_px)[0]
    n = len(SHAPES)
    print(f"semantic encoder, mean-pooled, linear: {fit_probe(train_f.mean(1), train_y, test_f.mean(1), test_y, n):.3f}")
    print(f"semantic encoder, flattened, linear: "
          f"{fit_probe(train_f.flatten(1), train_y, test_f.flatten(1), test_y, n):.3f}")
    print(f"semantic encoder, flattened, MLP: "
          f"{fit_probe(train_f.flatten(1), train_y, test_f.flatten(1), test_y, n, hidden=256):.3f}", flush=True)
    if args.model is not None:
        from cheers.pipeline import Pipeline

        model = Pipeline.from_pretrained(args.model).model.eval()
        with torch.no_grad():  # t = 1: the clean latent, as understanding reads an image
            train_t = model.image_tokens(model.tokenizer.encode(train_px))[0].flatten(1)
            test_t = model.image_tokens(model.tokenizer.encode(test_px))[0].flatten(1)
        print(f"image tokens, flattened, linear: {fit_probe(train_t, train_y, test_t, test_y, n):.3f}")
        print(f"image tokens, flattened, MLP: {fit_probe(train_t, train_y, test_t, test_y, n, hidden=256):.3f}",
              flush=True)
    print(f"pixels, flattened, MLP: "
          f"{fit_probe(train_px.flatten(1), train_y, test_px.flatten(1), test_y, n, hidden=256):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
