"""The LC-QAT linear layer: 2-bit linear-constrained vector quantization with incoherence.

For an ``m x n`` weight (``m`` outputs, ``n`` inputs) the effective weight is

    W_eff = diag(SV) . H_m^T . What . H_n . diag(SU)

with ``H`` the normalised Hadamard transform of ``cheers.lcqat.hadamard`` (``H_m^T = H_m`` for
power-of-two sizes; the transpose keeps ``W_eff`` exactly orthogonally equivalent to ``What``
for the Paley sizes too). ``What`` is cut along the input dimension into 4-vectors, each
``A z + b`` with ``z`` in {0,1,2,3}^4: one 8-bit index per 4 weights. The forward applies the
transforms to activations, so the dense ``W_eff`` is never built:

    y = SV * H_m^T( What @ H_n(SU * x) ) + bias

QAT keeps a latent ``theta`` per weight: ``u = s * theta + 1.5``, ``z = clamp(round(u), 0, 3)``
with ``s = sqrt(m + n) / 2``. The backward goes through the differentiable gradient estimator
``dz/du = min(3, (1/k) |2r - 1|^(1/k - 1))``, ``r = u - clamp(floor(u), 0, 3)``.
"""

from __future__ import annotations

import fnmatch
import math
from dataclasses import asdict, dataclass, field
from typing import Literal

import torch
from torch import Tensor, nn

from cheers.errors import ConfigError, InputError

from .hadamard import HADAMARD_MODES, hadamard_plan, hadamard_transform, random_signs

CODE_LEVELS = 4  # z in {0, 1, 2, 3}
VEC = 4  # weights per codeword
DEFAULT_EXCLUDE = ("*lm_head*", "*embed*")


@dataclass(kw_only=True)
class LCQConfig:
    """Settings of LC-QAT layers, their PTQ initialisation and block fine-tuning."""

    # --- layer / QAT
    k: float = 5.0  # sharpness of the gradient estimator (k = 1 is the straight-through slope 1)
    grad_cap: float = 3.0  # the estimator's ceiling at r = 1/2
    hadamard: Literal["full", "block128"] = "full"
    rotation: Literal["identity", "random"] = "identity"  # R in A = R / sqrt(1.25)
    seed: int = 0  # random signs SU / SV and R
    # --- PTQ (cheers.lcqat.ptq)
    damp: float = 0.01  # Hessian damping, relative to its mean diagonal
    sweeps: int = 2  # coordinate-descent refinement sweeps after the LDL pass
    ldl_chunk: int = 128  # columns updated lazily together in the LDL pass
    scale_search: bool = True  # grid search of the layer scale folded into SV
    finetune_steps: int = 100  # Adam steps per block against full-precision block outputs
    finetune_lr: float = 1e-3  # relative: each tensor's step is this times its RMS
    tune_theta: bool = False  # also move codes (through the estimator) during fine-tuning
    theta_lr: float = 1e-4
    targets: Literal["fp", "quantized"] = "fp"  # inputs of the fp block: fp stream or quantized
    include: list[str] = field(default_factory=list)  # glob patterns on module names; empty: all
    exclude: list[str] = field(default_factory=lambda: list(DEFAULT_EXCLUDE))

    def __post_init__(self) -> None:
        if self.k <= 0:
            raise ConfigError(f"lcqat.k must be positive, got {self.k}")
        if self.grad_cap <= 0:
            raise ConfigError(f"lcqat.grad_cap must be positive, got {self.grad_cap}")
        if self.hadamard not in HADAMARD_MODES:
            raise ConfigError(f"lcqat.hadamard={self.hadamard!r} is not one of {HADAMARD_MODES}")
        if self.rotation not in ("identity", "random"):
            raise ConfigError(f"lcqat.rotation={self.rotation!r} is not 'identity' or 'random'")
        if self.targets not in ("fp", "quantized"):
            raise ConfigError(f"lcqat.targets={self.targets!r} is not 'fp' or 'quantized'")
        for key in ("damp", "finetune_lr", "theta_lr"):
            if getattr(self, key) < 0:
                raise ConfigError(f"lcqat.{key} must be >= 0, got {getattr(self, key)}")
        for key in ("sweeps", "finetune_steps"):
            if getattr(self, key) < 0:
                raise ConfigError(f"lcqat.{key} must be >= 0, got {getattr(self, key)}")
        if self.ldl_chunk < VEC or self.ldl_chunk % VEC:
            raise ConfigError(f"lcqat.ldl_chunk must be a positive multiple of 4, got {self.ldl_chunk}")

    def to_dict(self) -> dict:
        return asdict(self)


# --------------------------------------------------------------------------- estimator


