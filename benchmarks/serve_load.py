"""Load on ``cheers serve`` over loopback: batched serving against one request at a time.

    python benchmarks/serve_load.py                                  # debug checkpoint, 8 clients, 25 s per mode
    python benchmarks/serve_load.py --ckpt ~/.cache/cheers/shapes-demo --seconds 60
    python benchmarks/serve_load.py ... --out figures.json           # the figures as JSON
    python benchmarks/serve_load.py --modes --abandon-seconds 30     # only the clients-who-leave run

It starts ``cheers serve`` once per mode, each in its own process on a free loopback port. ``N``
clients (threads, one connection each) send requests back to back, so at most ``N`` are in
flight: a mix of chat completions (an image and a question, ``--max-tokens`` tokens, greedy)
and image generations (one image, ``--steps`` steps). Each mode gets ``T`` seconds of load, in
``--rounds`` phases that alternate between the modes (an idle server uses no CPU), so a change
in the machine's other load weighs on both alike. The modes:

- **sequential**: ``--max-batch 1``: one request at a time, in arrival order;
- **batched**: the default scheduler: concurrent image requests share sampler batches and chats
  decode together (continuous batching).

Then the **abandon** run, on one batched server: the same closed loop with a third of the
clients leaving every request after ``--leave-after`` seconds (they hang up and send the next),
alternating with rounds where nobody leaves. Printed: requests/s and p50 / p99 latency of the
clients who stay, in both, and the server's count of cancelled requests: work cancelled for the
clients who left must not cost the others.

Printed per mode: requests/s, p50 and p99 latency (all requests and per kind), errors (any
answer other than 200 under load), the server's resident memory (RSS) after start-up and after
the load, and its batching counters. Then a burst of more requests than the queue holds
provokes 429s on purpose: counted apart, with any other failure counted as an error. Without
``--ckpt`` it serves a random debug checkpoint (its chats run to ``--max-tokens``; no answer
stops early). Name the machine when quoting the figures.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import platform
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

MODES = {"sequential": ["--max-batch", "1"], "batched": []}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mib(pid: int) -> float | None:
    """Resident memory of a process (Linux /proc), MiB."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def image_uri(seed: int) -> str:
    rng = random.Random(seed)
    img = Image.new("RGB", (96, 96), (128, 128, 128))
    colour = tuple(rng.randrange(256) for _ in range(3))
    ImageDraw.Draw(img).ellipse((20, 20, 76, 76), fill=colour)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


class Server:
    """``cheers serve`` in its own process."""

    def __init__(self, ckpt: Path, extra: list[str], queue_size: int, log: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        cmd = [sys.executable, "-m", "cheers.cli", "serve", "--ckpt", str(ckpt), "--port", str(self.port),
               "--queue-size", str(queue_size), "--log-level", "warning", *extra]
        self.proc = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, cwd=ROOT)
        deadline = time.monotonic() + 180
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"cheers serve exited:\n{log.read_text()[-3000:]}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"cheers serve did not come up:\n{log.read_text()[-3000:]}")
            time.sleep(0.2)

    def health(self) -> dict:
        return httpx.get(self.url + "/health", timeout=10).json()

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def request(client: httpx.Client, kind: str, k: int, args, model: str,
            timeout: httpx.Timeout | None = None) -> httpx.Response:
    """One request; ``timeout`` replaces the client's (a read timeout is how a client leaves)."""
    kw = {} if timeout is None else {"timeout": timeout}
    if kind == "chat":
        messages = [{"role": "user", "content": [{"type": "text", "text": "What colour is the circle?"},
                                                 {"type": "image_url", "image_url": {"url": image_uri(k)}}]}]
        return client.post("/v1/chat/completions", json={"model": model, "messages": messages, "temperature": 0,
                                                         "max_tokens": args.max_tokens}, **kw)
    return client.post("/v1/images/generations", json={"model": model, "prompt": "a photo of a red circle", "n": 1,
                                                       "seed": k, "steps": args.steps, "response_format": "b64_json"},
                       **kw)


LEFT = -3  # the status recorded for a request whose client hung up on purpose


