"""Training the shapes model: the world's shards and text tokenizer, the starting model (the
shipped VAE and semantic encoder in a fresh Cheers model), and runs of the project's trainer on
configs/shapes.yaml."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from tqdm import tqdm

from cheers.config import load_yaml, merge, parse_overrides, recipe_path
from cheers.errors import CheersError

CONFIG = recipe_path("shapes")


def prepare(out: Path, n_train: int, seed: int, log, i2t_turns: int = 3,
            object_size: str = "standard") -> tuple[Path, Path]:
    """Shards of the whole world and of one- and two-object scenes (the curriculum's start),
    ``i2t_turns`` questions per understanding sample, multiple choices answered with the
    option's text, and a tokenizer over them; returns (shard dir, tokenizer dir)."""
    from cheers.shapes.dataset import make_tokenizer, write_shards

    data, easy = out / "data", out / "data-easy"
    wanted = {"i2t_turns": i2t_turns, "object_size": object_size}
    for folder, n, kinds, offset in ((data, n_train, None, 0), (easy, n_train // 3, ("single", "two"), 50)):
        manifest = folder / "manifest.json"
        if not manifest.is_file():
            with tqdm(total=n, desc=f"data ({folder.name})", unit="sample", leave=False) as bar:
                write_shards(str(folder), n_samples=n, seed=seed + offset, image_size=64, samples_per_shard=2000,
                             kinds=kinds, workers=os.cpu_count() or 1, progress=bar.update, **wanted)
            continue
        written = json.loads(manifest.read_text())
        # shards written before an option existed hold its default
        was = {"i2t_turns": 1, "mcq_answer": "letter", "object_size": "standard"} | written
        differ = [f"{k} {was[k]} (not {v})" for k, v in (wanted | {"mcq_answer": "option"}).items() if was[k] != v]
        if differ:
            raise CheersError(f"{folder} holds shards written with {', '.join(differ)}: use another --out")
    text_tokenizer_dir = out / "tokenizer"
    make_tokenizer(text_tokenizer_dir, [data, easy], seed, object_size)
    log(f"data: {n_train} samples in {data}, {n_train // 3} simple ones in {easy}; tokenizer in {text_tokenizer_dir}")
    return data, text_tokenizer_dir


def build_init(out: Path, text_tokenizer_dir: Path, parts_file: Path, seed: int, log,
               overrides: list[str] = ()) -> Path:
    """The starting model: configs/shapes.yaml's with the run's ``model.*`` overrides (as the
    training run builds it), with the pretrained VAE (copied into the pixel decoder) and semantic
    encoder of ``parts_file`` (``cheers.shapes.parts``), or trained here for the same fixed
    steps when that file is absent or does not fit the config."""
    from cheers.checkpoint import save_pretrained
    from cheers.model import CheersModel
    from cheers.shapes.parts import (
        install_parts,
        load_parts,
        read_parts_log,
        save_parts,
        train_parts,
    )
    from cheers.text_tokenizer import TextTokenizer

    init = out / "init"
    if (init / "model.safetensors").is_file():
        return init
    cfg = shapes_run_config(overrides).model
    tok = TextTokenizer.from_dir(text_tokenizer_dir)
    if tok.special != cfg.tokens or tok.vocab_size > cfg.llm.vocab_size:
        raise CheersError(f"tokenizer {text_tokenizer_dir} does not fit the shapes flavour")
    parts = None
    if parts_file.is_file():
        try:
            parts, plog, source = load_parts(parts_file, cfg.tokenizer), read_parts_log(parts_file), parts_file
        except CheersError as e:
            log(f"pretrained parts do not fit this config ({e}): training them")
    else:
        log(f"no pretrained parts at {parts_file}: training them")
    if parts is None:
        parts, plog = train_parts(cfg.tokenizer, seed=seed)
        source = out / "parts.safetensors"
        save_parts(source, parts, plog)
    if plog:
        acc = plog.get("semantic_patch_accuracy", {})
        log(f"pretrained parts from {source}: VAE {plog.get('vae_steps')} steps (loss {plog.get('vae_loss_end', 0):.4f}), "
            f"semantic encoder {plog.get('semantic_steps')} steps (patch accuracy "
            + ", ".join(f"{k} {v:.2f}" for k, v in acc.items()) + ")")
    torch.manual_seed(seed)
    model = CheersModel(cfg)
    model.init_weights()
    install_parts(model.tokenizer, parts, source=str(source))
    save_pretrained(model, init)
    return init


def shapes_run_config(overrides: list[str]):
    """configs/shapes.yaml with dotted overrides: the one place the demo builds its config."""
    from cheers.train.config import run_config_from_dict

    return run_config_from_dict(merge(load_yaml(CONFIG), parse_overrides(list(overrides))))


def run_training(out: Path, data: Path, text_tokenizer_dir: Path, init: Path, overrides: list[str], device: str,
                 log, *, steps: int, seconds: float | None = None, name: str = "run", seed: int = 0):
    """One training run of ``steps`` optimiser steps (its schedule's length), ended early by
    ``seconds`` of wall clock when given."""
    from cheers.train.trainer import train

    run_dir = out / name
    over = [f"data.shards=['{data}/*.tar']", f"data.text_tokenizer_dir={text_tokenizer_dir}", f"train.init_from={init}",
            f"train.out_dir={run_dir}", f"train.device={device}", f"train.steps={steps}", f"train.seed={seed}"]
    if seconds is not None:
        over.append(f"train.max_seconds={max(seconds, 1.0):.0f}")
    cfg = shapes_run_config(over + list(overrides))
    budget = f", at most {seconds / 60:.1f} min" if seconds is not None else ""
    log(f"training {steps} steps{budget} on {data.name} in {run_dir}")
    return train(cfg), run_dir


def prepare_world(work: Path, n_samples: int, seed: int, object_size: str, log=print) -> tuple[Path, Path]:
    """Training shards (the demo's task mix, three questions per understanding sample, multiple
    choices answered with the option's text) and a byte-level BPE tokenizer over them, made once
    in ``work``; a folder holding another world is refused."""
    from cheers.shapes.dataset import make_tokenizer, write_shards

    data, tok_dir = work / "data", work / "tokenizer"
    manifest = data / "manifest.json"
    if manifest.is_file():
        written = json.loads(manifest.read_text())
        got = (written.get("object_size", "standard"), written["n_samples"], written["seed"])
        if got != (object_size, n_samples, seed):
            raise CheersError(f"{data} holds another world ({got[0]} objects, {got[1]} samples, seed {got[2]}), "
                              f"not ({object_size}, {n_samples}, {seed}): use another folder")
    else:
        log(f"writing {n_samples} samples ({object_size} objects) to {data}")
        write_shards(str(data), n_samples=n_samples, seed=seed, image_size=64,
                     mix={"t2i": 0.75, "i2t": 0.2, "text": 0.05}, samples_per_shard=2000, i2t_turns=3,
                     workers=os.cpu_count() or 1, object_size=object_size)
    make_tokenizer(tok_dir, [data], seed, object_size)
    return data, tok_dir
