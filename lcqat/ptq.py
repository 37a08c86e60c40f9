"""Post-training quantization: Hessians from calibration data, block-LDL rounding, block tuning.

Steps for each transformer block, in order (``quantize_sequential``):
1. Hessians ``E[x x^T]`` of every selected linear's input, collected with forward hooks while
   the block runs on its (already quantized upstream) calibration inputs.
2. Each linear is rounded by a layer-specific function (LC-QAT: ``lcq_ptq_layer``; GPTQ:
   ``cheers.lcqat.baselines.gptq_layer``) and swapped in place.
3. LC-QAT only: the continuous parameters (SU, SV, A, b, biases, norms; optionally theta) are
   fine-tuned with Adam against the full-precision block's outputs (relative MSE).
4. The block's finished state is saved in ``state_dir`` (if given): a restart skips it.

Blocks are the entries of the ``nn.ModuleList`` that holds most of the selected linears (a
transformer's layer list); a model with none is treated as one block. Linears outside the
blocks are rounded at the end from Hessians of one more calibration pass.
"""

from __future__ import annotations

import copy
import json
import math
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from cheers.errors import CheckpointError, InputError

from .hadamard import hadamard_transform
from .lcq_linear import (
    VEC,
    LCQConfig,
    LCQLinear,
    codebook,
    index_to_codes,
    nearest_codes,
    set_submodule,
)

# --------------------------------------------------------------------------- Hessians


class HessianCollector:
    """Accumulates ``E[x x^T]`` of the inputs of some linear layers through forward pre-hooks.

    Use as a context manager; ``hessian(name)`` is the (undamped) mean outer product
    ``[n, n]`` float32 over every input row seen.
    """

    def __init__(self, modules: dict[str, nn.Module]) -> None:
        self.modules = modules
        self.sums: dict[str, Tensor] = {}
        self.counts: dict[str, int] = {}
        self._handles: list[Any] = []

    def _hook(self, name: str) -> Callable:
        def hook(mod: nn.Module, args: tuple) -> None:
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()  # [rows, n]
            s = self.sums.get(name)
            self.sums[name] = x.T @ x if s is None else s.addmm_(x.T, x)
            self.counts[name] = self.counts.get(name, 0) + x.shape[0]

        return hook

    def __enter__(self) -> HessianCollector:
        for name, mod in self.modules.items():
            self._handles.append(mod.register_forward_pre_hook(self._hook(name)))
        return self

    def __exit__(self, *exc: Any) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def hessian(self, name: str) -> Tensor:
        if name not in self.sums:
            raise InputError(f"layer {name!r} saw no calibration input: is it used in the forward?")
        return self.sums[name] / self.counts[name]


def damp_hessian(h: Tensor, damp: float) -> Tensor:
    """``H + damp * mean(diag H) * I`` (and a floor for all-zero inputs). [n, n] -> [n, n]"""
    mean_diag = torch.diagonal(h).mean().clamp_min(1e-8)
    return h + damp * mean_diag * torch.eye(h.shape[0], device=h.device, dtype=h.dtype)


def rotate_hessian(h: Tensor, q: LCQLinear) -> Tensor:
    """The Hessian of ``What``'s input ``x~ = H_n(SU * x)``: ``H_n S Sigma S H_n^T``. [n, n]"""
    su = q.SU.detach().float()
    m = h * su[:, None] * su[None, :]
    m = hadamard_transform(m, q.plan_in)  # M H^T
    return hadamard_transform(m.T.contiguous(), q.plan_in).T  # H (M H^T)


# --------------------------------------------------------------------------- block-LDL rounding


