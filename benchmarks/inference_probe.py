"""Where GPU inference time goes, part by part (random weights, ``cheers-1.5b`` dims, bf16).

    python benchmarks/inference_probe.py --device cuda

1. The pixel decoder (a 512 px VAE decoder, the largest part of a sampling step) in NCHW
   and channels-last layouts, with and without cuDNN autotuning.
2. One decoding step: the CUDA-graph replay alone, the whole per-token loop around it, and a
   profile of the eager (dynamic) step, to see what the host spends its time on.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from inference_speed import UND_PLACEHOLDER, build_config, build_model, parse_args, text_ids  # noqa: E402

from cheers.cuda_graphs import StaticDecoder  # noqa: E402
from cheers.decode_batch import pick_token  # noqa: E402
from cheers.engine import Engine  # noqa: E402


def cuda_ms(fn, reps: int = 10, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps


@torch.no_grad()
def probe_pixel_decoder(model, cfg, dtype) -> None:
    dec = model.tokenizer.pixel_decoder
    c, g = cfg.tokenizer.vae.latent_channels, cfg.latent_grid
    for batch in (1, 2):
        x = torch.randn(batch, c, g, g, device="cuda", dtype=dtype)
        for fmt in (torch.contiguous_format, torch.channels_last):
            dec.to(memory_format=fmt)
            xin = x.contiguous(memory_format=fmt)
            for bench in (False, True):
                torch.backends.cudnn.benchmark = bench
                ms = cuda_ms(lambda xin=xin: dec(xin))
                print(f"pixel decoder batch {batch}, {str(fmt).split('.')[-1]:18s} cudnn.benchmark={bench}: "
                      f"{ms:.2f} ms", flush=True)
    dec.to(memory_format=torch.contiguous_format)
    torch.backends.cudnn.benchmark = False


@torch.no_grad()
def probe_decode(model, cfg, args) -> None:
    gen = torch.Generator().manual_seed(0)
    ids = ([cfg.tokens.chat_start] + text_ids(cfg, 16, gen) + [cfg.tokens.im_start, UND_PLACEHOLDER,
           cfg.tokens.im_end] + text_ids(cfg, 16, gen))
    s = cfg.tokenizer.image_size
    image = torch.rand(3, s, s, generator=gen)
    engine = Engine(model)
    prefix = engine.prefill([ids], [[image]])
    n = 120
    dec = StaticDecoder(model.llm, prefix.cache, prefix.doc_ids, prefix.next_pos, n + 10)
    tok = torch.zeros(1, dtype=torch.long, device="cuda")
    for _ in range(3):  # eager warm-up, then capture
        logits = dec.step(tok)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(50):
        dec._step.graph.replay()
    torch.cuda.synchronize()
    print(f"decode: graph replay alone {(time.perf_counter() - t0) / 50 * 1e3:.3f} ms/token", flush=True)
    t0 = time.perf_counter()
    for _ in range(50):
        logits = dec.step(tok)
        tok = pick_token(logits, 0.0, 1.0)
        int(tok[0])  # the per-token sync that streaming does
    print(f"decode: step + pick + sync {(time.perf_counter() - t0) / 50 * 1e3:.3f} ms/token", flush=True)

    from torch.profiler import ProfilerActivity, profile

    eager = Engine(model, static=False)
    it = eager.decode_text([ids], [[image]], max_new_tokens=40, stop_ids={-1})
    for _ in range(5):
        next(it)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(10):
            int(next(it)[0])
    print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=22), flush=True)


def main() -> None:
    args = parse_args(sys.argv[1:] + ["--device", "cuda"] if "--device" not in sys.argv else sys.argv[1:])
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    cfg = build_config(args)
    model = build_model(cfg, torch.device(args.device), dtype)
    print(torch.cuda.get_device_name(), flush=True)
    probe_pixel_decoder(model, cfg, dtype)
    probe_decode(model, cfg, args)


if __name__ == "__main__":
    main()