def run_load(server: Server, args, model: str, seconds: float, seed: int,
             leave_share: float = 0.0) -> tuple[list, float]:
    """``args.clients`` closed-loop clients for ``seconds`` -> ([(kind, status, latency)], wall
    time). A request is left ``leave_share`` of the time: its client hangs up after
    ``args.leave_after`` s (status ``LEFT``) and the loop's next client takes its place."""
    records: list[tuple[str, int, float]] = []
    lock = threading.Lock()
    stop_at = time.monotonic() + seconds
    leave = httpx.Timeout(600, read=args.leave_after)

    def client_loop(c: int) -> None:
        rng = random.Random(seed * 1000 + c)
        leaves = random.Random(seed * 1000 + c + 500)  # apart, so both runs send the same kinds
        with httpx.Client(base_url=server.url, timeout=600) as client:
            k = 0
            while time.monotonic() < stop_at:
                kind = "chat" if rng.random() < args.chat_share else "image"
                left = leaves.random() < leave_share
                t0 = time.monotonic()
                try:
                    status = request(client, kind, (seed * 1000 + c) * 100_000 + k, args, model,
                                     timeout=leave if left else None).status_code
                except httpx.ReadTimeout:
                    status = LEFT if left else -1
                except httpx.HTTPError:
                    status = -1
                with lock:
                    records.append((kind, status, time.monotonic() - t0))
                k += 1

    t0 = time.monotonic()
    with ThreadPoolExecutor(args.clients) as pool:
        list(pool.map(client_loop, range(args.clients)))
    return records, time.monotonic() - t0


def summarise(records: list, wall: float) -> dict:
    ok = [r for r in records if r[1] == 200]

    def pct(values: list[float], q: float) -> float | None:
        if not values:
            return None
        values = sorted(values)
        return values[min(len(values) - 1, round(q * (len(values) - 1)))]

    out = {"wall_s": wall, "requests": len(ok), "requests_per_s": len(ok) / wall,
           "errors": len(records) - len(ok), "statuses": sorted({r[1] for r in records})}
    for kind in ("all", "chat", "image"):
        lat = [r[2] for r in ok if kind in ("all", r[0])]
        out[kind] = {"n": len(lat), "p50_s": pct(lat, 0.5), "p99_s": pct(lat, 0.99),
                     "mean_s": statistics.fmean(lat) if lat else None}
    return out


def provoke_429(server: Server, args, model: str, queue_size: int) -> dict:
    """More simultaneous requests than the queue holds: the extra ones must get 429."""
    burst = queue_size + 2 * args.clients

    def one(k: int) -> int:
        with httpx.Client(base_url=server.url, timeout=600) as client:
            try:
                r = request(client, "chat", k, args, model)
            except httpx.HTTPError:
                return -1
            if r.status_code == 429 and not r.headers.get("retry-after"):
                return -2  # a 429 without Retry-After counts as an error
            return r.status_code

    with ThreadPoolExecutor(burst) as pool:
        codes = list(pool.map(one, range(burst)))
    return {"sent": burst, "ok": codes.count(200), "rejected_429": codes.count(429),
            "errors": sum(1 for c in codes if c not in (200, 429))}


def measure_abandon(ckpt: Path, args, workdir: Path) -> dict:
    """One batched server; rounds alternate between nobody leaving and a third of the requests
    left after ``args.leave_after`` s. Figures of the requests whose clients stayed."""
    server = Server(ckpt, MODES["batched"], 2 * args.clients, workdir / "serve-abandon.log")
    try:
        model = server.health()["model"]
        with httpx.Client(base_url=server.url, timeout=600) as client:
            for kind in ("chat", "image"):
                request(client, kind, 0, args, model).raise_for_status()
        runs = {"nobody_leaves": 0.0, "third_leaves": 1 / 3}
        records: dict[str, list] = {name: [] for name in runs}
        wall = dict.fromkeys(runs, 0.0)
        counted = ("cancelled", "prefills", "image_rows", "decode_steps")  # what the model did, per run
        work = {name: dict.fromkeys(counted, 0) for name in runs}
        for r in range(args.rounds):
            for name, n in runs.items():
                before = server.health()["stats"]
                got, seconds = run_load(server, args, model, args.abandon_seconds / args.rounds, seed=100 + r,
                                        leave_share=n)
                records[name] += got
                wall[name] += seconds
                time.sleep(1.0)  # the abandoned requests' cancellation is counted by now
                after = server.health()["stats"]
                for key in counted:
                    work[name][key] += after[key] - before[key]
        out = {"clients": args.clients, "leave_after_s": args.leave_after}
        for name in runs:
            staying = [rec for rec in records[name] if rec[1] != LEFT]
            left = sum(1 for rec in records[name] if rec[1] == LEFT)
            out[name] = {**summarise(staying, wall[name]), "abandoned": left, "server": work[name]}
        return out
    finally:
        server.stop()


