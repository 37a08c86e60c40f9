"""LC-QAT quality benchmark: held-out perplexity of a small LLM quantized to 2 bits.

    python benchmarks/lcqat_quality.py                      # small default, ~10 min on 2 cores
    python benchmarks/lcqat_quality.py --hidden 512 --layers 8 --steps 20000 --device cuda

Trains our LLM (``cheers.llm.LLM``, byte-level vocabulary) on a text corpus every machine has
offline: the running Python's standard library (``*.py`` files: source and docstrings), split
into train and held-out by file (``--corpus FILE`` for any text, split by position). Then for
each budget (a fraction of the pretraining tokens, used as calibration data for the PTQ
methods and as training data for the QAT ones) it quantizes a copy of the model with every
method and prints held-out perplexity and stored bits per weight:

    fp, RTN g64, RTN g128 (no data), GPTQ g64, LSQ-QAT g64, LC-QAT PTQ, LC-QAT PTQ + QAT.

The first and last linear-free parts (embeddings, lm_head, norms) stay in full precision for
every method. Ratios to the fp perplexity are printed beside each value.
"""

from __future__ import annotations

import argparse
import copy
import math
import sysconfig
import time
import zlib
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from cheers.config import LLMConfig
from cheers.lcqat import LCQLinear, LSQLinear, apply_lsq, quantize_model


