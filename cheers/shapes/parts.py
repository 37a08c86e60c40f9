"""The shapes world's pretrained parts: the VAE and the semantic encoder that the demo starts from
and keeps frozen, as the released model does with its VAE and SigLIP2.

They ship in the package (``cheers/assets/shapes_parts.safetensors``, about 3.5 MB), made by

    python -m cheers.shapes.parts --out cheers/assets/shapes_parts.safetensors

which trains both for a fixed number of steps (deterministic for a seed on a CPU) and stores
their training figures in the file's metadata (``read_parts_log``).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from cheers.config import TokenizerConfig
from cheers.errors import CheersError
from cheers.safetensors_io import load_checked

PARTS_FILE = Path(__file__).resolve().parent.parent / "assets" / "shapes_parts.safetensors"
VAE_STEPS = 3000
SEMANTIC_STEPS = 3000
NAMES = ("vae", "siglip")


def train_parts(cfg: TokenizerConfig, *, vae_steps: int = VAE_STEPS, semantic_steps: int = SEMANTIC_STEPS,
                seed: int = 0, progress: bool = True) -> tuple[dict[str, dict[str, torch.Tensor]], dict]:
    """Train the VAE, then the semantic encoder, for a fixed number of steps each:
    (``{"vae": state, "siglip": state}``, their training figures)."""
    from cheers.shapes.autoencoder import train_vae
    from cheers.shapes.semantic import train_semantic_encoder

    t0 = time.perf_counter()
    vae, vae_losses = train_vae(cfg.vae, cfg.image_size, steps=vae_steps, seed=seed,
                                desc="vae" if progress else None)
    t1 = time.perf_counter()
    encoder, sem_losses, acc = train_semantic_encoder(cfg.siglip, None, cfg.image_size, steps=semantic_steps,
                                                      seed=seed, desc="semantic encoder" if progress else None)
    log = {"seed": seed, "vae_steps": vae_steps, "vae_seconds": round(t1 - t0, 1),
           "vae_loss_start": float(np.mean(vae_losses[:10])), "vae_loss_end": float(np.mean(vae_losses[-10:])),
           "semantic_steps": semantic_steps, "semantic_seconds": round(time.perf_counter() - t1, 1),
           "semantic_loss_start": float(np.mean(sem_losses[:10])),
           "semantic_loss_end": float(np.mean(sem_losses[-10:])), "semantic_patch_accuracy": acc,
           "torch": torch.__version__}
    return {"vae": vae.state_dict(), "siglip": encoder.state_dict()}, log


def save_parts(path: Path, parts: dict[str, dict[str, torch.Tensor]], log: dict) -> None:
    flat = {f"{name}.{k}": v.detach().contiguous() for name in NAMES for k, v in parts[name].items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(flat, str(path), metadata={"log": json.dumps(log)})


def read_parts_log(path: Path) -> dict:
    with safe_open(str(path), "pt") as f:
        return json.loads((f.metadata() or {}).get("log", "{}"))


def load_parts(path: Path, cfg: TokenizerConfig) -> dict[str, dict[str, torch.Tensor]]:
    """The parts in ``path``, checked against the modules ``cfg`` builds: every key present,
    every shape equal; otherwise a ``CheersError`` naming the file, the key and the shapes."""
    from cheers.tokenizer.siglip import SiglipVision
    from cheers.tokenizer.vae import VAE

    try:
        flat = load_file(str(path))
    except (OSError, ValueError, RuntimeError, SafetensorError) as e:
        raise CheersError(f"{path}: not a readable safetensors file of shapes parts ({e})") from e
    parts = {name: {k[len(name) + 1:]: v for k, v in flat.items() if k.startswith(name + ".")} for name in NAMES}
    with torch.device("meta"):
        wanted = {"vae": VAE(cfg.vae).state_dict(), "siglip": SiglipVision(cfg.siglip).state_dict()}
    for name in NAMES:
        for key, ref in wanted[name].items():
            got = parts[name].get(key)
            if got is None:
                raise CheersError(f"{path}: missing {name}.{key}")
            if tuple(got.shape) != tuple(ref.shape):
                raise CheersError(f"{path}: {name}.{key} has shape {tuple(got.shape)}, the config wants "
                                  f"{tuple(ref.shape)}")
        extra = sorted(set(parts[name]) - set(wanted[name]))
        if extra:
            raise CheersError(f"{path}: unexpected key {name}.{extra[0]}")
    return parts


def install_parts(tokenizer: nn.Module, parts: dict[str, dict[str, torch.Tensor]], *, source: str,
                  vae: bool = True) -> None:
    """Copy the parts into a vision tokenizer (``cheers.tokenizer.vision``): the semantic
    encoder, and with ``vae`` the VAE and, as ``cheers init`` does, its decoder and latent
    statistics into the pixel decoder. Names and shapes are checked (``load_checked``)."""
    load_checked(tokenizer.siglip, parts["siglip"], source=f"{source} (siglip)")
    if vae:
        load_checked(tokenizer.vae, parts["vae"], source=f"{source} (vae)")
        pixel = {k: v for k, v in parts["vae"].items() if k.startswith(("decoder.", "bn."))}
        load_checked(tokenizer.pixel_decoder, pixel, source=f"{source} (pixel decoder copy)")


def main(argv: list[str] | None = None) -> int:
    from cheers.cli_args import OneLineParser, non_negative_int, positive_int
    from cheers.config import flavour

    ap = OneLineParser(prog="python -m cheers.shapes.parts", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("outputs/shapes_parts.safetensors"),
                    help=f"the .safetensors file to write (default: outputs/shapes_parts.safetensors; the "
                         f"packaged file, {PARTS_FILE}, only when named)")
    ap.add_argument("--vae-steps", type=positive_int, default=VAE_STEPS)
    ap.add_argument("--semantic-steps", type=positive_int, default=SEMANTIC_STEPS)
    ap.add_argument("--seed", type=non_negative_int, default=0)
    ap.add_argument("--threads", type=non_negative_int, default=0, help="torch CPU threads (default: torch's choice)")
    args = ap.parse_args(argv)
    if args.out.suffix != ".safetensors":
        ap.error(f"--out {args.out}: expected a path ending in .safetensors")
    if args.threads:
        torch.set_num_threads(args.threads)
    parts, log = train_parts(flavour("shapes").tokenizer, vae_steps=args.vae_steps,
                             semantic_steps=args.semantic_steps, seed=args.seed)
    save_parts(args.out, parts, log)
    print(json.dumps(log, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
