"""``cheers quantize``: 2-bit post-training quantization of the LLM of a Cheers checkpoint.

    cheers quantize --ckpt DIR --method lcqat [--calib 'shards/*.tar'] [--samples 64]
                    [--out DIR] [--state-dir DIR]

Calibration batches come through the training data path (``cheers.train.data.SampleLoader`` +
``cheers.collate.Collator``) from ``--calib`` shards, or from shapes-world shards written on
the fly. Each batch runs through the vision tokenizer and the embeddings once; the LLM's
linears (not the embeddings, not ``lm_head``) are then quantized block by block. With
``--state-dir`` every finished block is saved, and a rerun with the same settings resumes
after the last one.

Output folder (``config.json`` + ``model.safetensors`` + the tokenizer):

- ``lcqat``: packed, 4 codes per byte plus ``A``, ``b``, ``SU``, ``SV`` per layer and a
  ``quantization`` section in ``config.json``; ``Pipeline.from_pretrained`` runs it with
  ``PackedLCQLinear`` layers (the starting point of QAT too: ``lcqat.init``).
- ``rtn`` / ``gptq``: fake-quantized. Every weight is stored dense (float32) at its value on
  the 2-bit group grid (codes x scale + minimum); the ``quantization`` section records the
  method, group size and the bits per weight a packed form would cost. It loads as any
  checkpoint.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from cheers.cli_args import (
    OneLineParser,
    checkpoint_args,
    checkpoint_path,
    non_negative_int,
    output_folder,
    positive_int,
)
from cheers.errors import CheersError, InputError
from cheers.text_tokenizer import copy_tokenizer_files

CALIB_SEED = (
    7_000  # shapes calibration scenes: a seed the demo's training and evaluation do not use
)
CALIB_MIX = {"t2i": 0.5, "i2t": 0.4, "text": 0.1}  # the shapes recipe's task mix


@torch.no_grad()
def llm_inputs(model, batch, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """The LLM's keyword inputs for a packed ``Batch``: ``inputs_embeds`` [B, L, D] (image slots
    filled by the vision tokenizer; generation images at a sampled noise level),
    ``position_ids`` [B, L] and the attention ``mask`` [B, 1, L, L]."""
    from cheers.attention import build_dense_mask

    tokens = None
    if batch.num_images:
        _, _, _, xt = model.prepare_images(batch, generator)
        tokens, _ = model.image_tokens(xt)
    embeds = model.embed(batch.input_ids, batch.image_index, batch.image_slot, tokens)
    mask = build_dense_mask(batch.doc_ids, batch.block_ids)
    return {"inputs_embeds": embeds, "position_ids": batch.position_ids, "mask": mask}


def calibration_batches(
    model,
    text_tokenizer_dir: str | Path,
    shards: list[str],
    *,
    samples: int,
    batch_size: int,
    seed: int = 0,
    progress: bool = True,
) -> list[dict[str, torch.Tensor]]:
    """``samples`` training samples from ``shards`` (the shapes task mix), collated in batches of
    ``batch_size`` and turned into LLM inputs (``llm_inputs``) on the model's device."""
    from cheers.collate import make_collate
    from cheers.train.config import DataConfig
    from cheers.train.data import SampleLoader

    if samples < 1 or batch_size < 1:
        raise InputError(f"samples and batch_size must be >= 1, got {samples} and {batch_size}")
    data = DataConfig(
        shards=list(shards),
        ratios=dict(CALIB_MIX),
        text_tokenizer_dir=str(text_tokenizer_dir),
        shuffle_buffer=64,
        num_workers=0,
    )
    loader = SampleLoader(data, image_size=model.cfg.tokenizer.image_size, seed=seed)
    collate = make_collate(model.cfg, text_tokenizer_dir)
    # calibration sees the prompts the model answers to: no classifier-free-guidance drop
    collate.drop = 0.0
    device = next(model.parameters()).device
    gen = torch.Generator(device=device).manual_seed(seed)
    out = []
    try:
        for start in tqdm(range(0, samples, batch_size), desc="calibration", disable=not progress):
            batch = collate(loader.next_batch(min(batch_size, samples - start))).to(device)
            out.append(llm_inputs(model, batch, gen))
    finally:
        loader.close()
    return out


