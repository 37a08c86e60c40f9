"""LC-QAT in the trainer: the module swap, the student's starting state, and distillation.

The trainer calls ``swap_llm_linears`` right after building the model, before activation
checkpointing, compile and FSDP (``parallelize``), so those wrap the ``LCQLinear`` layers like
any other. The starting state (``student_state``) is built on rank 0 from a folder and then
broadcast like any ``train.init_from``. ``Distiller`` replaces ``model(batch)`` in the step when
``lcqat.distill_weight > 0``.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cheers.lcqat.lcq_linear import LCQLinear, apply_lcqat, select_linears, set_submodule
from cheers.sequence import IGNORE

from .config import LCQATConfig, RunConfig
from .parallelize import DistEnv

LLM_PREFIX = "llm."


def swap_llm_linears(model: nn.Module, lc: LCQATConfig, *, empty: bool) -> list[str]:
    """Swap the LLM's selected ``nn.Linear`` layers for ``LCQLinear`` in place; returns their
    names in the model (``llm.layers.0.self_attn.q_proj``, ...).

    ``empty``: the model is on the meta device and its weights come from a file later
    (``student_state``): only the structure is built. Otherwise the layers are rounded from the
    model's current (random) weights with no data.
    """
    llm = model.get_submodule(LLM_PREFIX.rstrip("."))
    cfg = lc.layer
    if not empty:
        return [LLM_PREFIX + n for n in apply_lcqat(llm, cfg)]
    names = []
    for name, lin in select_linears(llm, cfg.include, cfg.exclude):
        q = LCQLinear(
            lin.in_features,
            lin.out_features,
            lin.bias is not None,
            cfg,
            LLM_PREFIX + name,
            device=lin.weight.device,
        )
        set_submodule(llm, name, q)
        names.append(LLM_PREFIX + name)
    return names


def student_state(
    weights: dict[str, Tensor], folder: str | Path, names: list[str], lc: LCQATConfig
) -> dict[str, Tensor]:
    """The state dict QAT starts from, given the tensors of checkpoint ``folder``: packed
    layers unpacked (a ``cheers quantize`` folder), dense ones rounded data-free."""
    from cheers.checkpoint import quantization_of
    from cheers.errors import CheckpointError
    from cheers.lcqat.pack import lcq_state

    section = quantization_of(folder)
    if section is not None and section["quant_method"] != "lcqat":
        raise CheckpointError(
            f"{folder}: {section['quant_method']} weights (fake-quantized) cannot start LC-QAT; "
            "use a full-precision folder or one written by `cheers quantize --method lcqat`"
        )
    return lcq_state(weights, names, lc.layer, section, source=str(folder))


def kl_distillation(student: Tensor, teacher: Tensor, temperature: float) -> Tensor:
    """``T^2 KL(softmax(teacher / T) || softmax(student / T))`` averaged over rows. [N, V] -> []"""
    s = F.log_softmax(student.float() / temperature, dim=-1)
    t = F.log_softmax(teacher.float() / temperature, dim=-1)
    return F.kl_div(s, t, log_target=True, reduction="batchmean") * temperature**2


class Distiller:
    """``distiller(model, batch)``: the student's losses plus ``weight`` x KL to a frozen
    full-precision teacher on the text targets. Both forwards draw the same noise and times
    (one generator seed per call, from the global RNG that checkpoints save), so they see the
    same inputs. Returns the scalar losses ``{"loss", "ce", "flow", "kl"}``."""

    def __init__(self, teacher: nn.Module, weight: float, temperature: float) -> None:
        self.teacher = teacher.eval().requires_grad_(False)
        self.weight, self.temperature = weight, temperature

    def __call__(self, model: nn.Module, batch) -> dict[str, Tensor]:
        device = batch.input_ids.device
        seed = int(torch.randint(0, 2**62, ()))
        out = model(batch, generator=torch.Generator(device).manual_seed(seed), return_outputs=True)
        with torch.no_grad():
            ref = self.teacher(
                batch, generator=torch.Generator(device).manual_seed(seed), return_outputs=True
            )
        has_target = batch.targets != IGNORE
        if has_target.any():
            # the [T, V] logits of both models at the text targets (fine at the shapes vocabulary;
            # a 152k vocabulary wants a chunked KL like cheers.losses' chunked CE)
            student = model.llm.logits(out["hidden"][has_target])
            teacher = self.teacher.llm.logits(ref["hidden"][has_target])
            kl = kl_distillation(student, teacher, self.temperature)
        else:
            kl = out["loss"].new_zeros(())
        return {
            "loss": out["loss"] + self.weight * kl,
            "ce": out["ce"],
            "flow": out["flow"],
            "kl": kl.detach(),
        }


def build_distiller(cfg: RunConfig, env: DistEnv) -> Distiller | None:
    """The run's ``Distiller`` (None without distillation); every rank loads the teacher."""
    lc = cfg.lcqat
    if not (lc.enabled and lc.distill_weight > 0):
        return None
    from cheers.checkpoint import load_pretrained

    teacher = load_pretrained(lc.teacher or cfg.train.init_from, device=env.device)
    return Distiller(teacher, lc.distill_weight, lc.temperature)