def measure(modes: list[str], ckpt: Path, args, workdir: Path) -> dict:
    """Every mode's server up at once (an idle one uses no CPU); load phases alternate between
    them over ``args.rounds`` rounds, so a change in the machine's other load hits both."""
    queue_size = 2 * args.clients  # the closed loop never fills it; the burst does
    servers: dict[str, Server] = {}
    try:
        for mode in modes:
            servers[mode] = Server(ckpt, MODES[mode], queue_size, workdir / f"serve-{mode}.log")
        model = servers[modes[0]].health()["model"]
        rss_before = {}
        for mode, server in servers.items():
            with httpx.Client(base_url=server.url, timeout=600) as client:
                for kind in ("chat", "image"):  # warm-up, not timed
                    request(client, kind, 0, args, model).raise_for_status()
            rss_before[mode] = rss_mib(server.proc.pid)
        records: dict[str, list] = {mode: [] for mode in modes}
        wall = dict.fromkeys(modes, 0.0)
        for r in range(args.rounds):
            for mode in modes:
                got, seconds = run_load(servers[mode], args, model, args.seconds / args.rounds, seed=r)
                records[mode] += got
                wall[mode] += seconds
        results = {}
        for mode, server in servers.items():
            results[mode] = {"mode": mode, **summarise(records[mode], wall[mode]),
                             "rss_mib_before": rss_before[mode], "rss_mib_after": rss_mib(server.proc.pid),
                             "burst": provoke_429(server, args, model, queue_size),
                             "server_stats": server.health()["stats"]}
        return results
    finally:
        for server in servers.values():
            server.stop()


