"""Training throughput, measured against ``transformers`` in the same run.

    python benchmarks/train_throughput.py llm     # LLM train step: tokens/s and MFU
    python benchmarks/train_throughput.py cheers  # whole-model step on t2i samples: samples/s
    python benchmarks/train_throughput.py smoke   # the trainer end to end on this device

``llm`` times one training step (forward, backward, clip, AdamW) of Qwen2 at the
``cheers-1.5b`` LLM dimensions (GPU, bf16, batch 8 x 2048) or small ones (CPU):

- ``transformers``: ``Qwen2ForCausalLM`` with SDPA, fp32 weights under bf16 autocast, fused
  AdamW: the reference (40.7k tokens/s, 40% MFU on an H200 in an earlier run);
- ``trainer``: the same network wrapped by ``cheers.train.parallelize`` (FSDP2 with bf16
  parameters and fp32 reductions, ``--compile``), our AdamW groups: what a run gets;
- ``ours``: our LLM (``cheers.llm``) with the chunked fused CE (``cheers.losses``) through
  the same wrapping (``ours+compile`` with ``--compile``); ``--ours module:factory`` swaps in
  another network: a factory of ``LLMConfig`` returning a module whose
  ``forward(input_ids, labels)`` gives the mean next-token loss.

MFU = 6 N tokens/s / peak, N counting every matmul weight (a tied lm_head included).
Absolute numbers only mean something on a GPU; name the card when quoting them.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import gc
import importlib
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]


def _device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def _peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    from cheers.train.config import _default_peak_tflops

    name = torch.cuda.get_device_name(device)
    return next((v * 1e12 for k, v in _default_peak_tflops().items() if k in name), None)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _llm_config(dims: str):
    from cheers.config import LLMConfig, flavour

    if dims == "cheers-1.5b":
        return flavour("cheers-1.5b").llm
    return LLMConfig(vocab_size=32000, hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096)


class _HFLoss(nn.Module):
    """``Qwen2ForCausalLM`` as ``forward(input_ids, labels) -> loss``, its layers as FSDP units."""

    def __init__(self, cfg):
        super().__init__()
        from transformers import Qwen2Config, Qwen2ForCausalLM

        hf = Qwen2Config(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
                         intermediate_size=cfg.intermediate_size,
                         num_hidden_layers=cfg.num_hidden_layers,
                         num_attention_heads=cfg.num_attention_heads,
                         num_key_value_heads=cfg.num_key_value_heads,
                         max_position_embeddings=cfg.max_position_embeddings,
                         rope_theta=cfg.rope_theta, rms_norm_eps=cfg.rms_norm_eps,
                         tie_word_embeddings=cfg.tie_word_embeddings, attn_implementation="sdpa")
        self.lm = Qwen2ForCausalLM(hf)

    def fsdp_units(self) -> list[nn.Module]:
        return list(self.lm.model.layers)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.lm(input_ids=input_ids, labels=labels, use_cache=False).loss


class _OursLoss(nn.Module):
    """Our LLM (``cheers.llm``) with the chunked fused CE (``cheers.losses``), as the model trains it."""

    def __init__(self, cfg):
        super().__init__()
        from cheers.llm import LLM

        self.llm = LLM(cfg)
        self.llm.init_weights()

    def fsdp_units(self) -> list[nn.Module]:
        return list(self.llm.layers)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        from cheers.losses import linear_cross_entropy

        hidden = self.llm.hidden_states(input_ids)[:, :-1]  # predicts labels[:, 1:]
        return linear_cross_entropy(hidden.flatten(0, 1), self.llm.lm_head.weight, labels[:, 1:].flatten())


def _train_step(model: nn.Module, opt: torch.optim.Optimizer, amp, *inputs) -> None:
    """Forward, backward, clip, AdamW: one optimiser step as the trainer takes it."""
    with amp:
        loss = model(*inputs)
    if isinstance(loss, dict):
        loss = loss["loss"]
    loss.backward()
    torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)


def _time_steps(step, steps: int, warmup: int, device: torch.device) -> float:
    """Seconds per step after ``warmup`` untimed steps (compilation happens there)."""
    for _ in range(warmup):
        step()
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(device)
    return (time.perf_counter() - t0) / steps


def bench_llm(args) -> list[dict]:
    from cheers.train.config import TrainConfig
    from cheers.train.optim import build_optimizer
    from cheers.train.parallelize import init_distributed, parallelize, shutdown_distributed
    from cheers.train.trainer import _count_params

    device = _device()
    gpu = device.type == "cuda"
    cfg = _llm_config(args.dims or ("cheers-1.5b" if gpu else "small"))
    batch, seq = args.batch or (8 if gpu else 2), args.seq or (2048 if gpu else 256)
    ids = torch.randint(0, cfg.vocab_size, (batch, seq), device=device)
    peak = _peak_flops(device)
    env = init_distributed("auto", need_group=True)
    variants = [("transformers", _HFLoss, False), ("trainer", _HFLoss, False)]
    if args.compile:
        variants.append(("trainer+compile", _HFLoss, True))
    if args.ours:
        mod, _, attr = args.ours.partition(":")
        variants.append(("ours", getattr(importlib.import_module(mod), attr), args.compile))
    else:
        variants.append(("ours", _OursLoss, False))
        if args.compile:
            variants.append(("ours+compile", _OursLoss, True))
    if args.variants:
        keep = set(args.variants.split(","))
        variants = [v for v in variants if v[0] == "transformers" or v[0] in keep]
    rows = []
    for name, factory, compile in variants:
        torch.manual_seed(0)
        with torch.device(device):
            model = factory(cfg)
        _, n_flop = _count_params(model)
        if name == "transformers":
            opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=gpu)
            amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=gpu)
        else:
            model = parallelize(model, env, dtype="bf16", fsdp=True, compile=compile,
                                activation_checkpointing=args.ac)
            opt = build_optimizer(model, TrainConfig(lr=1e-5))
            amp = torch.autocast(device.type, enabled=False)
        if gpu:
            torch.cuda.reset_peak_memory_stats(device)
        step = functools.partial(_train_step, model, opt, amp, ids, ids)
        sec = _time_steps(step, args.steps, args.warmup, device)
        tps = batch * seq / sec
        rows.append({"variant": name, "batch": f"{batch}x{seq}", "s_per_step": sec,
                     "tokens_per_s": tps, "mfu": 6 * n_flop * tps / peak if peak else None,
                     "peak_gb": torch.cuda.max_memory_allocated(device) / 2**30 if gpu else None,
                     "compile": compile})
        print(f"  {name}: {sec:.4f} s/step, {tps:.0f} tokens/s", flush=True)
        del model, opt, step
        gc.collect()
        if gpu:
            torch.cuda.empty_cache()
    shutdown_distributed(env)
    base = rows[0]["tokens_per_s"]
    for r in rows:
        r["vs_transformers"] = r["tokens_per_s"] / base
    return rows


def bench_cheers(args) -> list[dict]:
    """The whole model's training step on t2i samples (needs cheers.model / cheers.sequence)."""
    try:
        from cheers.train.task import CheersTask
        task = CheersTask()
        from cheers.config import flavour
        from cheers.train.config import RunConfig
    except ImportError as e:
        print(f"cheers: skipped ({e})")
        return []
    from cheers.train.config import TrainConfig
    from cheers.train.data import RawSample
    from cheers.train.optim import build_optimizer, select_trainable
    from cheers.train.parallelize import init_distributed, parallelize, shutdown_distributed

    device = _device()
    gpu = device.type == "cuda"
    model_cfg = flavour(args.dims or ("cheers-1.5b" if gpu else "debug"))
    text_tokenizer_dir = args.text_tokenizer_dir
    if not text_tokenizer_dir:
        # no Qwen tokenizer offline: a small BPE whose special tokens take ids 0..7; the
        # model keeps its full vocabulary, so the step costs the same
        from cheers.text_tokenizer import train_bpe

        text_tokenizer_dir = tempfile.mkdtemp()
        train_bpe(["a red circle above a blue square", "two green crosses"] * 20, 300).save(text_tokenizer_dir)
        model_cfg = dataclasses.replace(model_cfg, tokens=flavour("debug").tokens)
    run = RunConfig(model=model_cfg)
    run.data.text_tokenizer_dir = text_tokenizer_dir
    try:
        with torch.device(device):
            model = task.build_model(model_cfg)
        collate = task.build_collate(run)
    except (ImportError, NotImplementedError) as e:
        print(f"cheers: skipped ({e})")
        return []
    batch = args.batch or (8 if gpu else 2)
    size = model_cfg.tokenizer.image_size
    gen = torch.Generator().manual_seed(0)
    samples = [RawSample(key=str(i), task="t2i", text="a red circle above a blue square",
                         conversations=[], image=torch.rand(3, size, size, generator=gen))
               for i in range(batch)]
    data = collate(samples).to(device)
    env = init_distributed("auto", need_group=True)
    if hasattr(model, "init_weights"):
        model.init_weights()
    select_trainable(model, ["*", "!tokenizer.vae"])  # stage IV: everything but the VAE
    n_params = sum(p.numel() for p in model.parameters())
    model = parallelize(model, env, dtype="bf16", fsdp=True, compile=args.compile,
                        activation_checkpointing=args.ac)
    opt = build_optimizer(model, TrainConfig(lr=1e-5))
    if gpu:
        torch.cuda.reset_peak_memory_stats(device)
    step = functools.partial(_train_step, model, opt, torch.autocast(device.type, enabled=False), data)
    sec = _time_steps(step, args.steps, args.warmup, device)
    shutdown_distributed(env)
    official = 0.876 if gpu and model_cfg.flavour == "cheers-1.5b" and batch == 8 else None
    return [{"variant": "cheers t2i", "params_m": n_params / 1e6, "batch": batch,
             "tokens_per_sample": data.num_tokens / batch, "s_per_step": sec, "samples_per_s": batch / sec,
             "peak_gb": torch.cuda.max_memory_allocated(device) / 2**30 if gpu else None,
             "vs_official": official / sec if official else None}]