def load_corpus(path: str | None, max_bytes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, held-out) byte tensors. The stdlib split is by file (1 file in 20 held out)."""
    if path is not None:
        data = Path(path).read_bytes()[:max_bytes]
        cut = int(len(data) * 0.95)
        return torch.tensor(list(data[:cut]), dtype=torch.long), torch.tensor(list(data[cut:]), dtype=torch.long)
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py") if "site-packages" not in p.parts and "test" not in p.parts)
    train, held = bytearray(), bytearray()
    for p in files:
        if len(train) + len(held) >= max_bytes:
            break
        try:
            text = p.read_bytes()
        except OSError:
            continue
        (held if zlib.crc32(str(p.relative_to(root)).encode()) % 20 == 0 else train).extend(text + b"\n")
    return torch.tensor(list(train), dtype=torch.long), torch.tensor(list(held), dtype=torch.long)


def sample_batch(data: torch.Tensor, batch: int, seq: int, gen: torch.Generator) -> torch.Tensor:
    """Random windows of ``seq + 1`` bytes. [batch, seq + 1]"""
    starts = torch.randint(0, len(data) - seq - 1, (batch,), generator=gen)
    return torch.stack([data[s : s + seq + 1] for s in starts.tolist()])


def lm_loss(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    logits = model(tokens[:, :-1])  # [B, L, V]
    return F.cross_entropy(logits.flatten(0, 1).float(), tokens[:, 1:].flatten())


@torch.no_grad()
def perplexity(model: nn.Module, held: torch.Tensor, seq: int, windows: int, device: torch.device) -> float:
    """exp(mean CE) over ``windows`` evenly spaced held-out windows."""
    model.eval()
    step = max(1, (len(held) - seq - 1) // windows)
    starts = list(range(0, len(held) - seq - 1, step))[:windows]
    total = 0.0
    for i in range(0, len(starts), 16):
        tokens = torch.stack([held[s : s + seq + 1] for s in starts[i : i + 16]]).to(device)
        total += float(lm_loss(model, tokens)) * len(tokens)
    return math.exp(total / len(starts))


def train(model: nn.Module, groups: list[dict], data: torch.Tensor, steps: int, args, gen: torch.Generator, desc: str) -> None:
    """Adam with linear warm-up and cosine decay on next-byte CE."""
    if steps <= 0:
        return
    model.train()
    opt = torch.optim.AdamW(groups, betas=(0.9, 0.95), weight_decay=0.0)
    base = [g["lr"] for g in groups]
    t0 = time.time()
    for step in range(steps):
        frac = min(1.0, (step + 1) / max(1, steps // 20)) * 0.5 * (1 + math.cos(math.pi * step / steps))
        for g, lr in zip(opt.param_groups, base):
            g["lr"] = lr * frac
        tokens = sample_batch(data, args.batch, args.seq, gen).to(args.device)
        loss = lm_loss(model, tokens)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for g in groups for p in g["params"]], 1.0)
        opt.step()
        if args.verbose and (step % max(1, steps // 5) == 0 or step == steps - 1):
            print(f"    {desc} step {step + 1}/{steps} loss {loss.item():.3f} ({time.time() - t0:.0f}s)", flush=True)
    model.eval()


def _rms(p: torch.Tensor) -> float:
    return float(p.detach().pow(2).mean().sqrt().clamp_min(1e-4))


def qat_groups(model: nn.Module, lr: float, theta_lr: float) -> list[dict]:
    """Trainable in QAT, equal for both methods: the quantized layers' parameters (latents,
    scales, codebooks, biases) and the norms; embeddings and lm_head stay frozen. Step sizes
    are relative to each tensor's RMS."""
    groups, seen = [], set()
    for p in model.parameters():
        p.requires_grad_(False)
    for mod in model.modules():
        if isinstance(mod, LCQLinear):
            named = [(mod.theta, theta_lr)] + [(p, lr * _rms(p)) for p in mod.quant_parameters()]
        elif isinstance(mod, LSQLinear):
            named = [(p, lr * _rms(p)) for p in mod.parameters(recurse=False)]
        elif "norm" in type(mod).__name__.lower():
            named = [(p, lr * _rms(p)) for p in mod.parameters(recurse=False)]
        else:
            continue
        for p, plr in named:
            if id(p) not in seen:
                seen.add(id(p))
                p.requires_grad_(True)
                groups.append({"params": [p], "lr": plr})
    return groups


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--corpus", default=None, help="a text file (default: the Python stdlib)")
    ap.add_argument("--max-bytes", type=int, default=8_000_000)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--intermediate", type=int, default=384)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=300, help="pretraining steps")
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--budgets", default="0.001,0.01,0.1", help="fractions of the pretraining tokens")
    ap.add_argument("--qat-lr", type=float, default=1e-3, help="relative step of scales, codebooks, weights")
    ap.add_argument("--theta-lr", type=float, default=1e-3)
    ap.add_argument("--finetune-steps", type=int, default=50, help="LC-QAT PTQ block tuning steps")
    ap.add_argument("--eval-windows", type=int, default=128)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--verbose", action="store_true")
    args = ap.parse_args()
    args.device = torch.device(args.device)
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)

    from cheers.llm import LLM

    train_data, held = load_corpus(args.corpus, args.max_bytes)
    cfg = LLMConfig(
        vocab_size=256, hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_hidden_layers=args.layers, num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads, max_position_embeddings=args.seq + 1, rope_theta=10000.0,
    )
    fp = LLM(cfg)
    fp.init_weights()
    fp = fp.to(args.device)
    n_params = sum(p.numel() for p in fp.parameters())
    print(f"corpus: {len(train_data) / 1e6:.2f} MB train, {len(held) / 1e6:.2f} MB held-out; model {n_params / 1e6:.2f} M parameters")
    t0 = time.time()
    train(fp, [{"params": list(fp.parameters()), "lr": args.lr}], train_data, args.steps, args, gen, "pretrain")
    pre_tokens = args.steps * args.batch * args.seq
    ppl_fp = perplexity(fp, held, args.seq, args.eval_windows, args.device)
    print(f"pretrained on {pre_tokens / 1e6:.2f} M tokens in {time.time() - t0:.0f}s; fp held-out perplexity {ppl_fp:.3f}")

    def row(name: str, model: nn.Module, bits: float, budget: str, seconds: float) -> None:
        ppl = perplexity(model, held, args.seq, args.eval_windows, args.device)
        print(f"{budget:>8} {name:<18} {bits:5.2f} {ppl:10.3f} {ppl / ppl_fp:7.3f} {seconds:7.0f}", flush=True)

    print(f"{'budget':>8} {'method':<18} {'bits':>5} {'perplexity':>10} {'/ fp':>7} {'time s':>7}")
    row("fp", fp, 16.0, "-", 0)
    for g in (64, 128):
        t = time.time()
        model, rep = quantize_model(copy.deepcopy(fp), None, "rtn", group_size=g, progress=False)
        row(f"RTN g{g}", model, rep.bits_per_weight, "-", time.time() - t)
    for frac in (float(f) for f in args.budgets.split(",")):
        tokens = frac * pre_tokens
        n_seq = max(1, round(tokens / args.seq))
        calib = [sample_batch(train_data, min(16, n_seq - i), args.seq, gen)[:, :-1] for i in range(0, n_seq, 16)]
        qat_steps = max(1, round(tokens / (args.batch * args.seq)))
        label = f"{100 * frac:g}%"

        t = time.time()
        model, rep = quantize_model(copy.deepcopy(fp), calib, "gptq", group_size=64, progress=False)
        row("GPTQ g64", model, rep.bits_per_weight, label, time.time() - t)

        t = time.time()
        model = copy.deepcopy(fp)
        apply_lsq(model, 64)
        train(model, qat_groups(model, args.qat_lr, args.theta_lr), train_data, qat_steps, args, gen, "lsq")
        row("LSQ-QAT g64", model, 2.5, label, time.time() - t)

        t = time.time()
        model, rep = quantize_model(copy.deepcopy(fp), calib, "lcqat", progress=False, finetune_steps=args.finetune_steps)
        row("LC-QAT PTQ", model, rep.bits_per_weight, label, time.time() - t)
        train(model, qat_groups(model, args.qat_lr, args.theta_lr), train_data, qat_steps, args, gen, "lcqat")
        row("LC-QAT PTQ+QAT", model, rep.bits_per_weight, label, time.time() - t)


if __name__ == "__main__":
    main()