def estimator_grad(u: Tensor, k: float = 5.0, cap: float = 3.0) -> Tensor:
    """``dz/du = min(cap, (1/k) |2r - 1|^(1/k - 1))`` with ``r = u - clamp(floor(u), 0, 3)``.

    Largest (``cap``) where ``u`` sits halfway between two codes, small near integers; outside
    [0, 4) ``r`` leaves [0, 1) and the slope decays.
    """
    r = u - torch.clamp(torch.floor(u), 0, CODE_LEVELS - 1)
    return torch.clamp((1.0 / k) * torch.abs(2.0 * r - 1.0).pow(1.0 / k - 1.0), max=cap)


class RoundWithEstimator(torch.autograd.Function):
    """``z = clamp(round(u), 0, 3)`` forward; ``dL/du = dL/dz * estimator_grad(u)`` backward."""

    @staticmethod
    def forward(ctx, u: Tensor, k: float, cap: float) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(u)
        ctx.k, ctx.cap = k, cap
        return torch.clamp(torch.round(u), 0, CODE_LEVELS - 1)

    @staticmethod
    def backward(ctx, grad_z: Tensor) -> tuple[Tensor, None, None]:  # type: ignore[override]
        (u,) = ctx.saved_tensors
        return grad_z * estimator_grad(u, ctx.k, ctx.cap), None, None


# --------------------------------------------------------------------------- codebook


def all_codes(device: torch.device | str | None = None) -> Tensor:
    """The 256 code vectors in index order: ``index = z0 + 4 z1 + 16 z2 + 64 z3``. [256, 4]"""
    idx = torch.arange(CODE_LEVELS**VEC, device=device)
    return torch.stack([(idx >> (2 * i)) & 3 for i in range(VEC)], dim=1).float()


def codebook(a: Tensor, b: Tensor) -> Tensor:
    """The 256 codewords ``A z + b``. A: [4, 4], b: [4] -> [256, 4]"""
    return all_codes(a.device).to(a.dtype) @ a.T + b