def smoke(args) -> list[dict]:
    """The trainer on this device with the tests' toy model: bf16, AC, compile, resume."""
    sys.path.insert(0, str(ROOT / "tests"))
    from test_train_data import write_shards

    from cheers.train.config import load_run_config
    from cheers.train.trainer import train

    rows = []
    gpu = _device().type == "cuda"
    with tempfile.TemporaryDirectory() as tmp:
        shards = write_shards(Path(tmp) / "shards", n_shards=4, per_shard=16)
        for label, extra in [("fp32", ["train.dtype=fp32"]),
                             ("bf16+ac+compile", ["train.dtype=bf16",
                                                  "train.activation_checkpointing=true",
                                                  f"train.compile={str(gpu).lower()}"])]:
            def cfg(out, *more, extra=extra):
                return load_run_config(None, [
                    "model.flavour=debug", "train.task=test_train:ToyTask", f"data.shards=['{shards}']",
                    "data.ratios={t2i: 2, i2t: 1, text: 1}", "train.steps=8", "train.global_batch=4",
                    "train.micro_batch=2", "train.lr=0.01", "train.log_every=1", "train.ckpt_every=4",
                    "train.tensorboard=false", "train.progress=false", "train.ema_decay=0.9",
                    f"train.out_dir={out}", *extra, *more])

            t0 = time.perf_counter()
            full = train(cfg(f"{tmp}/{label}-a")).history
            seconds = time.perf_counter() - t0
            train(cfg(f"{tmp}/{label}-b", "train.stop_after=4"))
            resumed = train(cfg(f"{tmp}/{label}-b")).history
            diff = max(abs(a["loss"] - b["loss"]) for a, b in zip(full[4:], resumed))
            rows.append({"variant": f"smoke {label}", "device": str(_device()),
                         "first_loss": full[0]["loss"], "last_loss": full[-1]["loss"],
                         "resume_max_abs_diff": diff, "seconds": seconds,
                         "mfu_logged": "mfu" in full[-1]})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["llm", "cheers", "smoke"], nargs="+")
    parser.add_argument("--dims", help="cheers-1.5b (GPU default), small/debug (CPU default)")
    parser.add_argument("--batch", type=int)
    parser.add_argument("--seq", type=int)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--ac", action="store_true", help="activation checkpointing")
    parser.add_argument("--ours", help="module:factory of our LLM (LLMConfig -> module)")
    parser.add_argument("--variants", help="llm: comma-separated variants to run besides transformers "
                        "(trainer, trainer+compile, ours, ours+compile; default all)")
    parser.add_argument("--text-tokenizer-dir", default="")
    parser.add_argument("--json", help="also write the rows here")
    args = parser.parse_args(argv)
    rows: list[dict] = []
    for what in args.what:
        rows += {"llm": bench_llm, "cheers": bench_cheers, "smoke": smoke}[what](args)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    print(f"device: {device}, torch {torch.__version__}")
    for r in rows:
        print("  " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                               for k, v in r.items()))
    if args.json:
        Path(args.json).write_text(json.dumps({"device": device, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