def block_ldl(h: Tensor, block: int = VEC) -> tuple[Tensor, Tensor]:
    """``H = U D U^T`` with ``U`` unit block-upper-triangular and ``D`` block-diagonal.

    h: [n, n] symmetric positive definite. Returns ``U`` [n, n] and ``D`` [n/block, block, block].
    """
    n = h.shape[0]
    lower = torch.linalg.cholesky(h.flip(0, 1))  # J H J = L L^T
    r = lower.flip(0, 1)  # H = R R^T, R upper triangular
    rb = torch.stack([r[i : i + block, i : i + block] for i in range(0, n, block)])  # [n/b, b, b]
    d = rb @ rb.transpose(1, 2)
    inv = torch.linalg.inv(rb)  # [n/b, b, b]
    u = r.clone()
    for k, i in enumerate(range(0, n, block)):  # U = R blockdiag(R_kk)^-1
        u[:, i : i + block] = r[:, i : i + block] @ inv[k]
    return torch.triu(u), d


def proxy_loss(w_hat: Tensor, w: Tensor, h: Tensor) -> float:
    """``tr((W^ - W) H (W^ - W)^T) / m``: expected squared output error per output row."""
    delta = (w_hat - w).double()
    return float(((delta @ h.double()) * delta).sum() / w.shape[0])


@torch.no_grad()
def ldlq_round(
    w: Tensor, h: Tensor, a: Tensor, b: Tensor, sweeps: int = 2, chunk: int = 128
) -> tuple[Tensor, dict[str, float]]:
    """Round ``w`` to codewords ``A z + b`` (one per 4 consecutive inputs) minimising
    ``tr((W^ - W) H (W^ - W)^T)``.

    An LDLQ pass (GPTQ-style error feedback with 4-column blocks, each block rounded to the
    nearest codeword in the metric of its LDL pivot), then ``sweeps`` coordinate-descent sweeps
    that re-pick each block's codeword with all others fixed (never increasing the loss).
    w: [m, n]; h: [n, n] damped, positive definite. Returns codes [m, n] uint8 and the proxy
    losses {"nearest", "ldl", "final"}.
    """
    w = w.float()
    h = h.float()
    m, n = w.shape
    nb = n // VEC
    cb = codebook(a.float(), b.float())  # [256, 4]
    u, d = block_ldl(h.double())
    u, d = u.float(), d.float()

    idx = torch.empty(m, nb, dtype=torch.long, device=w.device)
    delta = torch.zeros_like(w)  # W^ - W for the finished columns
    target = w.clone()  # W minus the feedback of earlier chunks
    for c0 in range(0, n, chunk):
        c1 = min(c0 + chunk, n)
        for i in range(c0, c1, VEC):
            t = target[:, i : i + VEC] - delta[:, c0:i] @ u[c0:i, i : i + VEC]  # [m, 4]
            k = i // VEC
            idx[:, k] = nearest_codes(t, a, b, metric=d[k], cb=cb)
            delta[:, i : i + VEC] = cb[idx[:, k]] - w[:, i : i + VEC]
        target[:, c1:] -= delta[:, c0:c1] @ u[c0:c1, c1:]
    w_hat = cb[idx].reshape(m, n)
    stats = {
        "nearest": proxy_loss(cb[nearest_codes(w.reshape(-1, VEC), a, b, cb=cb)].reshape(m, n), w, h),
        "ldl": proxy_loss(w_hat, w, h),
    }

    # coordinate descent: block k's best codeword given the others is the nearest one to
    # t = W^_k - G_k H_kk^-1 in the metric H_kk, with G = (W^ - W) H
    hkk = torch.stack([h[i : i + VEC, i : i + VEC] for i in range(0, n, VEC)])  # [nb, 4, 4]
    hkk_inv = torch.linalg.inv(hkk)
    g = (w_hat - w) @ h  # [m, n]
    for _ in range(sweeps):
        changed = 0
        for c0 in range(0, n, chunk):
            c1 = min(c0 + chunk, n)
            dchunk = torch.zeros(m, c1 - c0, device=w.device)  # codeword moves in this chunk
            for i in range(c0, c1, VEC):
                k = i // VEC
                gk = g[:, i : i + VEC] + dchunk @ h[c0:c1, i : i + VEC]  # [m, 4]
                t = w_hat[:, i : i + VEC] - gk @ hkk_inv[k]
                new = nearest_codes(t, a, b, metric=hkk[k], cb=cb)
                moved = new != idx[:, k]
                if moved.any():
                    step = cb[new] - w_hat[:, i : i + VEC]
                    dchunk[:, i - c0 : i - c0 + VEC] += step
                    w_hat[:, i : i + VEC] = cb[new]
                    idx[:, k] = new
                    changed += int(moved.sum())
            g += dchunk @ h[c0:c1, :]
        if not changed:
            break
    stats["final"] = proxy_loss(w_hat, w, h)
    return index_to_codes(idx).reshape(m, n), stats


