"""The packed LC-QAT format and its inference layer.

Per quantized layer ``NAME`` (weight m x n) a checkpoint holds

    NAME.codes  uint8   [m, n/4]  one byte per 4 weights: z0 | z1 << 2 | z2 << 4 | z3 << 6
    NAME.A      float32 [4, 4]
    NAME.b      float32 [4]
    NAME.SU     float16 [n]       input signs / scales
    NAME.SV     float16 [m]       output signs / scales (layer scale folded in)
    NAME.bias   float16 [m]       only if the layer has a bias

beside the model's other tensors, and ``config.json`` gets a ``quantization`` section:
``{"quant_method": "lcqat", "bits": 2, "codebook_dim": 4, "hadamard": ..., "format": 1,
"layers": [...]}``. ``packed_layout`` is the one description of these tensors: the exporter,
the loader's checks and ``bits_per_weight`` all read it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from cheers.errors import CheckpointError, InputError

from .codes import pack_codes, unpack_codes
from .hadamard import HADAMARD_MODES, hadamard_plan, hadamard_transform
from .lcq_linear import VEC, LCQConfig, LCQLinear, _check_in_features, set_submodule

FORMAT_VERSION = 1
SCALE_DTYPE = torch.float16
QUANT_METHOD = "lcqat"


def packed_layout(
    out_features: int, in_features: int, bias: bool
) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Tensor suffix -> (shape, dtype) of one packed layer: the format's single definition."""
    layout = {
        "codes": ((out_features, in_features // VEC), torch.uint8),
        "A": ((VEC, VEC), torch.float32),
        "b": ((VEC,), torch.float32),
        "SU": ((in_features,), SCALE_DTYPE),
        "SV": ((out_features,), SCALE_DTYPE),
    }
    if bias:
        layout["bias"] = ((out_features,), SCALE_DTYPE)
    return layout


class PackedLCQLinear(nn.Module):
    """Inference-only LC-QAT layer over packed codes. x: [..., n] -> [..., m]

    ``y = SV * H_m^T( What @ H_n(SU * x) ) + bias``, ``What`` decoded from the bytes. On CUDA
    with Triton the product runs in ``cheers.lcqat.kernels`` (fused decode-GEMV for at most 8
    rows, decode + GEMM above); elsewhere the reference path decodes ``What`` in PyTorch.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        hadamard: str = "full",
        name: str = "",
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        _check_in_features(in_features, out_features, name)
        if hadamard not in HADAMARD_MODES:
            raise InputError(
                f"unknown Hadamard mode {hadamard!r}; expected one of {HADAMARD_MODES}"
            )
        self.in_features, self.out_features, self.hadamard, self.name = (
            in_features,
            out_features,
            hadamard,
            name,
        )
        self.plan_in = hadamard_plan(in_features, hadamard)
        self.plan_out = hadamard_plan(out_features, hadamard)
        self.use_triton = True
        for key, (shape, dtype) in packed_layout(out_features, in_features, bias).items():
            self.register_buffer(key, torch.zeros(shape, dtype=dtype, device=device))
        if not bias:
            self.bias = None

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, hadamard={self.hadamard}"

    @property
    def qweight(self) -> Tensor:
        """The packed codes under the name peft reads to place LoRA adapters on a quantized
        layer's device (the layer holds buffers only)."""
        return self.codes

    @classmethod
    @torch.no_grad()
    def from_lcq(cls, q: LCQLinear) -> PackedLCQLinear:
        """Pack a trained ``LCQLinear``."""
        p = cls(
            q.in_features,
            q.out_features,
            q.bias is not None,
            q.cfg.hadamard,
            q.name,
            device=q.theta.device,
        )
        p.codes.copy_(pack_codes(q.codes()))
        p.A.copy_(q.A)
        p.b.copy_(q.b)
        p.SU.copy_(q.SU)
        p.SV.copy_(q.SV)
        if q.bias is not None:
            p.bias.copy_(q.bias)
        return p

    def packed_tensors(self) -> dict[str, Tensor]:
        """Suffix -> stored tensor, in ``packed_layout`` order."""
        return {
            k: getattr(self, k)
            for k in packed_layout(self.out_features, self.in_features, self.bias is not None)
        }

    def dequantized_rotated(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """``What`` = A z + b for every 4-vector (reference decode). [m, n]"""
        z = unpack_codes(self.codes).to(dtype)  # [m, n]
        m, n = z.shape
        return (z.reshape(m, n // VEC, VEC) @ self.A.to(dtype).T + self.b.to(dtype)).reshape(m, n)

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-1] != self.in_features:
            raise InputError(
                f"layer {self.name!r} expects inputs of size {self.in_features}, got shape {tuple(x.shape)}"
            )
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)  # [B, n]
        # transforms in fp32: the Hadamard sums many terms and activations can be large
        xt = hadamard_transform(x2.float() * self.SU.float(), self.plan_in)  # [B, n]
        if self.use_triton and x.is_cuda:
            from .kernels import lcq_matmul

            yt = lcq_matmul(xt, self.codes, self.A, self.b, out_dtype=x.dtype).float()  # [B, m]
        else:
            yt = xt @ self.dequantized_rotated(torch.float32).T  # [B, m]
        y = hadamard_transform(yt, self.plan_out, transpose=True) * self.SV.float()
        if self.bias is not None:
            y = y + self.bias.float()
        return y.to(x.dtype).reshape(*lead, self.out_features)


def bits_per_weight(
    layer: LCQLinear | PackedLCQLinear | tuple[int, int], *, include_bias: bool = False
) -> float:
    """Stored bits per weight of an LC-QAT layer: every tensor of its packed form (codes, A,
    b, SU, SV; the bias only with ``include_bias``) over ``m * n``.

    ``layer`` may be a layer or ``(out_features, in_features)``; all three read
    ``packed_layout``, the exporter's own description of the format.
    """
    if isinstance(layer, tuple):
        m, n = layer
        has_bias = False
    else:
        m, n, has_bias = layer.out_features, layer.in_features, layer.bias is not None
    total = 0
    for shape, dtype in packed_layout(m, n, has_bias and include_bias).values():
        numel = 1
        for s in shape:
            numel *= s
        total += numel * torch.empty((), dtype=dtype).element_size() * 8
    return total / (m * n)


# --------------------------------------------------------------------------- model level


def lcq_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, layer) of every LC-QAT layer (trainable or packed) in ``model``."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, (LCQLinear, PackedLCQLinear))]


def to_packed(model: nn.Module) -> list[str]:
    """Replace every ``LCQLinear`` of ``model`` by its ``PackedLCQLinear`` in place; returns names."""
    names = []
    for name, mod in list(model.named_modules()):
        if isinstance(mod, LCQLinear):
            set_submodule(model, name, PackedLCQLinear.from_lcq(mod))
            names.append(name)
    return names


def quantization_section(model: nn.Module) -> dict[str, Any]:
    """The ``quantization`` entry of ``config.json`` for ``model``'s LC-QAT layers."""
    layers = lcq_layers(model)
    modes = {m.hadamard if isinstance(m, PackedLCQLinear) else m.cfg.hadamard for _, m in layers}
    if len(modes) > 1:
        raise InputError(f"layers use several Hadamard modes {sorted(modes)}; the format holds one")
    return section_for([n for n, _ in layers], modes.pop() if modes else "full")


def section_for(layers: list[str], hadamard: str) -> dict[str, Any]:
    """The ``quantization`` entry of ``config.json`` for packed layers ``layers``."""
    return {
        "quant_method": QUANT_METHOD,
        "format": FORMAT_VERSION,
        "bits": 2,
        "codebook_dim": VEC,
        "hadamard": hadamard,
        "scale_dtype": str(SCALE_DTYPE).replace("torch.", ""),
        "layers": list(layers),
    }


def packed_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The model's tensors with every LC-QAT layer in packed form (nothing else changes)."""
    packed = {}
    for name, mod in lcq_layers(model):
        p = PackedLCQLinear.from_lcq(mod) if isinstance(mod, LCQLinear) else mod
        for key, t in p.packed_tensors().items():
            packed[f"{name}.{key}"] = t
    prefixes = tuple(n + "." for n, _ in lcq_layers(model))
    out = {k: v for k, v in model.state_dict().items() if not k.startswith(prefixes)}
    out.update(packed)
    return out


def export_lcqat(
    model: nn.Module, folder: str | Path, config: dict[str, Any] | None = None
) -> Path:
    """Write ``folder/model.safetensors`` (packed) and ``folder/config.json`` = ``config`` plus
    the ``quantization`` section. Returns the folder."""
    from cheers.safetensors_io import write_json, write_safetensors

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    write_safetensors(packed_state_dict(model), folder / "model.safetensors")
    write_json(
        {**(config or {}), "quantization": quantization_section(model)}, folder / "config.json"
    )
    return folder


def check_section(section: Any, source: str) -> str:
    """Validate a ``quantization`` section of LC-QAT; returns its Hadamard mode."""
    if not isinstance(section, dict) or section.get("quant_method") != QUANT_METHOD:
        raise CheckpointError(f"{source}: no 'quantization' section with quant_method 'lcqat'")
    if section.get("format") != FORMAT_VERSION:
        raise CheckpointError(
            f"{source}: packed format {section.get('format')!r}, this code reads {FORMAT_VERSION}"
        )
    mode = section.get("hadamard", "full")
    if mode not in HADAMARD_MODES:
        raise CheckpointError(f"{source}: unknown Hadamard mode {mode!r}")
    if not isinstance(section.get("layers"), list):
        raise CheckpointError(f"{source}: the quantization section has no 'layers' list")
    return mode


def read_packed_layer(
    tensors: dict[str, Tensor],
    name: str,
    out_features: int,
    in_features: int,
    hadamard: str,
    source: str,
    device: torch.device | str = "cpu",
) -> PackedLCQLinear:
    """The ``PackedLCQLinear`` of layer ``name`` (``out_features x in_features``) from a packed
    state dict; a missing tensor or a wrong shape or dtype raises ``CheckpointError`` naming it."""
    m, n = out_features, in_features
    has_bias = f"{name}.bias" in tensors
    for key, (shape, dtype) in packed_layout(m, n, has_bias).items():
        t = tensors.get(f"{name}.{key}")
        if t is None:
            raise CheckpointError(
                f"{source}: tensor {name}.{key} is missing (layer {name!r}, {m}x{n})"
            )
        if tuple(t.shape) != shape or t.dtype != dtype:
            raise CheckpointError(
                f"{source}: tensor {name}.{key} has shape {tuple(t.shape)} {t.dtype}, "
                f"expected {shape} {dtype} for the {m}x{n} layer {name!r}"
            )
    packed = PackedLCQLinear(n, m, has_bias, hadamard, name, device=device)
    for key in packed.packed_tensors():
        getattr(packed, key).copy_(tensors[f"{name}.{key}"])
    return packed


def install_packed(
    model: nn.Module,
    section: dict[str, Any],
    tensors: dict[str, Tensor],
    source: str,
    device: torch.device | str = "cpu",
) -> list[str]:
    """Replace the linears that ``section["layers"]`` lists by ``PackedLCQLinear`` filled from
    ``tensors`` (a packed state dict; left unchanged). Returns the layer names."""
    mode = check_section(section, source)
    for name in section["layers"]:
        try:
            lin = model.get_submodule(name)
        except AttributeError as e:
            raise CheckpointError(
                f"{source}: quantized layer {name!r} does not exist in the model"
            ) from e
        if not isinstance(lin, (nn.Linear, PackedLCQLinear, LCQLinear)):
            raise CheckpointError(
                f"{source}: layer {name!r} is a {type(lin).__name__}, not a linear layer"
            )
        packed = read_packed_layer(
            tensors, name, lin.out_features, lin.in_features, mode, source, device
        )
        set_submodule(model, name, packed)
    return list(section["layers"])


def load_lcqat(
    model: nn.Module, folder: str | Path, device: torch.device | str = "cpu"
) -> nn.Module:
    """Load a packed checkpoint into a full-precision skeleton of the same model, in place.

    The layers that ``config.json``'s ``quantization.layers`` lists are replaced by
    ``PackedLCQLinear``; a missing tensor, a wrong shape or dtype, or an unknown layer raises
    ``CheckpointError`` naming it. Returns ``model``.
    """
    from cheers.safetensors_io import read_json, read_safetensors

    folder = Path(folder)
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        raise CheckpointError(f"{cfg_path}: file not found")
    section = read_json(cfg_path).get("quantization")
    check_section(section, str(cfg_path))
    weights = folder / "model.safetensors"
    tensors = read_safetensors(weights, device=device)
    install_packed(model, section, tensors, str(weights), device)
    expected = set(model.state_dict())
    missing = sorted(expected - set(tensors))
    if missing:
        raise CheckpointError(
            f"{weights}: tensor {missing[0]!r} is missing ({len(missing)} in all)"
        )
    extra = sorted(set(tensors) - expected)
    if extra:
        raise CheckpointError(
            f"{weights}: unexpected tensor {extra[0]!r} ({len(extra)} in all): not in the model"
        )
    model.load_state_dict(tensors, strict=False)
    return model


# --------------------------------------------------------------------------- state-dict conversions


def _lcq_prefixes(weights: dict[str, Tensor]) -> list[str]:
    return sorted(k[: -len(".theta")] for k in weights if k.endswith(".theta"))


@torch.no_grad()
def pack_lcq_state(
    weights: dict[str, Tensor], hadamard: str = "full"
) -> tuple[dict[str, Tensor], list[str]]:
    """A state dict holding ``LCQLinear`` parameters (``NAME.theta``, ``.A``, ...: a QAT run's
    checkpoint) -> the same state in packed form, and the packed layer names."""
    out = dict(weights)
    names = _lcq_prefixes(weights)
    for name in names:
        m, n = weights[f"{name}.theta"].shape
        q = LCQLinear(
            n, m, bias=f"{name}.bias" in weights, cfg=LCQConfig(hadamard=hadamard), name=name
        )
        q.load_state_dict({k: weights[f"{name}.{k}"] for k in q.state_dict()})
        for key in q.state_dict():
            del out[f"{name}.{key}"]
        for key, t in PackedLCQLinear.from_lcq(q).packed_tensors().items():
            out[f"{name}.{key}"] = t
    return out, names


@torch.no_grad()
def lcq_state(
    weights: dict[str, Tensor],
    names: list[str],
    cfg: LCQConfig,
    section: dict[str, Any] | None = None,
    source: str = "checkpoint",
) -> dict[str, Tensor]:
    """The ``LCQLinear`` parameters (``theta``, ``A``, ``b``, ``SU``, ``SV``, ``bias``) of layers
    ``names`` from a state dict: unpacked where it is packed (``section`` says so; codes exactly,
    scales from float16), else rounded data-free from the dense ``NAME.weight``
    (``LCQLinear.from_linear``). Other tensors pass through. QAT starts from this."""
    out = dict(weights)
    packed = set(section["layers"]) if section is not None else set()
    mode = check_section(section, source) if section is not None else cfg.hadamard
    if mode != cfg.hadamard:
        raise CheckpointError(
            f"{source}: packed with hadamard={mode!r}, the QAT config says {cfg.hadamard!r}"
        )
    for name in names:
        if name in packed:
            codes = weights.get(f"{name}.codes")
            if codes is None:
                raise CheckpointError(f"{source}: tensor {name}.codes is missing (layer {name!r})")
            m, n = codes.shape[0], codes.shape[1] * VEC
            p = read_packed_layer(weights, name, m, n, mode, source)
            q = LCQLinear(n, m, p.bias is not None, cfg, name)
            q.set_codes(unpack_codes(p.codes))
            for key in ("A", "b", "SU", "SV") + (("bias",) if p.bias is not None else ()):
                getattr(q, key).copy_(getattr(p, key).float())
            stale = p.packed_tensors()
        else:
            w = weights.get(f"{name}.weight")
            if w is None:
                raise CheckpointError(f"{source}: tensor {name}.weight is missing (layer {name!r})")
            bias = weights.get(f"{name}.bias")
            lin = nn.Linear(w.shape[1], w.shape[0], bias=bias is not None)
            lin.weight.copy_(w)
            if bias is not None:
                lin.bias.copy_(bias)
            q = LCQLinear.from_linear(lin, cfg, name)
            stale = dict(lin.state_dict())
        for key in stale:
            out.pop(f"{name}.{key}", None)
        out.update({f"{name}.{k}": v for k, v in q.state_dict().items()})
    return out
