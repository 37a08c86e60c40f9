"""Inference speed: text-to-image sampling and text decoding, ours against a naive baseline.

    python benchmarks/inference_speed.py                                       # CPU, debug dims (seconds)
    python benchmarks/inference_speed.py --hidden 256 --layers 4 --size 128    # CPU, bigger dims (~1 min)
    python benchmarks/inference_speed.py --device cuda --dtype bf16            # GPU, cheers-1.5b dims, 512 px
    python benchmarks/inference_speed.py ... --out figures.json                # the figures as JSON

Both paths run in the same process on the same random-weight model (built on the meta device,
then ``to_empty`` + ``init_weights()``), with the same prompts, noise, steps and CFG scale:

- **ours**: ``cheers.engine.Engine``. T2I: the prompt's KV cache is computed once and reused at
  every step, the conditional and unconditional branches run as one batch, the pixel decoder and
  SigLIP run once per step on the shared ``xt``. Decoding: a KV cache, one token per step.
- **naive** (written here; what the official implementation does): every step re-runs the whole
  prompt + image block through the LLM, the conditional then the unconditional branch, each
  re-running the pixel decoder and SigLIP on the same ``xt``. Decoding re-runs the full sequence
  for every new token. The baseline is given two favours: the prompt embeddings (the dummy
  image's tokens included) and the understanding image's tokens are computed once, not per call.

Printed: images/s (prompt encoding, sampling and the final VAE decode) and decode tokens/s of
both, their ratio, the max abs difference between the latents of the two samplers and whether
the decoded tokens agree, and the per-part time of one sampling step (pixel decoder, SigLIP +
compressor, LLM over the image block, flow head) timed with CUDA events on a GPU. Absolute
times only mean something on a GPU; name the card when quoting them. The latents agree to
~1e-5 in fp32; in bf16 the two paths round differently and CFG amplifies it (about 0.3 after one
step at the ``cheers-1.5b`` widths), so check equality in fp32.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import statistics
import sys
import time
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from cheers.attention import build_dense_mask  # noqa: E402
from cheers.config import ModelConfig, flavour, from_dict, to_dict  # noqa: E402
from cheers.engine import Engine  # noqa: E402
from cheers.flow_head import transport  # noqa: E402
from cheers.model import CheersModel  # noqa: E402
from cheers.sequence import UND_PLACEHOLDER, expand_placeholders, null_prompt, pack, prepend_image  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


# --------------------------------------------------------------------------- setup


def build_config(args) -> ModelConfig:
    """The named flavour with the explicit dimension flags applied on top."""
    d = to_dict(flavour(args.flavour))
    llm, tok, head = d["llm"], d["tokenizer"], d["head"]
    if args.hidden is not None:
        llm["hidden_size"] = args.hidden
        llm["intermediate_size"] = args.intermediate or 3 * args.hidden
        llm["head_dim"] = None
    elif args.intermediate is not None:
        llm["intermediate_size"] = args.intermediate
    if args.heads is not None or args.hidden is not None:
        llm["num_attention_heads"] = args.heads or max(1, llm["hidden_size"] // 64)
        llm["num_key_value_heads"] = min(args.kv_heads or 2, llm["num_attention_heads"])
        llm["head_dim"] = None
        head["stage_a_heads"] = llm["num_attention_heads"]
        head["stage_a_kv_heads"] = llm["num_key_value_heads"]
    if args.layers is not None:
        llm["num_hidden_layers"] = args.layers
    if args.vocab is not None:
        llm["vocab_size"] = args.vocab
    if args.size is not None:
        tok["image_size"] = tok["siglip"]["image_size"] = args.size
    if args.siglip_hidden is not None:
        tok["siglip"]["hidden_size"] = args.siglip_hidden
        tok["siglip"]["intermediate_size"] = 4 * args.siglip_hidden
        tok["siglip"]["num_attention_heads"] = max(1, args.siglip_hidden // 64)
        head["stage_b_heads"] = tok["siglip"]["num_attention_heads"]
        head["stage_b_kv_heads"] = min(2, head["stage_b_heads"])
    if args.siglip_layers is not None:
        tok["siglip"]["num_hidden_layers"] = args.siglip_layers
    grid = tok["image_size"] // tok["siglip"]["patch_size"]
    n = (grid // 2) ** 2  # LLM tokens per image
    need = max(args.prompt_len + 2 * n, args.decode_prompt_len + 3 + n + args.new_tokens) + 64
    llm["max_position_embeddings"] = max(llm["max_position_embeddings"], need)
    d["max_seq_len"] = max(d["max_seq_len"], need)
    return from_dict(ModelConfig, d)


def build_model(cfg: ModelConfig, device: torch.device, dtype: torch.dtype) -> CheersModel:
    """Random weights, fast at any size: meta build, ``to_empty``, ``init_weights``."""
    with torch.device("meta"):
        model = CheersModel(cfg).to(dtype)
    model.to_empty(device=device)
    model.init_weights()
    # Zero-initialised matrices (the head's output layers, adaLN gates, the detail gate) would
    # make the velocity 0 and the two samplers trivially equal: give them random values too.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2 and not p.any():
                p.normal_(0.0, 0.02)
    return model.eval()


def text_ids(cfg: ModelConfig, n: int, gen: torch.Generator) -> list[int]:
    """n random ordinary token ids (no special id)."""
    specials = set(dataclasses.astuple(cfg.tokens))
    lo, hi = 8, min(cfg.llm.vocab_size, 151643)
    out = []
    while len(out) < n:
        tok = int(torch.randint(lo, hi, (1,), generator=gen))
        if tok not in specials:
            out.append(tok)
    return out


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextmanager
def stopwatch(device: torch.device, out: dict, key: str):
    sync(device)
    t0 = time.perf_counter()
    yield
    sync(device)
    out[key] = time.perf_counter() - t0


class PartTimer:
    """Per-part times of repeated runs: CUDA events on a GPU, wall clock (synchronised) on a CPU.
    A part timed twice in one repetition (the naive sampler's two branches) is summed."""

    def __init__(self, device: torch.device):
        self.device = device
        self.cuda = device.type == "cuda"
        self.rep = 0
        self.pending: list[tuple[int, str, object, object]] = []
        self.ms: dict[str, dict[int, float]] = defaultdict(lambda: defaultdict(float))

    @contextmanager
    def __call__(self, name: str):
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            yield
            end.record()
            self.pending.append((self.rep, name, start, end))
        else:
            t0 = time.perf_counter()
            yield
            self.ms[name][self.rep] += (time.perf_counter() - t0) * 1e3

    def medians(self) -> dict[str, float]:
        sync(self.device)
        for rep, name, start, end in self.pending:
            self.ms[name][rep] += start.elapsed_time(end)
        self.pending.clear()
        return {name: statistics.median(reps.values()) for name, reps in self.ms.items()}


# --------------------------------------------------------------------------- text to image


class NaiveT2I:
    """The baseline sampler: no cache, CFG branches one after the other, vision parts per branch."""

    def __init__(self, model: CheersModel, rows: list[list[int]], nulls: list[list[int]] | None,
                 dummies: list[torch.Tensor] | None, device: torch.device, dtype: torch.dtype):
        self.model, self.cfg = model, model.cfg
        self.device, self.dtype = device, dtype
        self.branches = [self._prompt(rows, dummies)]
        if nulls is not None:
            self.branches.append(self._prompt(nulls, dummies))

    @torch.no_grad()
    def _prompt(self, rows: list[list[int]], dummies: list[torch.Tensor] | None):
        """Prompt embeddings [B, P, D] (computed once: a favour to the baseline), and the
        positions and mask of prompt + image block."""
        model, cfg, n = self.model, self.cfg, self.cfg.tokens_per_image
        seqs = []
        for r, ids in enumerate(rows):
            seq = expand_placeholders(ids, None, cfg, [])
            if dummies is not None:
                seq = prepend_image(seq, dummies[r], n, cfg.tokens.pad)
            seqs.append(seq)
        batch = pack(seqs, cfg).to(self.device)
        if len({len(s) for s in seqs}) != 1:
            raise SystemExit("the naive sampler wants prompts of one length")
        tokens = None
        if batch.num_images:
            tokens, _ = model.image_tokens(model.tokenizer.encode(batch.images.to(self.dtype)))
        emb = model.embed(batch.input_ids, batch.image_index, batch.image_slot, tokens)
        b, p = batch.input_ids.shape
        length = p + n
        doc = torch.zeros(b, length, dtype=torch.long, device=self.device)
        block = torch.full((b, length), -1, dtype=torch.long, device=self.device)
        block[:, p:] = 0
        pos = torch.arange(length, device=self.device)[None].expand(b, -1)
        return emb, pos, build_dense_mask(doc, block)

    def branch(self, k: int, xt: torch.Tensor, t: float, timer: PartTimer | None = None) -> torch.Tensor:
        model, tok = self.model, self.model.tokenizer
        emb, pos, mask = self.branches[k]
        p = emb.shape[1]
        with _part(timer, "pixel_decoder"):
            pixels = tok.pixel_decoder(xt)
        with _part(timer, "siglip"):
            feats, patch = tok.siglip(pixels)
            tokens = tok.compressor(feats)
        with _part(timer, "llm"):
            hidden = model.llm.hidden_states(inputs_embeds=torch.cat([emb, tokens.to(emb.dtype)], 1),
                                             position_ids=pos, mask=mask)
        with _part(timer, "head"):
            tt = torch.full((xt.shape[0],), t, device=xt.device)
            return model.velocity(hidden[:, p:], tt, xt, patch)

    @torch.no_grad()
    def velocity(self, xt: torch.Tensor, t: float, cfg_scale: float, timer: PartTimer | None = None):
        v_cond = self.branch(0, xt, t, timer)
        if len(self.branches) == 1:
            return v_cond
        v_uncond = self.branch(1, xt, t, timer)
        return v_uncond + cfg_scale * (v_cond - v_uncond)

    @torch.no_grad()
    def sample(self, noise: torch.Tensor, *, steps: int, cfg_scale: float, shift: float) -> torch.Tensor:
        x = noise.to(self.device, self.dtype)
        return transport.sample_ode(lambda xt, t: self.velocity(xt, t, cfg_scale), x, steps=steps, shift=shift,
                                    official_last_step=self.cfg.transport.official_last_step)


@contextmanager
def _part(timer: PartTimer | None, name: str):
    if timer is None:
        yield
    else:
        with timer(name):
            yield


@torch.no_grad()
def ours_step_parts(engine: Engine, prefix, xt: torch.Tensor, t: float, cfg_scale: float,
                    timer: PartTimer) -> torch.Tensor:
    """``Engine.image_velocity`` split into its parts, each timed."""
    model, tok, n = engine.model, engine.model.tokenizer, engine.cfg.tokens_per_image
    rows, b, dev = prefix.doc_ids.shape[0], xt.shape[0], xt.device
    reps = rows // b
    with timer("pixel_decoder"):
        pixels = tok.pixel_decoder(xt)
    with timer("siglip"):
        feats, patch = tok.siglip(pixels)
        tokens = tok.compressor(feats)
    with timer("llm"):
        tokens, patch = tokens.repeat(reps, 1, 1), patch.repeat(reps, 1, 1)
        p = prefix.length
        doc = torch.cat([prefix.doc_ids, torch.zeros(rows, n, dtype=torch.long, device=dev)], 1)
        block = torch.cat([torch.full_like(prefix.doc_ids, -1), torch.zeros(rows, n, dtype=torch.long, device=dev)], 1)
        pos = prefix.next_pos[:, None] + torch.arange(n, device=dev)[None]
        hidden = model.llm.hidden_states(inputs_embeds=tokens, position_ids=pos,
                                         mask=build_dense_mask(doc, block, q_len=n), cache=prefix.cache)
        prefix.cache.crop(p)
    with timer("head"):
        v = model.velocity(hidden, torch.full((rows,), t, device=dev), xt.repeat(reps, 1, 1, 1), patch)
        if reps > 1:
            v = v[b:] + cfg_scale * (v[:b] - v[b:])
    return v


def bench_t2i(model: CheersModel, args, device: torch.device, dtype: torch.dtype) -> dict:
    cfg = model.cfg
    gen = torch.Generator().manual_seed(args.seed)
    rows = []
    for _ in range(args.batch):
        rows.append([cfg.tokens.chat_start] + text_ids(cfg, args.prompt_len - 2, gen) + [cfg.tokens.im_start])
    use_cfg = args.cfg != 1.0
    nulls = [null_prompt(r, cfg) for r in rows] if use_cfg else None
    s = cfg.tokenizer.image_size
    dummies = None
    if cfg.dummy_image_prefix:
        dummies = [torch.randint(0, 256, (3, s, s), generator=gen).float() / 255 for _ in rows]
    c, g = cfg.tokenizer.vae.latent_channels, cfg.latent_grid
    noise = torch.randn(args.batch, c, g, g, generator=gen).to(device, dtype)
    engine = Engine(model)  # on a GPU: fixed-shape steps replayed as CUDA graphs
    naive = NaiveT2I(model, rows, nulls, dummies, device, dtype)

    def ours(steps: int, eng: Engine = engine) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            lat = eng.sample_images(rows, nulls, noise=noise, steps=steps, cfg_scale=args.cfg,
                                    shift=args.shift, prefix_images=dummies)
            return lat, model.tokenizer.decode(lat)

    eager = Engine(model, static=False) if engine.static else None

    def baseline(steps: int) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            lat = naive.sample(noise, steps=steps, cfg_scale=args.cfg, shift=args.shift)
            return lat, model.tokenizer.decode(lat)

    ours(args.warmup_steps)
    baseline(args.warmup_steps)
    runs: dict[str, list[float]] = {"ours": [], "naive": []}
    if eager is not None:  # the same engine without CUDA graphs, to show what they bring
        ours(args.warmup_steps, eager)
        runs["ours_eager"] = []
    for _ in range(args.repeats):  # interleaved; the median of each is reported
        wall: dict[str, float] = {}
        with stopwatch(device, wall, "ours"):
            lat_ours, _ = ours(args.steps)
        with stopwatch(device, wall, "naive"):
            lat_naive, _ = baseline(args.steps)
        if eager is not None:
            with stopwatch(device, wall, "ours_eager"):
                lat_eager, _ = ours(args.steps, eager)
        for k in runs:
            runs[k].append(wall[k])
    wall = {k: statistics.median(v) for k, v in runs.items()}
    extra = {}
    if eager is not None:
        extra = {"ours_eager_s": wall["ours_eager"], "graphs_speedup": wall["ours_eager"] / wall["ours"],
                 "graphs_vs_eager_latent_max_abs_diff": float((lat_ours.float() - lat_eager.float()).abs().max())}

    # one sampling step, split into parts (median over repetitions)
    xt = noise.clone()
    t = 0.5
    t_ours, t_naive = PartTimer(device), PartTimer(device)
    with torch.no_grad():
        prefix = engine.prefill(rows + (nulls or []), [[] for _ in range(len(rows) * (2 if use_cfg else 1))],
                                (dummies + dummies) if (use_cfg and dummies) else dummies)
        v_ref = engine.image_velocity(prefix, xt, t, args.cfg)
        for rep in range(args.part_reps + 1):  # repetition 0: warm-up, dropped below
            t_ours.rep = t_naive.rep = rep
            v_parts = ours_step_parts(engine, prefix, xt, t, args.cfg, t_ours)
            v_naive = naive.velocity(xt, t, args.cfg, t_naive)
    parts_ours, parts_naive = (_drop_warmup(pt) for pt in (t_ours, t_naive))

    scale = float(lat_naive.float().abs().max())
    return {
        "batch": args.batch, "steps": args.steps, "cfg_scale": args.cfg, "shift": args.shift,
        "prompt_tokens": len(rows[0]) + (cfg.tokens_per_image if dummies else 0),
        "image_tokens": cfg.tokens_per_image,
        "ours_s": wall["ours"], "naive_s": wall["naive"], "ours_runs_s": runs["ours"], "naive_runs_s": runs["naive"],
        "ours_images_per_s": args.batch / wall["ours"], "naive_images_per_s": args.batch / wall["naive"],
        "speedup": wall["naive"] / wall["ours"],
        "latent_max_abs_diff": float((lat_ours.float() - lat_naive.float()).abs().max()),
        "latent_max_abs": scale,
        "latent_moved_max_abs": float((lat_naive.float() - noise.float()).abs().max()),  # not a no-op
        "step_velocity_max_abs_diff": float((v_parts.float() - v_naive.float()).abs().max()),
        "step_parts_check": float((v_parts.float() - v_ref.float()).abs().max()),
        "step_ms_ours": parts_ours, "step_ms_naive": parts_naive, **extra,
    }


def _drop_warmup(timer: PartTimer) -> dict[str, float]:
    timer.medians()  # resolves CUDA events into timer.ms
    out = {}
    for name, reps in timer.ms.items():
        kept = [v for r, v in reps.items() if r > 0]
        out[name] = statistics.median(kept)
    out["total"] = sum(out.values())
    return out


# --------------------------------------------------------------------------- decoding


def bench_decode(model: CheersModel, args, device: torch.device, dtype: torch.dtype) -> dict:
    cfg, llm = model.cfg, model.llm
    gen = torch.Generator().manual_seed(args.seed + 1)
    half = args.decode_prompt_len // 2
    ids = ([cfg.tokens.chat_start] + text_ids(cfg, half, gen) + [cfg.tokens.im_start, UND_PLACEHOLDER,
           cfg.tokens.im_end] + text_ids(cfg, args.decode_prompt_len - half, gen))
    s = cfg.tokenizer.image_size
    image = torch.rand(3, s, s, generator=gen)
    engine = Engine(model, compile=args.compile_decode)  # on a GPU: fixed-shape steps as CUDA graphs
    eager = Engine(model, static=False) if engine.static else None
    stop = {-1}  # never emitted: every run decodes exactly max_new_tokens

    def ours(n: int, times: dict | None = None, eng: Engine = engine) -> list[int]:
        out = []
        sync(device)
        t0 = time.perf_counter()
        for tok in eng.decode_text([ids], [[image]], max_new_tokens=n, stop_ids=stop):
            out.append(int(tok[0]))  # synchronises, as streaming to a terminal does
            if times is not None and len(out) == 1:
                times["first"] = time.perf_counter() - t0
        if times is not None:
            times["total"] = time.perf_counter() - t0
        return out

    @torch.no_grad()
    def naive(n: int, times: dict | None = None) -> list[int]:
        sync(device)
        t0 = time.perf_counter()
        batch = pack([expand_placeholders(ids, None, cfg, [image], [False])], cfg).to(device)
        tokens, _ = model.image_tokens(model.tokenizer.encode(batch.images.to(dtype)))  # once: a favour
        emb = model.embed(batch.input_ids, batch.image_index, batch.image_slot, tokens)
        doc, block = batch.doc_ids, batch.block_ids
        out = []
        for _ in range(n):
            hidden = llm.hidden_states(inputs_embeds=emb, mask=build_dense_mask(doc, block))
            nxt = llm.logits(hidden[:, -1]).argmax(-1)  # [1]
            out.append(int(nxt[0]))
            if times is not None and len(out) == 1:
                times["first"] = time.perf_counter() - t0
            emb = torch.cat([emb, llm.embed_tokens(nxt)[:, None]], 1)
            doc = torch.cat([doc, torch.zeros_like(doc[:, :1])], 1)
            block = torch.cat([block, torch.full_like(block[:, :1], -1)], 1)
        if times is not None:
            times["total"] = time.perf_counter() - t0
        return out

    ours(args.new_tokens if args.compile_decode else args.warmup_tokens)  # compiles for this length
    naive(args.warmup_tokens)
    runs: dict[str, list[dict]] = {"ours": [], "naive": []}
    if eager is not None:
        ours(args.warmup_tokens, eng=eager)
        runs["eager"] = []
    for _ in range(args.repeats):  # interleaved; the run of median total time is reported
        runs["ours"].append({})
        got = ours(args.new_tokens, runs["ours"][-1])
        runs["naive"].append({})
        ref = naive(args.new_tokens, runs["naive"][-1])
        if eager is not None:
            runs["eager"].append({})
            got_eager = ours(args.new_tokens, runs["eager"][-1], eager)
    med = {k: sorted(v, key=lambda t: t["total"])[len(v) // 2] for k, v in runs.items()}
    t_ours, t_naive = med["ours"], med["naive"]
    n = args.new_tokens

    def rate(t: dict) -> float:  # tokens after the first (which includes the prompt pass)
        return (n - 1) / (t["total"] - t["first"]) if n > 1 else float("nan")

    agree = next((i for i, (a, b) in enumerate(zip(got, ref)) if a != b), n)
    return {
        "prompt_tokens": len(expand_placeholders(ids, None, cfg, [image], [False])),
        "new_tokens": n,
        "ours_s": t_ours["total"], "naive_s": t_naive["total"],
        "ours_first_token_s": t_ours["first"], "naive_first_token_s": t_naive["first"],
        "ours_tokens_per_s": n / t_ours["total"], "naive_tokens_per_s": n / t_naive["total"],
        "ours_decode_tokens_per_s": rate(t_ours), "naive_decode_tokens_per_s": rate(t_naive),
        "speedup": t_naive["total"] / t_ours["total"],
        "tokens_identical": got == ref, "tokens_agree_prefix": agree,
        **({"eager_s": med["eager"]["total"], "eager_decode_tokens_per_s": rate(med["eager"]),
            "graphs_speedup": med["eager"]["total"] / t_ours["total"],
            "graphs_tokens_identical_to_eager": got == got_eager} if eager is not None else {}),
    }


# --------------------------------------------------------------------------- main


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default fp32 on cpu, bf16 on cuda")
    ap.add_argument("--flavour", choices=["debug", "cheers-1.5b"], default=None,
                    help="base dimensions (default: debug on cpu, cheers-1.5b on cuda)")
    dims = ap.add_argument_group("explicit dimensions (override the flavour)")
    dims.add_argument("--hidden", type=int, help="LLM width (intermediate 3x, heads width/64)")
    dims.add_argument("--intermediate", type=int)
    dims.add_argument("--layers", type=int, help="LLM layers")
    dims.add_argument("--heads", type=int)
    dims.add_argument("--kv-heads", type=int)
    dims.add_argument("--vocab", type=int)
    dims.add_argument("--size", type=int, help="image side in pixels (a multiple of 32)")
    dims.add_argument("--siglip-hidden", type=int)
    dims.add_argument("--siglip-layers", type=int)
    run = ap.add_argument_group("workload")
    run.add_argument("--steps", type=int, default=None, help="sampling steps (default 20 cpu, 80 cuda)")
    run.add_argument("--cfg", type=float, default=9.5, help="CFG scale")
    run.add_argument("--shift", type=float, default=0.5)
    run.add_argument("--batch", type=int, default=1, help="images sampled together")
    run.add_argument("--prompt-len", type=int, default=32, help="text tokens of the T2I prompt")
    run.add_argument("--decode-prompt-len", type=int, default=32, help="text tokens of the question (+ one image)")
    run.add_argument("--new-tokens", type=int, default=None, help="decoded tokens (default 48 cpu, 256 cuda)")
    run.add_argument("--warmup-steps", type=int, default=2)
    run.add_argument("--warmup-tokens", type=int, default=4)
    run.add_argument("--part-reps", type=int, default=None, help="repetitions of the per-part step timing")
    run.add_argument("--skip", choices=["t2i", "decode"], action="append", default=[])
    run.add_argument("--compile-decode", action="store_true", help="torch.compile the decoding step")
    run.add_argument("--repeats", type=int, default=None, help="timed runs of each path (default 3 cpu, 2 cuda)")
    run.add_argument("--threads", type=int, default=None,
                     help="torch CPU threads (default 1 on cpu: steadier on a shared machine)")
    run.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, help="write the figures as JSON here")
    args = ap.parse_args(argv)
    cuda = args.device.startswith("cuda")
    args.dtype = args.dtype or ("bf16" if cuda else "fp32")
    args.flavour = args.flavour or ("cheers-1.5b" if cuda else "debug")
    args.steps = args.steps or (80 if cuda else 20)
    args.new_tokens = args.new_tokens or (256 if cuda else 48)
    args.part_reps = args.part_reps or (20 if cuda else 5)
    args.repeats = args.repeats or (2 if cuda else 3)
    if args.threads is None and not cuda:
        args.threads = 1
    if args.steps < 1 or args.new_tokens < 1 or args.batch < 1 or args.prompt_len < 2:
        ap.error("--steps, --new-tokens and --batch must be >= 1, --prompt-len >= 2")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible")
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = DTYPES[args.dtype]
    torch.manual_seed(args.seed)
    cfg = build_config(args)
    model = build_model(cfg, device, dtype)
    n_params = sum(p.numel() for p in model.parameters())
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else (
        f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)")
    result = {
        "device": name, "dtype": args.dtype, "torch": torch.__version__, "flavour": args.flavour,
        "command": "python benchmarks/inference_speed.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "dims": {"llm_hidden": cfg.llm.hidden_size, "llm_layers": cfg.llm.num_hidden_layers,
                 "llm_heads": [cfg.llm.num_attention_heads, cfg.llm.num_key_value_heads],
                 "vocab": cfg.llm.vocab_size, "image_size": cfg.tokenizer.image_size,
                 "siglip_hidden": cfg.tokenizer.siglip.hidden_size,
                 "siglip_layers": cfg.tokenizer.siglip.num_hidden_layers,
                 "head_blocks": [cfg.head.stage_a_blocks, cfg.head.stage_b_blocks], "params": n_params},
    }
    print(f"{name}, {args.dtype}, torch {torch.__version__}; {args.flavour} base, LLM {cfg.llm.hidden_size} x "
          f"{cfg.llm.num_hidden_layers} layers, {cfg.tokenizer.image_size} px, {n_params / 1e6:.1f}M params")
    if "t2i" not in args.skip:
        r = result["t2i"] = bench_t2i(model, args, device, dtype)
        print(f"\ntext-to-image: batch {r['batch']}, {r['steps']} steps, CFG {r['cfg_scale']}, "
              f"prompt {r['prompt_tokens']} tokens + {r['image_tokens']} image tokens")
        print(f"  ours : {r['ours_s']:.3f} s = {r['ours_images_per_s']:.3f} images/s")
        print(f"  naive: {r['naive_s']:.3f} s = {r['naive_images_per_s']:.3f} images/s")
        print(f"  speed-up {r['speedup']:.2f}x; latents max abs diff {r['latent_max_abs_diff']:.2e} "
              f"(max |latent| {r['latent_max_abs']:.2f}, moved {r['latent_moved_max_abs']:.2f} from the noise); one-step velocity diff {r['step_velocity_max_abs_diff']:.2e}")
        if "ours_eager_s" in r:
            print(f"  ours without CUDA graphs: {r['ours_eager_s']:.3f} s (graphs {r['graphs_speedup']:.2f}x; "
                  f"latents max abs diff {r['graphs_vs_eager_latent_max_abs_diff']:.2e})")
        print("  one step, ms (ours | naive):")
        for part in ["pixel_decoder", "siglip", "llm", "head", "total"]:
            print(f"    {part:14s} {r['step_ms_ours'][part]:9.2f} | {r['step_ms_naive'][part]:9.2f}")
    if "decode" not in args.skip:
        r = result["decode"] = bench_decode(model, args, device, dtype)
        print(f"\ndecoding: batch 1, prompt {r['prompt_tokens']} tokens (one image), {r['new_tokens']} new tokens, greedy"
              + (", decoding step compiled" if args.compile_decode else ""))
        print(f"  ours : {r['ours_tokens_per_s']:.1f} tokens/s end to end, {r['ours_decode_tokens_per_s']:.1f} "
              f"after the first token ({r['ours_first_token_s'] * 1e3:.1f} ms)")
        print(f"  naive: {r['naive_tokens_per_s']:.1f} tokens/s end to end, {r['naive_decode_tokens_per_s']:.1f} "
              f"after the first token ({r['naive_first_token_s'] * 1e3:.1f} ms)")
        print(f"  speed-up {r['speedup']:.2f}x; tokens identical: {r['tokens_identical']} "
              f"(agree on the first {r['tokens_agree_prefix']})")
        if "eager_s" in r:
            print(f"  ours without CUDA graphs: {r['eager_decode_tokens_per_s']:.1f} tokens/s after the first "
                  f"(graphs {r['graphs_speedup']:.2f}x end to end; same tokens: {r['graphs_tokens_identical_to_eager']})")
    if device.type == "cuda":
        result["max_memory_gb"] = torch.cuda.max_memory_allocated(device) / 1e9
        print(f"\npeak memory {result['max_memory_gb']:.1f} GB")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