def lcq_ptq_layer(name: str, linear: nn.Linear, hessian: Tensor, cfg: LCQConfig) -> tuple[LCQLinear, dict]:
    """PTQ of one linear: random signs and row scales, rotated Hessian, block-LDL rounding.

    hessian: undamped ``E[x x^T]`` [n, n] of the layer's input. Returns the layer and stats.
    """
    q = LCQLinear.from_linear(linear, cfg, name)
    w_rot = q.rotate_weight(linear.weight.detach())  # [m, n]
    h_rot = rotate_hessian(damp_hessian(hessian.float(), cfg.damp), q)
    z, stats = ldlq_round(w_rot, h_rot, q.A.detach(), q.b.detach(), cfg.sweeps, cfg.ldl_chunk)
    q.set_codes(z)
    return q, stats


# --------------------------------------------------------------------------- model plumbing


class _StopForward(Exception):
    """Raised by a hook once the inputs it wanted are captured."""


def move_batch(batch: Any, device: torch.device) -> Any:
    """Tensors of a batch (tensor, tuple/list or dict of them) moved to ``device``."""
    if isinstance(batch, Tensor):
        return batch.to(device)
    if isinstance(batch, dict):
        return {k: move_batch(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(move_batch(v, device) for v in batch)
    return batch


def call_model(model: nn.Module, batch: Any) -> Any:
    """``model(**batch)`` for a dict, ``model(*batch)`` for a tuple/list, else ``model(batch)``."""
    if isinstance(batch, dict):
        return model(**batch)
    if isinstance(batch, (list, tuple)):
        return model(*batch)
    return model(batch)


def main_output(out: Any) -> Tensor:
    """The tensor to compare in an output: itself, ``logits`` / ``last_hidden_state`` of a
    dict-like output, or the first tensor of a tuple."""
    if isinstance(out, Tensor):
        return out
    if isinstance(out, dict) or hasattr(out, "keys"):
        for key in ("logits", "last_hidden_state", "hidden_states"):
            if key in out and isinstance(out[key], Tensor):
                return out[key]
        for v in out.values():
            if isinstance(v, Tensor):
                return v
    if isinstance(out, (list, tuple)):
        for v in out:
            if isinstance(v, Tensor):
                return v
    raise InputError(f"cannot find a tensor in the model output of type {type(out).__name__}")


def _sanitize_kwargs(kwargs: dict) -> dict:
    """Drop KV caches from captured block kwargs: rerunning a block must not append to one."""
    out = {}
    for k, v in kwargs.items():
        if type(v).__name__.endswith("Cache"):
            v = None
        elif k == "use_cache":
            v = False
        out[k] = v
    return out


def find_blocks(model: nn.Module, names: Iterable[str]) -> tuple[str, nn.ModuleList] | None:
    """The ``nn.ModuleList`` holding most of the linears ``names`` (their qualified names)."""
    names = list(names)
    best, best_count = None, 0
    for lname, mod in model.named_modules():
        if not isinstance(mod, nn.ModuleList) or len(mod) == 0:
            continue
        prefix = lname + "." if lname else ""
        count = sum(1 for n in names if n.startswith(prefix))
        if count > best_count:
            best, best_count = (lname, mod), count
    return best


@dataclass
class _Inputs:
    """Calibration inputs of one block: the stream tensor and the rest, per batch."""

    hidden: list[Tensor | None]
    args: list[tuple]
    kwargs: list[dict]


def _capture_block_inputs(model: nn.Module, blocks: nn.ModuleList, batches: list[Any]) -> list[_Inputs]:
    """Run the model up to its last block on each batch; record every block's call arguments.

    The first positional argument (or ``hidden_states=``) of block 0 is the stream; for the
    other blocks only the remaining arguments are kept (masks, positions, rotary tables).
    """
    per_block = [_Inputs([], [], []) for _ in blocks]

    def make_hook(i: int) -> Callable:
        def hook(mod: nn.Module, args: tuple, kwargs: dict) -> None:
            kwargs = _sanitize_kwargs(kwargs)
            if args:
                hidden, rest = args[0], tuple(args[1:])
            elif "hidden_states" in kwargs:
                hidden, rest = kwargs.pop("hidden_states"), ()
            else:
                raise InputError(f"block {i} ({type(mod).__name__}) was called with no positional input")
            per_block[i].hidden.append(hidden.detach() if i == 0 else None)
            per_block[i].args.append(rest)
            per_block[i].kwargs.append(kwargs)
            if i == len(blocks) - 1:
                raise _StopForward

        return hook

    handles = [blk.register_forward_pre_hook(make_hook(i), with_kwargs=True) for i, blk in enumerate(blocks)]
    try:
        with torch.no_grad():
            for batch in batches:
                try:
                    call_model(model, batch)
                except _StopForward:
                    pass
    finally:
        for h in handles:
            h.remove()
    if len(per_block[-1].args) != len(batches):
        raise InputError("the calibration forward did not reach the last block: are the blocks called in order?")
    return per_block


def _call_block(block: nn.Module, hidden: Tensor | None, args: tuple, kwargs: dict) -> Tensor:
    out = block(*args, **kwargs) if hidden is None else block(hidden, *args, **kwargs)
    return main_output(out)


def _relative_mse(block: nn.Module, inputs: _Inputs, hidden: list, targets: list[Tensor]) -> float:
    total, norm = 0.0, 0.0
    with torch.no_grad():
        for hid, args, kw, tgt in zip(hidden, inputs.args, inputs.kwargs, targets):
            out = _call_block(block, hid, args, kw)
            total += float((out.float() - tgt.float()).pow(2).sum())
            norm += float(tgt.float().pow(2).sum())
    return total / max(norm, 1e-30)


def _finetune_block(block: nn.Module, inputs: _Inputs, hidden: list, targets: list[Tensor], cfg: LCQConfig, progress: bool) -> tuple[float, float]:
    """Adam on SU, SV, A, b, biases, norms (and theta) of ``block``'s LCQ layers against
    ``targets``. Keeps the starting state if tuning does not lower the loss. Returns
    (relative MSE before, after)."""
    before = _relative_mse(block, inputs, hidden, targets)
    lcq = [m for m in block.modules() if isinstance(m, LCQLinear)]
    if cfg.finetune_steps == 0 or not lcq:
        return before, before
    groups: list[dict] = []

    def add(p: nn.Parameter, lr: float) -> None:
        groups.append({"params": [p], "lr": lr})

    for q in lcq:
        for p in q.quant_parameters():
            add(p, cfg.finetune_lr * float(p.detach().pow(2).mean().sqrt().clamp_min(1e-6)))
        if cfg.tune_theta:
            add(q.theta, cfg.theta_lr)
    for mod in block.modules():
        if "norm" in type(mod).__name__.lower():
            for p in mod.parameters(recurse=False):
                add(p, cfg.finetune_lr * float(p.detach().pow(2).mean().sqrt().clamp_min(1e-6)))
    tuned = {id(g["params"][0]) for g in groups}
    saved_flags = {id(p): p.requires_grad for p in block.parameters()}
    for p in block.parameters():
        p.requires_grad_(id(p) in tuned)
    start = copy.deepcopy(block.state_dict())
    opt = torch.optim.Adam(groups, betas=(0.9, 0.99))
    n = len(targets)
    bar = tqdm(range(cfg.finetune_steps), desc="  tune", leave=False, disable=not progress)
    with torch.enable_grad():
        for step in bar:
            j = step % n
            out = _call_block(block, hidden[j], inputs.args[j], inputs.kwargs[j])
            tgt = targets[j].float()
            loss = (out.float() - tgt).pow(2).mean() / tgt.pow(2).mean().clamp_min(1e-30)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if progress:
                bar.set_postfix(loss=f"{loss.item():.3e}")
    for p in block.parameters():
        p.requires_grad_(saved_flags[id(p)])
    after = _relative_mse(block, inputs, hidden, targets)
    if not after < before:
        block.load_state_dict(start)
        after = before
    return before, after


# --------------------------------------------------------------------------- the driver


LayerQuantizer = Callable[[str, nn.Linear, Tensor], tuple[nn.Module, dict]]


@dataclass
class PTQReport:
    """What ``quantize_sequential`` did: layer names, per-layer proxy losses, per-block MSE."""

    quantized: list[str] = field(default_factory=list)
    layer_stats: dict[str, dict] = field(default_factory=dict)
    block_mse: list[tuple[float, float]] = field(default_factory=list)  # (before, after) tuning
    resumed_blocks: list[int] = field(default_factory=list)


def _state_meta(method: str, container: str, n_blocks: int, options: dict) -> dict:
    return {"method": method, "blocks": container, "n_blocks": n_blocks, "options": options}


def _check_state_dir(state_dir: Path, meta: dict) -> None:
    path = state_dir / "meta.json"
    if path.exists():
        try:
            old = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{path}: not valid JSON: {e}") from e
        if old != meta:
            diff = sorted(k for k in set(old) | set(meta) if old.get(k) != meta.get(k))
            raise CheckpointError(
                f"{state_dir}: the saved PTQ state was made with other settings (differs in "
                f"{', '.join(diff)}); use a new state folder or the same settings"
            )
    else:
        state_dir.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(meta, indent=1, sort_keys=True))


def _save_block(path: Path, names: list[str], block: nn.Module, stats: dict) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save({"names": names, "state": block.state_dict(), "stats": stats}, tmp)
    os.replace(tmp, path)


@torch.no_grad()
def quantize_sequential(
    model: nn.Module,
    batches: list[Any],
    targets: list[tuple[str, nn.Linear]],
    quantize_layer: LayerQuantizer,
    empty_layer: Callable[[str, nn.Linear], nn.Module],
    *,
    cfg: LCQConfig | None = None,
    finetune: bool = False,
    method: str = "lcqat",
    options: dict | None = None,
    state_dir: str | Path | None = None,
    progress: bool = True,
) -> PTQReport:
    """Quantize the linears ``targets`` of ``model`` block by block (see the module docstring).

    batches: calibration inputs already on the model's device; quantize_layer(name, linear,
    hessian) -> (new module, stats); empty_layer(name, linear) -> an unfilled module of the
    same type (to load a saved block into). ``finetune`` tunes LC-QAT blocks with ``cfg``.
    """
    cfg = cfg or LCQConfig()
    report = PTQReport()
    names = [n for n, _ in targets]
    found = find_blocks(model, names)
    if found is None:  # one unit: the whole model, called on the batches as they are
        container, blocks = "", None
        units: list[nn.Module] = [model]
        unit_inputs = [_Inputs([None] * len(batches), [], [])]
        for batch in batches:
            if isinstance(batch, dict):
                unit_inputs[0].args.append(())
                unit_inputs[0].kwargs.append(batch)
            else:
                unit_inputs[0].args.append(tuple(batch) if isinstance(batch, (list, tuple)) else (batch,))
                unit_inputs[0].kwargs.append({})
    else:
        container, blocks = found
        units = list(blocks)
        unit_inputs = _capture_block_inputs(model, blocks, batches)
    unit_names = [f"{container}.{i}" if container else str(i) for i in range(len(units))]
    prefixes = [u + "." for u in unit_names] if blocks is not None else [""]

    sdir = Path(state_dir) if state_dir is not None else None
    if sdir is not None:
        _check_state_dir(sdir, _state_meta(method, container, len(units), options or {}))

    keep_fp_stream = finetune and cfg.targets == "fp"
    q_hidden = list(unit_inputs[0].hidden)
    fp_hidden = list(q_hidden) if keep_fp_stream else None
    by_name = dict(targets)
    bar = tqdm(list(enumerate(units)), desc=f"{method} blocks", disable=not progress)
    for i, unit in bar:
        inputs = unit_inputs[i]
        next_fp: list[Tensor] | None = None
        mine = [n for n in names if n.startswith(prefixes[i])] if blocks is not None else list(names)
        local = {n: by_name[n] for n in mine}
        fp_unit = copy.deepcopy(unit) if finetune and mine else None
        saved = sdir / f"block_{i:04d}.pt" if sdir is not None else None
        if saved is not None and saved.exists():
            try:
                data = torch.load(saved, map_location="cpu", weights_only=True)
            except Exception as e:  # noqa: BLE001 - any unreadable file is reported as such
                raise CheckpointError(f"{saved}: cannot read the saved block: {e}") from e
            if sorted(data["names"]) != sorted(mine):
                raise CheckpointError(f"{saved}: holds layers {data['names'][:3]}..., expected {mine[:3]}...")
            for n in mine:
                set_submodule(model, n, empty_layer(n, local[n]).to(local[n].weight.device))
            unit = model.get_submodule(unit_names[i]) if blocks is not None else model
            unit.load_state_dict(data["state"])
            report.layer_stats.update(data["stats"].get("layers", {}))
            report.block_mse.append(tuple(data["stats"].get("mse", (math.nan, math.nan))))
            report.resumed_blocks.append(i)
        elif mine:
            with HessianCollector(local) as hc:
                for hid, args, kw in zip(q_hidden, inputs.args, inputs.kwargs):
                    _call_block(unit, hid, args, kw)
            layer_stats = {}
            for n in mine:
                new, stats = quantize_layer(n, local[n], hc.hessian(n))
                set_submodule(model, n, new)
                layer_stats[n] = stats
            del hc
            unit = model.get_submodule(unit_names[i]) if blocks is not None else model
            mse = (math.nan, math.nan)
            if finetune:
                src = fp_hidden if keep_fp_stream else q_hidden
                tgts = [_call_block(fp_unit, h, a, k) for h, a, k in zip(src, inputs.args, inputs.kwargs)]
                mse = _finetune_block(unit, inputs, q_hidden, tgts, cfg, progress)
                if keep_fp_stream:
                    next_fp = tgts
            report.layer_stats.update(layer_stats)
            report.block_mse.append(mse)
            if saved is not None:
                _save_block(saved, mine, unit, {"layers": layer_stats, "mse": list(mse)})
        if blocks is None:
            break
        # advance both streams to the next block
        if keep_fp_stream:
            if next_fp is None:
                ref = fp_unit if fp_unit is not None else unit
                next_fp = [_call_block(ref, h, a, k) for h, a, k in zip(fp_hidden, inputs.args, inputs.kwargs)]
            fp_hidden = next_fp
        q_hidden = [_call_block(unit, h, a, k) for h, a, k in zip(q_hidden, inputs.args, inputs.kwargs)]
        del fp_unit
    report.quantized.extend(n for n in names if any(n.startswith(p) for p in prefixes))

    # linears outside the blocks: one more pass for their Hessians, rounding only
    rest = [n for n in names if n not in report.quantized]
    if rest:
        local = {n: by_name[n] for n in rest}
        with HessianCollector(local) as hc:
            for batch in batches:
                call_model(model, batch)
        for n in rest:
            new, stats = quantize_layer(n, local[n], hc.hessian(n))
            set_submodule(model, n, new)
            report.layer_stats[n] = stats
            report.quantized.append(n)
    return report