def shapes_calibration_shards(folder: Path, samples: int, image_size: int) -> list[str]:
    """Write ``samples`` shapes-world samples (calibration seed) as shards in ``folder``."""
    from cheers.shapes.dataset import write_shards

    return write_shards(
        str(folder),
        n_samples=max(samples, 8),
        seed=CALIB_SEED,
        image_size=image_size,
        samples_per_shard=max(samples, 8),
    )


def dense_from_scalar(model: nn.Module) -> list[str]:
    """Replace every RTN / GPTQ ``ScalarQuantLinear`` by an ``nn.Linear`` holding its
    dequantized weight (the fake-quantized model, in place); returns the names."""
    from cheers.lcqat.baselines import ScalarQuantLinear
    from cheers.lcqat.lcq_linear import set_submodule

    names = []
    for name, mod in list(model.named_modules()):
        if isinstance(mod, ScalarQuantLinear):
            lin = nn.Linear(
                mod.in_features,
                mod.out_features,
                bias=mod.bias is not None,
                device=mod.codes.device,
            )
            with torch.no_grad():
                lin.weight.copy_(mod.dequantized_weight())
                if mod.bias is not None:
                    lin.bias.copy_(mod.bias)
            set_submodule(model, name, lin)
            names.append(name)
    return names


def quantize_checkpoint(
    ckpt: str | Path,
    out: str | Path,
    *,
    method: str = "lcqat",
    calib: list[str] | None = None,
    samples: int = 64,
    batch_size: int = 8,
    state_dir: str | Path | None = None,
    group_size: int = 64,
    seed: int = 0,
    device: str = "cpu",
    progress: bool = True,
    **opts: Any,
):
    """Quantize the LLM of checkpoint folder ``ckpt`` and write ``out``; returns
    ``(model, summary)``: the model as quantized in memory (``LCQLinear`` layers for lcqat: the
    fake-quantized twin of the packed folder) and what ``quantize.json`` records. ``opts``: ``LCQConfig`` fields
    (lcqat) or ``damp`` (gptq)."""
    from cheers.checkpoint import load_pretrained, quantization_of, save_pretrained
    from cheers.lcqat import quantize_model
    from cheers.safetensors_io import read_json, write_json

    ckpt, out = Path(ckpt), Path(out)
    if quantization_of(ckpt) is not None:
        raise InputError(f"{ckpt} is already quantized; quantize a full-precision checkpoint")
    if not (ckpt / "tokenizer.json").is_file():
        raise InputError(f"{ckpt}: no tokenizer.json (calibration tokenizes text with it)")
    t0 = time.monotonic()
    model = load_pretrained(ckpt, device=device)
    batches = None
    if method != "rtn":
        with tempfile.TemporaryDirectory(prefix="cheers-calib-") as tmp:
            shards = calib or shapes_calibration_shards(
                Path(tmp), samples, model.cfg.tokenizer.image_size
            )
            batches = calibration_batches(
                model,
                ckpt,
                shards,
                samples=samples,
                batch_size=batch_size,
                seed=seed,
                progress=progress,
            )
    _, report = quantize_model(
        model.llm,
        batches,
        method,
        group_size=group_size,
        state_dir=state_dir,
        progress=progress,
        **opts,
    )
    if not report.quantized:
        raise InputError(f"{ckpt}: no linear layer of the LLM could be quantized with {method}")
    out.mkdir(parents=True, exist_ok=True)
    if method == "lcqat":
        save_pretrained(model, out)
    else:
        dense_from_scalar(model)
        save_pretrained(model, out)
        config = read_json(out / "config.json")
        config["quantization"] = {
            "quant_method": method,
            "storage": "fake-quantized",
            "bits": 2,
            "group_size": group_size,
            "bits_per_weight": report.bits_per_weight,
            "layers": [f"llm.{n}" for n in report.quantized],
        }
        write_json(config, out / "config.json")
    copy_tokenizer_files(ckpt, out)
    summary = {
        "method": method,
        "source": str(ckpt),
        "bits_per_weight": report.bits_per_weight,
        "quantized": len(report.quantized),
        "skipped": {f"llm.{n}": why for n, why in report.skipped.items()},
        "weights": sum(
            model.get_submodule(f"llm.{n}").in_features
            * model.get_submodule(f"llm.{n}").out_features
            for n in report.quantized
        ),
        "calibration": {"shards": calib or "shapes (generated)", "samples": samples}
        if batches
        else None,
        "block_mse": report.block_mse,
        "resumed_blocks": report.resumed_blocks,
        "seconds": time.monotonic() - t0,
    }
    (out / "quantize.json").write_text(json.dumps(summary, indent=1) + "\n")
    return model, summary


