"""Packed LC-QAT layer vs a bf16 ``F.linear`` on the same GPU, same shapes, same run.

    python benchmarks/lcqat_kernels.py [--shapes 8192x8192,28672x8192] [--rows 1,8,64]

Prints, per shape (out x in) and activation rows: the bf16 time, the 2-bit product alone
(``lcq_matmul`` replayed from a CUDA graph: activation split, decode-GEMV for <= 8 rows or
decode + GEMM above), the whole layer (Hadamard
transforms and sign scaling included) eagerly and replayed from a CUDA graph, and the
speed-ups over bf16. Times are medians of ``triton.testing.do_bench`` (L2 flushed between
runs). Also checks the kernel against the PyTorch reference. Needs CUDA and Triton.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from cheers.lcqat.kernels import lcq_matmul, reference_lcq_matmul, triton_available
from cheers.lcqat.pack import PackedLCQLinear


def _graphed(fn, *args):
    """A CUDA-graph replay of ``fn(*args)`` (static inputs): launch overhead removed."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn(*args)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn(*args)
    return graph.replay


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="8192x8192,28672x8192", help="out x in, comma separated")
    ap.add_argument("--rows", default="1,8,64", help="activation rows (batch x tokens)")
    args = ap.parse_args()
    if not triton_available():
        print("lcqat_kernels: needs a CUDA GPU and Triton; nothing measured")
        return
    from triton.testing import do_bench

    dev = torch.device("cuda")
    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}")
    print(f"{'shape':>12} {'rows':>4} | {'bf16 us':>8} {'GB/s':>6} | {'2bit core us':>12} {'x':>5} | "
          f"{'layer us':>8} {'x':>5} | {'graphed us':>10} {'x':>5} | max rel err")
    for shape in args.shapes.split(","):
        m, n = (int(s) for s in shape.lower().split("x"))
        w = torch.randn(m, n, device=dev, dtype=torch.bfloat16) / n**0.5
        layer = PackedLCQLinear(n, m, bias=False, device=dev)
        layer.codes.copy_(torch.randint(0, 256, layer.codes.shape, dtype=torch.uint8, device=dev))
        layer.A.copy_(torch.eye(4) / 1.25**0.5)
        layer.b.fill_(-1.5 / 1.25**0.5)
        layer.SU.copy_(torch.randint(0, 2, (n,), device=dev) * 2.0 - 1.0)
        layer.SV.copy_((torch.randint(0, 2, (m,), device=dev) * 2.0 - 1.0) / n**0.5)
        for rows in (int(r) for r in args.rows.split(",")):
            _measure(do_bench, shape, layer, w, rows)


def _measure(do_bench, shape: str, layer: PackedLCQLinear, w: torch.Tensor, rows: int) -> None:
    """One table row: bf16 vs the 2-bit product (graphed) vs the whole layer, eager and graphed."""
    m, n = w.shape
    x = torch.randn(rows, n, device=w.device, dtype=torch.bfloat16)
    xt = torch.randn(rows, n, device=w.device)
    ref = reference_lcq_matmul(xt, layer.codes, layer.A, layer.b)
    got = lcq_matmul(xt, layer.codes, layer.A, layer.b, out_dtype=torch.bfloat16).float()
    err = float((got - ref).abs().max() / ref.abs().max())
    t_bf16 = do_bench(lambda: F.linear(x, w), return_mode="median") * 1e3
    core = _graphed(lcq_matmul, xt, layer.codes, layer.A, layer.b, torch.bfloat16)
    t_core = do_bench(core, return_mode="median") * 1e3
    with torch.no_grad():
        t_layer = do_bench(lambda: layer(x), return_mode="median") * 1e3
        t_graph = do_bench(_graphed(layer, x), return_mode="median") * 1e3
    gbs = 2 * m * n / t_bf16 / 1e3
    print(f"{shape:>12} {rows:>4} | {t_bf16:8.1f} {gbs:6.0f} | {t_core:12.1f} {t_bf16 / t_core:5.2f} | "
          f"{t_layer:8.1f} {t_bf16 / t_layer:5.2f} | {t_graph:10.1f} {t_bf16 / t_graph:5.2f} | {err:.1e}", flush=True)

if __name__ == "__main__":
    main()