def init_codebook(rotation: str = "identity", generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """``A = R / sqrt(1.25)``, ``b = -1.5 R 1 / sqrt(1.25)``: unit-RMS codewords. ([4,4], [4])"""
    if rotation == "identity":
        r = torch.eye(VEC)
    else:
        q, rr = torch.linalg.qr(torch.randn(VEC, VEC, generator=generator))
        r = q * torch.sign(torch.diagonal(rr))[None, :]
    a = r / math.sqrt(1.25)
    b = -1.5 * (r @ torch.ones(VEC)) / math.sqrt(1.25)
    return a, b


def nearest_codes(
    w: Tensor, a: Tensor, b: Tensor, metric: Tensor | None = None, chunk: int = 65536, cb: Tensor | None = None
) -> Tensor:
    """Index of the nearest codeword for each 4-vector.

    w: ``[N, 4]``; metric: optional ``[4, 4]`` PSD matrix ``D`` (distance ``(w-c)^T D (w-c)``);
    cb: ``codebook(a, b)`` if the caller has it. Returns ``[N]`` int64 in [0, 256).
    """
    cb = codebook(a.float(), b.float()) if cb is None else cb  # [256, 4]
    dm = cb if metric is None else cb @ metric.float()  # [256, 4]
    half_norm = 0.5 * (dm * cb).sum(1)  # [256]
    out = torch.empty(w.shape[0], dtype=torch.long, device=w.device)
    for i in range(0, w.shape[0], chunk):
        scores = w[i : i + chunk].float() @ dm.T - half_norm  # [chunk, 256]
        out[i : i + chunk] = scores.argmax(1)
    return out


def index_to_codes(index: Tensor) -> Tensor:
    """``[...]`` codeword indices -> ``[..., 4]`` codes in {0..3} (uint8)."""
    return torch.stack([(index >> (2 * i)) & 3 for i in range(VEC)], dim=-1).to(torch.uint8)


def codes_to_index(z: Tensor) -> Tensor:
    """``[..., 4]`` codes -> ``[...]`` int64 indices."""
    z = z.long()
    return z[..., 0] + 4 * z[..., 1] + 16 * z[..., 2] + 64 * z[..., 3]


# --------------------------------------------------------------------------- the layer


def _check_in_features(in_features: int, out_features: int, name: str) -> None:
    if in_features % VEC:
        label = f"layer {name!r}" if name else "layer"
        raise InputError(
            f"LC-QAT {label} with weight {out_features}x{in_features} (out x in): the input size "
            f"{in_features} is not a multiple of {VEC}, so it cannot be cut into 4-vectors"
        )


class LCQLinear(nn.Module):
    """Drop-in ``nn.Linear`` replacement holding an LC-QAT 2-bit weight. x: [..., n] -> [..., m]

    Parameters: ``theta`` [m, n] (QAT latent of the codes), ``A`` [4, 4], ``b`` [4],
    ``SU`` [n], ``SV`` [m], optional ``bias`` [m]. Build one from an ``nn.Linear`` with
    ``LCQLinear.from_linear``; the constructor alone gives placeholder values.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        cfg: LCQConfig | None = None,
        name: str = "",
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        _check_in_features(in_features, out_features, name)
        self.cfg = cfg or LCQConfig()
        self.in_features, self.out_features, self.name = in_features, out_features, name
        self.s = math.sqrt(in_features + out_features) / 2.0
        self.plan_in = hadamard_plan(in_features, self.cfg.hadamard)
        self.plan_out = hadamard_plan(out_features, self.cfg.hadamard)
        a, b = init_codebook("identity")
        f32 = dict(device=device, dtype=torch.float32)
        self.theta = nn.Parameter(torch.zeros(out_features, in_features, **f32))
        self.A = nn.Parameter(a.to(**f32))
        self.b = nn.Parameter(b.to(**f32))
        self.SU = nn.Parameter(torch.ones(in_features, **f32))
        self.SV = nn.Parameter(torch.ones(out_features, **f32))
        self.bias = nn.Parameter(torch.zeros(out_features, **f32)) if bias else None

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, hadamard={self.cfg.hadamard}"
        )

    # ---------------------------------------------------------------- construction

    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: nn.Linear, cfg: LCQConfig | None = None, name: str = "") -> LCQLinear:
        """Quantize ``linear`` with no data: random signs, per-row scales folded into ``SV``,
        and the nearest codeword for each 4-vector of the rotated weight."""
        cfg = cfg or LCQConfig()
        m, n = linear.out_features, linear.in_features
        q = cls(n, m, bias=linear.bias is not None, cfg=cfg, name=name, device=linear.weight.device)
        gen = torch.Generator().manual_seed(cfg.seed + _name_seed(name))
        a, b = init_codebook(cfg.rotation, gen)
        q.A.copy_(a)
        q.b.copy_(b)
        w = linear.weight.detach().float()  # [m, n]
        q.SU.copy_(random_signs(n, gen))
        row_rms = w.pow(2).mean(1).sqrt().clamp_min(1e-12)  # [m]
        q.SV.copy_(random_signs(m, gen).to(w.device) * row_rms)
        if cfg.scale_search:
            q.SV.mul_(q._best_scale(q.rotate_weight(w)))
        q.set_codes(q.nearest(q.rotate_weight(w)))
        if linear.bias is not None:
            q.bias.copy_(linear.bias.detach().float())
        return q

    @torch.no_grad()
    def _best_scale(self, w_rot: Tensor, max_vectors: int = 8192) -> float:
        """Global factor ``c`` minimising ``||c * Q(w_rot / c) - w_rot||^2`` on a grid."""
        vecs = w_rot.reshape(-1, VEC)
        if vecs.shape[0] > max_vectors:  # a fixed subsample is plenty for one scalar
            idx = torch.randperm(vecs.shape[0], generator=torch.Generator().manual_seed(0))
            vecs = vecs[idx[:max_vectors].to(vecs.device)]
        cb = codebook(self.A.detach(), self.b.detach())
        best, best_err = 1.0, float("inf")
        for c in torch.linspace(0.5, 2.0, 16).tolist():
            err = (c * cb[nearest_codes(vecs / c, self.A, self.b, cb=cb)] - vecs).pow(2).sum().item()
            if err < best_err:
                best, best_err = c, err
        return best

    # ---------------------------------------------------------------- weights and codes

    @torch.no_grad()
    def rotate_weight(self, w: Tensor) -> Tensor:
        """The ``What`` that represents dense weight ``w`` exactly with this layer's SU, SV:
        ``H_m diag(1/SV) w diag(1/SU) H_n^T``. [m, n] -> [m, n] float32"""
        w = w.float() / self.SV.detach()[:, None] / self.SU.detach()[None, :]
        w = hadamard_transform(w, self.plan_in)  # w H_n^T
        return hadamard_transform(w.T.contiguous(), self.plan_out).T  # H_m (.)

    @torch.no_grad()
    def nearest(self, w_rot: Tensor) -> Tensor:
        """Nearest-codeword codes of a rotated weight. [m, n] -> [m, n] uint8"""
        m, n = w_rot.shape
        idx = nearest_codes(w_rot.reshape(-1, VEC), self.A, self.b)
        return index_to_codes(idx).reshape(m, n)

    @torch.no_grad()
    def set_codes(self, z: Tensor) -> None:
        """Point the latent at codes ``z`` [m, n] in {0..3}: ``theta = (z - 1.5) / s``."""
        if z.shape != self.theta.shape:
            raise InputError(f"codes of shape {tuple(z.shape)} for layer {self.name!r} of {tuple(self.theta.shape)}")
        self.theta.copy_((z.float() - 1.5) / self.s)

    def latent_u(self) -> Tensor:
        """``u = s * theta + 1.5``. [m, n]"""
        return self.s * self.theta + 1.5

    @torch.no_grad()
    def codes(self) -> Tensor:
        """The current codes ``clamp(round(u), 0, 3)``. [m, n] uint8"""
        return torch.clamp(torch.round(self.latent_u()), 0, 3).to(torch.uint8)

    def rotated_weight(self) -> Tensor:
        """``What``: each 4-vector ``A z + b``; differentiable in theta (estimator), A and b. [m, n]"""
        z = RoundWithEstimator.apply(self.latent_u(), self.cfg.k, self.cfg.grad_cap)  # [m, n]
        m, n = z.shape
        z = z.reshape(m, n // VEC, VEC)  # [m, n/4, 4]
        return (z @ self.A.T + self.b).reshape(m, n)

    @torch.no_grad()
    def dequantized_weight(self) -> Tensor:
        """The dense ``W_eff`` (tests, export checks; the forward never builds it). [m, n]"""
        w = self.rotated_weight()
        w = hadamard_transform(w.T.contiguous(), self.plan_out, transpose=True).T  # H_m^T (.)
        w = hadamard_transform(w, self.plan_in, transpose=True)  # (.) H_n
        return w * self.SV[:, None] * self.SU[None, :]

    # ---------------------------------------------------------------- forward

    def forward(self, x: Tensor) -> Tensor:
        """x: [..., n] -> [..., m]; computes in x's dtype."""
        if x.shape[-1] != self.in_features:
            raise InputError(
                f"layer {self.name!r} expects inputs of size {self.in_features}, got shape {tuple(x.shape)}"
            )
        dt = x.dtype
        xt = hadamard_transform(x * self.SU.to(dt), self.plan_in)  # [..., n]
        yt = xt @ self.rotated_weight().to(dt).T  # [..., m]
        y = hadamard_transform(yt, self.plan_out, transpose=True) * self.SV.to(dt)
        return y if self.bias is None else y + self.bias.to(dt)

    def quant_parameters(self) -> list[nn.Parameter]:
        """The continuous parameters fine-tuned after PTQ: SU, SV, A, b (and bias)."""
        ps = [self.SU, self.SV, self.A, self.b]
        return ps + ([self.bias] if self.bias is not None else [])


def _name_seed(name: str) -> int:
    """A stable per-layer seed offset (Python's hash() is salted per process)."""
    h = 0
    for ch in name:
        h = (h * 131 + ord(ch)) % 1_000_003
    return h


# --------------------------------------------------------------------------- module swap


def _matches(name: str, patterns: list[str] | tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def select_linears(
    model: nn.Module,
    include: list[str] | tuple[str, ...] | None = None,
    exclude: list[str] | tuple[str, ...] | None = None,
) -> list[tuple[str, nn.Linear]]:
    """The plain ``nn.Linear`` modules of ``model`` (qualified name, module) that ``include``
    (globs; empty or None: all) selects and ``exclude`` (globs; None: lm_head and embeddings)
    does not."""
    exclude = DEFAULT_EXCLUDE if exclude is None else exclude
    out = []
    for name, mod in model.named_modules():
        if type(mod) is not nn.Linear:  # subclasses (and already quantized layers) are left alone
            continue
        if include and not _matches(name, include):
            continue
        if _matches(name, exclude):
            continue
        out.append((name, mod))
    return out


def set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    """Replace the submodule at dotted ``name``."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def apply_lcqat(
    model: nn.Module,
    cfg: LCQConfig | None = None,
    include: list[str] | tuple[str, ...] | None = None,
    exclude: list[str] | tuple[str, ...] | None = None,
    *,
    skip_incompatible: bool = False,
) -> list[str]:
    """Swap the selected ``nn.Linear`` layers of ``model`` for ``LCQLinear`` in place.

    Embeddings, norms and (by default) ``lm_head`` stay as they are. ``include`` / ``exclude``
    default to ``cfg.include`` / ``cfg.exclude``. Apply before activation checkpointing,
    ``torch.compile`` and FSDP. A selected layer whose input size is not a multiple of 4 raises
    ``InputError`` naming it, or is skipped with ``skip_incompatible``. Returns the swapped names.
    """
    cfg = cfg or LCQConfig()
    include = cfg.include if include is None else include
    exclude = cfg.exclude if exclude is None else exclude
    swapped = []
    for name, lin in select_linears(model, include, exclude):
        if lin.in_features % VEC:
            if skip_incompatible:
                continue
            _check_in_features(lin.in_features, lin.out_features, name)
        set_submodule(model, name, LCQLinear.from_linear(lin, cfg, name).to(lin.weight.device))
        swapped.append(name)
    return swapped
