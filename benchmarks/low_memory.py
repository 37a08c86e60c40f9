"""Inference in less memory: peak memory, speed and quality of fp32 / bf16 / int8 (and, on a GPU,
fp8 and CPU offload) against fp32 in the same run.

    python benchmarks/low_memory.py                                   # CPU, shapes dims, random weights
    python benchmarks/low_memory.py --llm-hidden 512 --llm-layers 8   # CPU, a wider LLM (int8 matters more)
    python benchmarks/low_memory.py --ckpt outputs/shapes-demo/checkpoint   # a trained checkpoint
    python benchmarks/low_memory.py --device cuda --flavour cheers-1.5b     # GPU: + fp8, offload model|sequential

Each setting runs in a fresh child process (peak memory is per process) that loads the checkpoint
with ``Pipeline.from_pretrained(dtype=, weights=, offload=)``, generates ``--images`` images and
decodes ``--tokens`` tokens greedily for each of ``--questions`` questions, then saves its images
and tokens. Printed per setting: the weights' bytes as stored, peak memory (CPU: the child's peak
resident set, and its rise above the set before loading; GPU: ``torch.cuda.max_memory_allocated``),
the memory held once the model is loaded (CPU: resident set after loading, above the start; GPU:
``torch.cuda.memory_allocated``), seconds per image, decode tokens/s, and
quality against fp32: the mean absolute pixel difference of the same-seed images (0-255) and the
share of greedy tokens equal to fp32's. The random-weight model (a fixed seed, zero-initialised
layers filled) is for memory and speed; quality figures mean more on a trained checkpoint.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

SETTINGS_CPU = ("fp32", "bf16", "int8")
SETTINGS_GPU = ("fp32", "bf16", "int8", "fp8", "offload-model", "offload-sequential")
QUESTIONS = ["What colour is the circle?", "How many shapes are there?", "Is there a square?",
             "What shape is on the left?"]


def make_checkpoint(folder: Path, flavour: str, hidden: int | None, layers: int | None) -> Path:
    """A random-weight checkpoint of ``flavour`` (LLM widened when asked) with a small BPE tokenizer."""
    from cheers.checkpoint import save_pretrained
    from cheers.config import flavour as get_flavour
    from cheers.debug_checkpoint import CORPUS
    from cheers.model import CheersModel
    from cheers.text_tokenizer import train_bpe

    tok = train_bpe(CORPUS * 4, vocab_size=320)
    base = get_flavour(flavour)
    llm = dataclasses.replace(base.llm, vocab_size=tok.vocab_size)
    if hidden is not None:
        heads = max(1, hidden // 64)
        llm = dataclasses.replace(llm, hidden_size=hidden, intermediate_size=4 * hidden, num_attention_heads=heads,
                                  num_key_value_heads=heads)
    if layers is not None:
        llm = dataclasses.replace(llm, num_hidden_layers=layers)
    cfg = dataclasses.replace(base, llm=llm, tokens=tok.special, flavour="custom")
    torch.manual_seed(0)
    model = CheersModel(cfg)
    model.init_weights()
    with torch.no_grad():  # zero-initialised final layers would make every image the same
        for p in model.parameters():
            if not p.any():
                p.normal_(std=0.05)
    save_pretrained(model, folder)
    tok.save(folder)
    return folder


def resident_bytes() -> int:
    """This process's resident set now (Linux ``/proc/self/statm``)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def child(args: argparse.Namespace) -> None:
    """One setting: load, time, save outputs, print one JSON line."""
    from PIL import Image

    from cheers.low_memory import weight_bytes
    from cheers.pipeline import Pipeline, load_image

    setting = args.child
    kw: dict = {"device": args.device}
    if setting == "bf16":
        kw["dtype"] = torch.bfloat16
    elif setting in ("int8", "fp8"):
        kw["weights"] = setting
    elif setting.startswith("offload-"):
        kw["offload"] = setting.split("-", 1)[1]
    cuda = args.device == "cuda"
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    resident_before = resident_bytes()
    t0 = time.perf_counter()
    pipe = Pipeline.from_pretrained(args.ckpt, **kw)
    load_s = time.perf_counter() - t0
    gc.collect()
    resident_loaded = resident_bytes() if not cuda else torch.cuda.memory_allocated()
    prompts = [f"a red circle above a blue square {i}" for i in range(args.images)]
    pipe.generate(prompts[:1], steps=2, batch_size=1)  # warm-up
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    images = pipe.generate(prompts, steps=args.steps, batch_size=args.images, seed=0)
    if cuda:
        torch.cuda.synchronize()
    s_per_image = (time.perf_counter() - t0) / args.images
    img = Image.new("RGB", (pipe.image_size, pipe.image_size), (200, 40, 40))
    tokens, seconds = [], 0.0
    for q in QUESTIONS[: args.questions]:
        ids = pipe.i2t_row(q, 1)
        pix = [load_image(img, pipe.image_size)]
        t0 = time.perf_counter()
        got = [int(t[0]) for t in pipe.engine.decode_text([ids], [pix], max_new_tokens=args.tokens, stop_ids=set())]
        if cuda:
            torch.cuda.synchronize()
        seconds += time.perf_counter() - t0
        tokens.append(got)
    out = Path(args.out)
    torch.save({"images": torch.stack([torch.tensor(list(im.getdata()), dtype=torch.uint8) for im in images]),
                "tokens": tokens}, out / f"{setting}.pt")
    peak = (torch.cuda.max_memory_allocated() if cuda
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    print(json.dumps({"setting": setting, "weight_bytes": weight_bytes(pipe.model), "peak_bytes": peak,
                      "resident_loaded": resident_loaded, "resident_before_load": resident_before,
                      "rss_before_load": rss_before, "load_s": load_s, "s_per_image": s_per_image,
                      "tokens_per_s": sum(map(len, tokens)) / seconds}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", type=Path, default=None, help="a checkpoint folder (default: a random-weight one)")
    ap.add_argument("--flavour", default="shapes", help="flavour of the random-weight checkpoint")
    ap.add_argument("--llm-hidden", type=int, default=None, help="widen the random checkpoint's LLM")
    ap.add_argument("--llm-layers", type=int, default=None)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--settings", nargs="+", default=None, help="default: every setting the device runs")
    ap.add_argument("--images", type=int, default=4)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--questions", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child is not None:
        return child(args)
    settings = args.settings or (SETTINGS_GPU if args.device == "cuda" else SETTINGS_CPU)
    if "fp32" not in settings:
        settings = ["fp32", *settings]  # the reference every other setting is compared with
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = args.ckpt or make_checkpoint(Path(tmp) / "ckpt", args.flavour, args.llm_hidden, args.llm_layers)
        rows = []
        for setting in settings:
            cmd = [sys.executable, __file__, "--child", setting, "--ckpt", str(ckpt), "--out", tmp,
                   "--device", args.device, "--images", str(args.images), "--steps", str(args.steps),
                   "--questions", str(args.questions), "--tokens", str(args.tokens)]
            res = subprocess.run(cmd, capture_output=True, text=True)
            if res.returncode:
                print(f"{setting}: failed\n{res.stderr[-2000:]}", file=sys.stderr)
                continue
            rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
        ref = torch.load(Path(tmp) / "fp32.pt")
        print(f"device: {args.device} ({platform.processor() or platform.machine()}, "
              f"{torch.get_num_threads()} threads); checkpoint: {args.ckpt or f'random {args.flavour}'}"
              f"{f', LLM {args.llm_hidden} wide' if args.llm_hidden else ''}"
              f"{f', {args.llm_layers} layers' if args.llm_layers else ''}; {args.images} images x "
              f"{args.steps} steps, {args.questions} questions x {args.tokens} tokens")
        base = next(r for r in rows if r["setting"] == "fp32")
        print("| setting | weights MB | peak MB | peak above start MB | / fp32 | loaded, above start MB | / fp32 | "
              "s / image | x fp32 | decode tok/s | image diff (0-255) | tokens equal to fp32 |")
        print("|---|---|---|---|---|---|---|---|---|---|---|---|")
        start = {r["setting"]: r["rss_before_load"] if args.device == "cpu" else 0 for r in rows}
        above = {k: r["peak_bytes"] - start[k] for k, r in ((r["setting"], r) for r in rows)}
        held = {r["setting"]: r["resident_loaded"] - (r["resident_before_load"] if args.device == "cpu" else 0)
                for r in rows}
        for r in rows:
            got = torch.load(Path(tmp) / f"{r['setting']}.pt")
            diff = (got["images"].float() - ref["images"].float()).abs().mean().item()
            pairs = [(a, b) for ta, tb in zip(got["tokens"], ref["tokens"]) for a, b in zip(ta, tb)]
            agree = sum(a == b for a, b in pairs) / max(1, len(pairs))
            print(f"| {r['setting']} | {r['weight_bytes'] / 2**20:.1f} | {r['peak_bytes'] / 2**20:.0f} | "
                  f"{above[r['setting']] / 2**20:.0f} | {above[r['setting']] / above['fp32']:.2f} | "
                  f"{held[r['setting']] / 2**20:.0f} | {held[r['setting']] / held['fp32']:.2f} | {r['s_per_image']:.3f} | "
                  f"{r['s_per_image'] / base['s_per_image']:.2f} | {r['tokens_per_s']:.1f} | {diff:.2f} | {agree:.0%} |")
        if args.device == "cpu":
            print(f"(CPU peak: the process's resident set; before loading the model it was "
                  f"{base['rss_before_load'] / 2**20:.0f} MB: Python, torch and the imported libraries)")


if __name__ == "__main__":
    main()
