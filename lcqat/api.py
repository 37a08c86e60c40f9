"""``quantize_model``: 2-bit quantization of the linear layers of any PyTorch module."""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from cheers.errors import ConfigError, InputError

from .baselines import ScalarQuantLinear, gptq_quantize, rtn_quantize
from .lcq_linear import DEFAULT_EXCLUDE, VEC, LCQConfig, LCQLinear, select_linears, set_submodule
from .pack import bits_per_weight
from .ptq import PTQReport, lcq_ptq_layer, move_batch, quantize_sequential

METHODS = ("lcqat", "rtn", "gptq")


@dataclass
class QuantizeReport:
    """What ``quantize_model`` did.

    quantized: names of the layers now quantized; skipped: name -> reason for selected layers
    left in full precision; bits_per_weight: stored bits over all quantized weights;
    block_mse: per block (relative output MSE before, after fine-tuning), LC-QAT only.
    """

    method: str
    quantized: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    bits_per_weight: float = 0.0
    layer_stats: dict[str, dict] = field(default_factory=dict)
    block_mse: list[tuple[float, float]] = field(default_factory=list)
    resumed_blocks: list[int] = field(default_factory=list)


def _lcq_config(opts: dict[str, Any]) -> LCQConfig:
    names = {f.name for f in dataclasses.fields(LCQConfig)}
    unknown = sorted(set(opts) - names)
    if unknown:
        raise ConfigError(f"unknown LC-QAT option {unknown[0]!r} (valid: {', '.join(sorted(names))})")
    return LCQConfig(**opts)


def _weighted_bits(model: nn.Module, names: list[str]) -> float:
    total_bits, total_weights = 0.0, 0
    for n in names:
        mod = model.get_submodule(n)
        numel = mod.in_features * mod.out_features
        bpw = bits_per_weight(mod) if isinstance(mod, LCQLinear) else mod.bits_per_weight()
        total_bits += bpw * numel
        total_weights += numel
    return total_bits / max(total_weights, 1)


def quantize_model(
    model: nn.Module,
    calibration: Iterable[Any] | None,
    method: Literal["lcqat", "rtn", "gptq"] = "lcqat",
    *,
    include: list[str] | tuple[str, ...] | None = None,
    exclude: list[str] | tuple[str, ...] | None = None,
    group_size: int = 64,
    max_batches: int | None = None,
    state_dir: str | Path | None = None,
    progress: bool = True,
    **opts: Any,
) -> tuple[nn.Module, QuantizeReport]:
    """Quantize the ``nn.Linear`` layers of ``model`` to 2 bits in place.

    calibration: an iterable of batches, each a dict of tensors (passed as keyword arguments),
    a tuple of tensors (positional) or one tensor; ``None`` is allowed for ``rtn``.
    method: "lcqat" (PTQ initialisation of ``LCQLinear`` layers, ready for QAT or
    ``to_packed``), "rtn" or "gptq" (2-bit scalar grid, groups of ``group_size`` inputs).
    include / exclude: glob patterns on module names (default: everything but ``lm_head`` and
    embeddings). opts: ``LCQConfig`` fields for "lcqat" (``finetune_steps=...``), ``damp``
    for "gptq". ``state_dir`` makes LC-QAT / GPTQ resumable per block.

    Selected layers that cannot be quantized (input size not a multiple of 4, or of
    ``group_size`` for the scalar methods) stay in full precision and are listed in the
    report's ``skipped``. Returns ``(model, report)``.
    """
    if method not in METHODS:
        raise ConfigError(f"unknown quantization method {method!r}; expected one of {METHODS}")
    exclude = DEFAULT_EXCLUDE if exclude is None else exclude
    report = QuantizeReport(method=method)
    step = VEC if method == "lcqat" else group_size
    targets = []
    for name, lin in select_linears(model, include, exclude):
        if lin.in_features % step:
            what = "4" if method == "lcqat" else f"the group size {group_size}"
            report.skipped[name] = f"input size {lin.in_features} is not a multiple of {what}"
        else:
            targets.append((name, lin))
    if not targets:
        return model, report

    if method == "rtn":
        if opts:
            raise ConfigError(f"unknown RTN option {sorted(opts)[0]!r} (RTN takes group_size only)")
        for name, lin in targets:
            codes, scale, lo = rtn_quantize(lin.weight.detach(), group_size)
            set_submodule(model, name, ScalarQuantLinear.from_quantized(lin, codes, scale, lo, "rtn"))
            report.quantized.append(name)
        report.bits_per_weight = _weighted_bits(model, report.quantized)
        return model, report

    if calibration is None:
        raise InputError(f"method {method!r} needs calibration batches")
    device = next(itertools.chain(model.parameters(), model.buffers()), torch.empty(0)).device
    batches = list(itertools.islice(iter(calibration), max_batches))
    if not batches:
        raise InputError("the calibration iterable yielded no batch")
    batches = [move_batch(b, device) for b in batches]
    was_training = model.training
    model.eval()

    if method == "gptq":
        damp = opts.pop("damp", 0.01)
        if opts:
            raise ConfigError(f"unknown GPTQ option {sorted(opts)[0]!r} (valid: damp, group_size)")

        def quantize_layer(name: str, lin: nn.Linear, hessian: torch.Tensor) -> tuple[nn.Module, dict]:
            codes, scale, lo = gptq_quantize(lin.weight.detach(), hessian, group_size, damp)
            return ScalarQuantLinear.from_quantized(lin, codes, scale, lo, "gptq"), {}

        def empty_layer(name: str, lin: nn.Linear) -> nn.Module:
            return ScalarQuantLinear(lin.in_features, lin.out_features, group_size, lin.bias is not None, "gptq")

        result = quantize_sequential(
            model, batches, targets, quantize_layer, empty_layer, method="gptq",
            options={"group_size": group_size, "damp": damp}, state_dir=state_dir, progress=progress,
        )
    else:
        cfg = _lcq_config(opts)

        def quantize_layer(name: str, lin: nn.Linear, hessian: torch.Tensor) -> tuple[nn.Module, dict]:
            return lcq_ptq_layer(name, lin, hessian, cfg)

        def empty_layer(name: str, lin: nn.Linear) -> nn.Module:
            return LCQLinear(lin.in_features, lin.out_features, lin.bias is not None, cfg, name)

        result = quantize_sequential(
            model, batches, targets, quantize_layer, empty_layer, cfg=cfg, finetune=True,
            method="lcqat", options=cfg.to_dict(), state_dir=state_dir, progress=progress,
        )
    model.train(was_training)
    _fill(report, result)
    report.bits_per_weight = _weighted_bits(model, report.quantized)
    return model, report


def _fill(report: QuantizeReport, result: PTQReport) -> None:
    report.quantized = list(result.quantized)
    report.layer_stats = result.layer_stats
    report.block_mse = result.block_mse
    report.resumed_blocks = result.resumed_blocks