def main(argv: list[str] | None = None) -> int:
    ap = OneLineParser(prog="cheers quantize", description=__doc__)
    checkpoint_args(ap, load=False, what="full-precision checkpoint folder")
    ap.add_argument("--method", choices=["lcqat", "rtn", "gptq"], default="lcqat",
                    help="LC-QAT (packed 2-bit), or round-to-nearest / GPTQ on the same grid (fake-quantized)")
    ap.add_argument(
        "--calib",
        action="append",
        default=None,
        help="calibration shards (paths, globs, brace patterns; repeatable). Default: shapes data",
    )
    ap.add_argument("--samples", type=positive_int, default=64, help="calibration samples")
    ap.add_argument(
        "--batch-size", type=positive_int, default=8, help="calibration samples per batch"
    )
    ap.add_argument(
        "--out", type=output_folder, default=None, help="output folder (default: <ckpt>-<method>)"
    )
    ap.add_argument(
        "--state-dir", type=Path, default=None, help="save finished blocks here; a rerun resumes"
    )
    ap.add_argument(
        "--group-size", type=positive_int, default=64, help="rtn / gptq: inputs per scale group"
    )
    ap.add_argument(
        "--finetune-steps",
        type=non_negative_int,
        default=None,
        help="lcqat: Adam steps per block (default 100)",
    )
    ap.add_argument(
        "--sweeps",
        type=non_negative_int,
        default=None,
        help="lcqat: refinement sweeps after the LDL pass (default 2)",
    )
    ap.add_argument(
        "--hadamard", choices=["full", "block128"], default=None, help="lcqat: the Hadamard transform (default: full)"
    )
    ap.add_argument("--seed", type=non_negative_int, default=0, help="seed of the calibration samples' order and noise")
    ap.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = ap.parse_args(argv)
    try:
        ckpt = checkpoint_path(args)
    except CheersError as e:
        ap.error(str(e))
    out = args.out or ckpt.with_name(f"{ckpt.name}-{args.method}")
    opts = {
        k: v
        for k, v in (
            ("finetune_steps", args.finetune_steps),
            ("sweeps", args.sweeps),
            ("hadamard", args.hadamard),
        )
        if v is not None
    }
    if opts and args.method != "lcqat":
        ap.error(f"--{next(iter(opts)).replace('_', '-')} applies to --method lcqat only")
    if args.calib and args.method != "rtn":
        from cheers.train.data import expand_shards

        try:
            expand_shards(args.calib, what="--calib")
        except InputError as e:
            ap.error(str(e))
    _, summary = quantize_checkpoint(
        ckpt,
        out,
        method=args.method,
        calib=args.calib,
        samples=args.samples,
        batch_size=args.batch_size,
        state_dir=args.state_dir,
        group_size=args.group_size,
        seed=args.seed,
        device=args.device,
        progress=not args.no_progress,
        **opts,
    )
    stored = (
        "packed" if args.method == "lcqat" else "fake-quantized (dense weights on the 2-bit grid)"
    )
    print(
        f"{args.method}: {summary['quantized']} LLM linears ({summary['weights'] / 1e6:.2f}M weights) at "
        f"{summary['bits_per_weight']:.3f} bits/weight, {stored}; "
        f"{len(summary['resumed_blocks'])} block(s) resumed; {summary['seconds']:.1f} s"
    )
    for name, why in summary["skipped"].items():
        print(f"  left in full precision: {name} ({why})")
    print(f"wrote {out}")
    return 0