def fmt(x: float | None, unit: str = "s") -> str:
    return "n/a" if x is None else f"{x:.2f} {unit}" if unit else f"{x:.2f}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", type=Path, default=None, help="checkpoint folder (default: a random debug one)")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=25.0, help="load time per mode")
    ap.add_argument("--chat-share", type=float, default=0.5, help="fraction of requests that are chats")
    ap.add_argument("--max-tokens", type=int, default=32, help="tokens per chat answer")
    ap.add_argument("--steps", type=int, default=10, help="sampler steps per generated image")
    ap.add_argument("--rounds", type=int, default=3, help="load phases per mode, alternating between the modes")
    ap.add_argument("--modes", nargs="*", choices=list(MODES), default=list(MODES))
    ap.add_argument("--abandon-seconds", type=float, default=None,
                    help="load time of each side of the abandon run (default: --seconds; 0 skips it)")
    ap.add_argument("--leave-after", type=float, default=0.2, help="seconds before a leaving client hangs up")
    ap.add_argument("--out", type=Path, default=None, help="also write the figures here as JSON")
    args = ap.parse_args(argv)
    args.abandon_seconds = args.seconds if args.abandon_seconds is None else args.abandon_seconds
    for name in ("clients", "seconds", "max_tokens", "steps", "rounds", "leave_after"):
        if getattr(args, name) <= 0:
            ap.error(f"--{name.replace('_', '-')} must be > 0")
    if args.abandon_seconds < 0:
        ap.error("--abandon-seconds must be >= 0")
    if not args.modes and not args.abandon_seconds:
        ap.error("nothing to run: no --modes and --abandon-seconds 0")
    if not 0 <= args.chat_share <= 1:
        ap.error("--chat-share must be in [0, 1]")
    if args.ckpt is not None and not args.ckpt.is_dir():
        ap.error(f"checkpoint folder not found: {args.ckpt}")

    import torch

    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__} "
          f"({torch.get_num_threads()} threads), python {platform.python_version()}")
    print(f"load: {args.clients} clients x {args.seconds:.0f} s per mode ({', '.join(args.modes) or 'none'}) and "
          f"{args.abandon_seconds:.0f} s per side of the abandon run, in {args.rounds} alternating rounds, "
          f"chat share {args.chat_share}, chat {args.max_tokens} tokens, images {args.steps} steps")
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        ckpt = args.ckpt
        if ckpt is None:
            from cheers.debug_checkpoint import make_debug_checkpoint

            ckpt = workdir / "debug-checkpoint"
            make_debug_checkpoint(ckpt)
        print(f"checkpoint: {ckpt if args.ckpt else 'random debug checkpoint'}")
        results = measure(args.modes, ckpt, args, workdir) if args.modes else {}
        abandon = measure_abandon(ckpt, args, workdir) if args.abandon_seconds else None
        for mode, r in results.items():
            s = r["server_stats"]
            print(f"\n[{mode}] {r['requests']} requests in {r['wall_s']:.1f} s: {r['requests_per_s']:.3f} requests/s, "
                  f"errors {r['errors']}")
            for kind in ("all", "chat", "image"):
                k = r[kind]
                print(f"  {kind:5s} n={k['n']:4d}  p50 {fmt(k['p50_s'])}  p99 {fmt(k['p99_s'])}")
            print(f"  server RSS: {fmt(r['rss_mib_before'], 'MiB')} before, {fmt(r['rss_mib_after'], 'MiB')} after")
            print(f"  batching: {s['sampler_calls']} sampler calls for {s['image_rows']} images (largest batch "
                  f"{s['largest_image_batch']}), {s['decode_steps']} decode steps (largest chat batch "
                  f"{s['largest_chat_batch']})")
            b = r["burst"]
            print(f"  burst of {b['sent']}: {b['ok']} served, {b['rejected_429']} refused with 429 (on purpose), "
                  f"errors {b['errors']}")
    if abandon is not None:
        stay, leave = abandon["nobody_leaves"], abandon["third_leaves"]
        print(f"\n[abandon] {abandon['clients']} clients; a third of the requests are left after "
              f"{args.leave_after:g} s "
              "(the client hangs up, the next takes its place), in rounds alternating with rounds where nobody "
              "leaves; figures of the requests whose clients stayed:")
        for name, r in (("nobody leaves", stay), ("a third leave", leave)):
            print(f"  {name:14s} {r['requests']:4d} requests in {r['wall_s']:.1f} s: "
                  f"{r['requests_per_s']:.3f} requests/s, "
                  f"p50 {fmt(r['all']['p50_s'])}, p99 {fmt(r['all']['p99_s'])}, errors {r['errors']}; "
                  f"abandoned {r['abandoned']}")
            w = r["server"]
            print(f"  {'':14s} server: {w['cancelled']} cancelled, {w['prefills']} chat prefills, "
                  f"{w['decode_steps']} decode steps, {w['image_rows']} images sampled")
        ratio = leave["requests_per_s"] / max(stay["requests_per_s"], 1e-9)
        print(f"  requests/s of the clients who stayed, a third leave / nobody leaves: {ratio:.2f}x")
        abandon["staying_ratio"] = ratio
        results["abandon"] = abandon
    if "sequential" in results and "batched" in results:
        ratio = results["batched"]["requests_per_s"] / max(results["sequential"]["requests_per_s"], 1e-9)
        print(f"\nbatched / sequential requests/s: {ratio:.2f}x")
        results["batched_over_sequential"] = ratio
    if args.out:
        args.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, **results}, indent=2))
    errors = sum(r["errors"] + r["burst"]["errors"] for r in results.values() if isinstance(r, dict) and "burst" in r)
    if abandon is not None:
        errors += abandon["nobody_leaves"]["errors"] + abandon["third_leaves"]["errors"]
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
