"""A yardstick for the shapes world's GenEval figures: how far a plain text-conditioned conv
U-Net gets on the same data, latent, sampler and scorer in a fixed time on this machine.

Not the Cheers model: no LLM, no semantic encoder, no pixel decoder. The network is the
Cheers head's convolutional stage B (``flow_head/conv_stage.py``) fed the noisy latent
itself, conditioned on a pooled caption embedding (a 2-layer bidirectional text encoder,
mean over the caption's tokens) plus the time embedding, and trained on the clean-latent
(x1) loss. What it reaches bounds what the whole model can be asked to reach in the same
number of steps, and the latent options (``vae.*`` overrides) can be compared on it.

    cheers demo --out outputs/base --no-cache        # once: data-easy/ shards and tokenizer/
    python benchmarks/shapes_reference_unet.py --demo outputs/base --out outputs/ref --seconds 300 -- \
        [vae.z_channels=5 ...]

Trains its own VAE first (``--vae-seconds``), as the demo does, then the U-Net on the
text-to-image samples of ``DEMO/data-easy`` (one- and two-object scenes). Prints one JSON
line: steps, final loss, and per CFG scale the GenEval scores of held-out prompts.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from cheers.config import flavour, parse_overrides
from cheers.demo import write_grid
from cheers.eval import geneval
from cheers.flow_head.conv_stage import ConvStage
from cheers.flow_head.transport import (
    guidance_scale,
    interpolate,
    sample_ode,
    timestep_frequencies,
    velocity_from_x1,
)
from cheers.shapes.autoencoder import train_vae
from cheers.shapes.dataset import write_geneval_metadata
from cheers.text_tokenizer import TextTokenizer
from cheers.train.config import TrainConfig
from cheers.train.data import IMAGE_EXTS, _Shard, expand_shards, load_image
from cheers.train.ema import EMA
from cheers.train.optim import lr_at

TEXT_LEN = 16


def read_t2i(shard_dir: Path) -> tuple[list[str], torch.Tensor]:
    """Captions and images [N, 3, S, S] in [0, 1] of the text-to-image samples of the shards,
    grouped and decoded as the training loader does (``train/data.py``)."""
    captions, images = [], []
    for path in expand_shards([str(shard_dir / "*.tar")], what="--demo"):
        shard = _Shard(path)
        for _key, members in shard.samples:
            rec = json.loads(shard.read(members["json"]))
            if rec.get("task") == "t2i":
                captions.append(rec["text"])
                ext = next(e for e in IMAGE_EXTS if e in members)
                images.append(load_image(shard.read(members[ext]), 64))
        shard.close()
    if not images:
        raise SystemExit(f"no text-to-image samples in {shard_dir}")
    return captions, torch.stack(images)


class TextConvUNet(nn.Module):
    """``(xt [B, C, G, G], t [B], ids [B, L]) -> x1 prediction [B, C, G, G]``."""

    def __init__(self, channels: int, vocab: int, width: int = 192, freq_dim: int = 256):
        super().__init__()
        self.freq_dim = freq_dim
        self.embed = nn.Embedding(vocab, width)
        self.text_pos = nn.Parameter(torch.randn(1, TEXT_LEN, width) * 0.02)
        layer = nn.TransformerEncoderLayer(width, 6, 2 * width, 0.0, batch_first=True, norm_first=True)
        self.text = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.pool = nn.Linear(width, width)
        self.time = nn.Sequential(nn.Linear(freq_dim, width), nn.SiLU(), nn.Linear(width, width))
        self.net = ConvStage(dim_in=channels, width=width, out_dim=channels, blocks_per_level=2, cond_dim=width)
        self.net.init_weights()

    def forward(self, xt: torch.Tensor, t: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        keep = ids > 0
        keep[:, 0] = True  # the null caption (all padding) still pools one token
        words = self.text(self.embed(ids) + self.text_pos, src_key_padding_mask=~keep)  # [B, L, W]
        w = keep.to(words.dtype)[..., None]
        angles = (1000.0 * t)[:, None] * timestep_frequencies(self.freq_dim, device=t.device)[None]
        cond = self.time(torch.cat([angles.cos(), angles.sin()], -1)) + self.pool((words * w).sum(1) / w.sum(1))
        side = xt.shape[-1]
        out = self.net(xt.flatten(2).transpose(1, 2), cond, side)  # [B, G*G, C]
        return out.transpose(1, 2).unflatten(2, (side, side))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--demo", type=Path, required=True, help="a `cheers demo --out` folder (data-easy/, tokenizer/)")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--seconds", type=float, default=300.0, help="U-Net training time")
    ap.add_argument("--vae-seconds", type=float, default=150.0)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--prompts", type=int, default=16, help="held-out prompts per tag (4 images each)")
    ap.add_argument("--tags", nargs="+", default=["single_object", "colors", "two_object"])
    ap.add_argument("--cfg-scale", type=float, nargs="+", default=[1.5, 3.0])
    ap.add_argument("--cfg-start", type=float, nargs="+", default=None,
                    help="guidance only from these times on (each with every --cfg-scale; default: the "
                         "start of the shapes flavour's transport.cfg_interval)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("overrides", nargs="*", help="vae.<field>=<value> of the shapes flavour's VAE")
    args = ap.parse_args(argv)
    torch.manual_seed(args.seed)
    args.out.mkdir(parents=True, exist_ok=True)

    vae_cfg = dataclasses.replace(flavour("shapes").tokenizer.vae, **parse_overrides(args.overrides).get("vae", {}))
    vae, vae_losses = train_vae(vae_cfg, 64, seconds=args.vae_seconds, seed=args.seed)
    tok = TextTokenizer.from_dir(args.demo / "tokenizer")
    captions, pixels = read_t2i(args.demo / "data-easy")
    with torch.no_grad():
        latents = torch.cat([vae.encode(pixels[i:i + 512]) for i in range(0, len(pixels), 512)])  # [N, C, G, G]

    def tokenize(texts: list[str]) -> torch.Tensor:
        out = torch.zeros(len(texts), TEXT_LEN, dtype=torch.long)
        for i, text in enumerate(texts):
            ids = tok.encode(text)[:TEXT_LEN]
            out[i, : len(ids)] = torch.tensor(ids)
        return out

    ids_all = tokenize(captions)
    model = TextConvUNet(latents.shape[1], tok.vocab_size)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.0)
    ema = EMA(model, 0.995)
    # the demo's schedule: 40 warm-up steps, then a cosine to 5% that follows the clock
    schedule = TrainConfig(lr=args.lr, steps=100_000, schedule="cosine", warmup_steps=40, min_lr_ratio=0.05)
    start, step, losses = time.monotonic(), 0, []
    while time.monotonic() - start < args.seconds:
        idx = torch.randint(0, len(latents), (args.batch,))
        x1, ids = latents[idx], ids_all[idx].clone()
        ids[torch.rand(args.batch) < 0.1] = 0  # the null caption, for CFG
        t = torch.rand(args.batch)
        xt = interpolate(x1, torch.randn_like(x1), t)
        loss = F.mse_loss(model(xt, t, ids), x1)
        lr = lr_at(step, schedule, (time.monotonic() - start) / args.seconds)
        for group in opt.param_groups:
            group["lr"] = lr
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        ema.update(step)
        losses.append(loss.item())
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(ema.shadow[name])
    model.eval()

    meta = [m for m in write_geneval_metadata(str(args.out / "meta.jsonl"), args.prompts, seed=1)
            if m["tag"] in args.tags]
    line = {"steps": step, "loss": round(float(np.mean(losses[-20:])), 4), "vae_steps": len(vae_losses),
            "overrides": args.overrides}
    detector, colours = geneval.shapes_scorer()
    interval = flavour("shapes").transport.cfg_interval
    starts = args.cfg_start if args.cfg_start is not None else [interval[0]]
    for w, lo in [(w, lo) for lo in starts for w in args.cfg_scale]:
        name = f"cfg {w:g}" + (f" from t={lo:g}" if len(starts) > 1 else "")
        folder = args.out / ("geneval-" + name.replace(" ", "").replace("=", ""))
        samples = []
        for i, m in enumerate(meta):
            g = torch.Generator().manual_seed(100_000 + i)
            noise = torch.randn(4, *latents.shape[1:], generator=g)
            cond, null = tokenize([m["prompt"]] * 4), torch.zeros(4, TEXT_LEN, dtype=torch.long)

            def velocity(x: torch.Tensor, t: float, cond=cond, null=null, w=w, lo=lo) -> torch.Tensor:
                tt = torch.full((x.shape[0],), t)
                x1_c, x1_n = model(x, tt, cond), model(x, tt, null)
                scale = guidance_scale(t, w, [lo, interval[1]])
                return velocity_from_x1(x1_n + scale * (x1_c - x1_n), x, tt)

            with torch.no_grad():
                lat = sample_ode(velocity, noise, steps=20, shift=1.0, official_last_step=False)
                images = vae.decode(lat).clamp(0, 1)
            (folder / f"{i:05d}" / "samples").mkdir(parents=True, exist_ok=True)
            (folder / f"{i:05d}" / "metadata.jsonl").write_text(json.dumps(m) + "\n")
            pil = [Image.fromarray((im.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)) for im in images]
            for k, im in enumerate(pil):
                im.save(folder / f"{i:05d}" / "samples" / f"{k:04d}.png")
            samples.append((m, pil))
        records = geneval.score(folder, folder / "results.jsonl", detector, colours)
        scores = geneval.write_summary(records, folder)
        write_grid(samples, folder / "grid.png")
        line[name] = {k: round(v, 3) for k, v in scores.items() if isinstance(v, float)}
    (args.out / "reference.json").write_text(json.dumps(line) + "\n")
    print(json.dumps(line))


if __name__ == "__main__":
    main()
