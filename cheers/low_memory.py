"""Inference in less memory: weight-only int8 / fp8 linears (torchao) and CPU offload (accelerate).

``quantize_weights(model, "int8")`` swaps the weights of the LLM's and the flow head's
``nn.Linear`` layers for torchao's weight-only tensors (``Int8WeightOnlyConfig``: int8 values
with one fp scale per output row; ``Float8WeightOnlyConfig``: e4m3 values, GPUs of compute
capability 8.9 or more); activations keep the model's dtype. The tied ``lm_head`` (it is the
embedding table), LC-QAT's packed 2-bit layers and LoRA adapters stay as they are.

``offload(model, mode, device)`` keeps the weights in CPU memory and runs on ``device``:

* ``model``: the three parts (vision tokenizer, LLM, flow head) move to the GPU whole when one
  of their layers is called, and the part used before goes back (peak: the largest part);
* ``sequential``: accelerate's ``cpu_offload`` streams each layer's weights in for its own
  call (peak: one layer; slowest).
"""

from __future__ import annotations

import torch
from torch import nn

from cheers.errors import InputError

WEIGHT_MODES = ("int8", "fp8")
OFFLOAD_MODES = ("model", "sequential")
QUANTIZED_PARTS = ("llm.", "head.")
# the tied output head is the embedding table; the adapters are small and train in full precision
_KEEP = ("llm.lm_head",)


def check_options(device: str | torch.device, weights: str | None, offload: str | None) -> None:
    """Refuse ``--weights`` / ``--offload`` values this machine cannot run, before any loading."""
    dev = torch.device(device)
    if weights is not None and weights not in WEIGHT_MODES:
        raise InputError(f"--weights {weights!r}: expected one of {', '.join(WEIGHT_MODES)}")
    if offload is not None and offload not in OFFLOAD_MODES:
        raise InputError(f"--offload {offload!r}: expected one of {', '.join(OFFLOAD_MODES)}")
    if weights == "fp8":
        if dev.type != "cuda" or not torch.cuda.is_available():
            raise InputError("--weights fp8 needs a CUDA GPU (--device cuda); on a CPU use --weights int8")
        major, minor = torch.cuda.get_device_capability(dev)
        if (major, minor) < (8, 9):
            raise InputError(f"--weights fp8 needs a GPU of compute capability 8.9 or more (Ada, Hopper); "
                             f"{torch.cuda.get_device_name(dev)} is {major}.{minor}: use --weights int8")
    if offload is not None:
        if not torch.cuda.is_available():
            raise InputError(f"--offload {offload} moves weights between CPU and GPU memory, and no CUDA GPU "
                             "is visible; without a GPU the model already lives in CPU memory: drop --offload")
        if dev.type != "cuda":
            raise InputError(f"--offload {offload} runs the model on a GPU: add --device cuda")


def linears_to_quantize(model: nn.Module) -> list[str]:
    """Names of the ``nn.Linear`` layers ``quantize_weights`` converts."""
    return [n for n, m in model.named_modules()
            if type(m) is nn.Linear and n.startswith(QUANTIZED_PARTS) and n not in _KEEP
            and ".lora_A." not in n and ".lora_B." not in n]


def quantize_weights(model: nn.Module, mode: str) -> list[str]:
    """Weight-only quantization of the LLM's and the flow head's linears in place (torchao);
    returns the converted layer names."""
    from torchao.quantization import Float8WeightOnlyConfig, Int8WeightOnlyConfig, quantize_

    if mode not in WEIGHT_MODES:
        raise InputError(f"--weights {mode!r}: expected one of {', '.join(WEIGHT_MODES)}")
    names = set(linears_to_quantize(model))
    if not names:
        raise InputError("--weights: the model has no LLM or flow-head linear layers to quantize")
    config = Int8WeightOnlyConfig() if mode == "int8" else Float8WeightOnlyConfig()
    quantize_(model, config, filter_fn=lambda module, fqn: fqn in names)
    return sorted(names)


def weight_bytes(model: nn.Module) -> int:
    """Bytes of the model's parameters and buffers as stored (int8 values and scales of a
    quantized weight counted as such; a tied tensor once)."""
    seen: set[int] = set()
    total = 0
    for t in [*model.parameters(), *model.buffers()]:
        if id(t) in seen:
            continue
        seen.add(id(t))
        inner = [getattr(t, a) for a in getattr(t, "__tensor_flatten__", lambda: ([], None))()[0]]
        for x in inner or [t]:
            total += x.numel() * x.element_size()
    return total


# --------------------------------------------------------------------------- offload


def offload(model: nn.Module, mode: str, device: str | torch.device, *, hollow: bool = False) -> nn.Module:
    """Keep ``model``'s weights in CPU memory and run it on ``device``; ``model.execution_device``
    tells the engine where inputs go. In place; returns the model.

    accelerate's hooks (``ModelHook`` on every module whose tensors lie in one group) move that
    group of tensors to ``device`` when the module is called and the group used before back.
    Groups are whole parts (``model``) or blocks (``sequential``: each transformer block, and
    each remaining top-level module). Hooks sit on the modules because the engine calls the parts
    through several methods (``encode``, ``hidden_states``, ``logits``), never through one
    forward, and a group holds every tensor a module's forward may read (SigLIP's position table
    is read by its parent, a tied ``lm_head`` is the embedding). Weights are read-only here, so
    a group leaves the device by pointing back at its CPU copy. ``hollow`` (tests) leaves the
    inactive groups as empty tensors, so that a read outside the hooks fails loudly."""
    if mode not in OFFLOAD_MODES:
        raise InputError(f"--offload {mode!r}: expected one of {', '.join(OFFLOAD_MODES)}")
    device = torch.device(device)
    model.to("cpu")
    groups = _part_groups(model) if mode == "model" else _block_groups(model)
    _attach(model, groups, device, hollow)
    model.execution_device = device
    return model


def _tensors(module: nn.Module, prefix: str) -> dict[int, tuple[str, torch.Tensor]]:
    found = {id(t): (f"{prefix}.{n}", t) for n, t in module.named_parameters()}
    found.update({id(t): (f"{prefix}.{n}", t) for n, t in module.named_buffers()})
    return found


def _part_groups(model: nn.Module) -> list[dict[int, tuple[str, torch.Tensor]]]:
    return [_tensors(getattr(model, name), name) for name in ("tokenizer", "llm", "head")]


def _block_groups(model: nn.Module) -> list[dict[int, tuple[str, torch.Tensor]]]:
    units = list(model.fsdp_units())  # the transformer blocks of SigLIP, the LLM and the head
    unit_names = {id(u): n for n, u in model.named_modules() if any(u is v for v in units)}
    groups = [_tensors(u, unit_names[id(u)]) for u in units]
    taken = {k for g in groups for k in g}
    rest: dict[str, dict[int, tuple[str, torch.Tensor]]] = {}
    for key, (name, t) in _tensors(model, "").items():
        if key not in taken:
            top = ".".join(name.strip(".").split(".")[:2])  # tokenizer.vae, llm.embed_tokens, head.gate
            rest.setdefault(top, {})[key] = (name, t)
    return groups + list(rest.values())


def _attach(model: nn.Module, groups: list[dict[int, tuple[str, torch.Tensor]]], device: torch.device,
            hollow: bool) -> None:
    from accelerate.hooks import ModelHook, add_hook_to_module
    from accelerate.utils import send_to_device

    active: list[int | None] = [None]  # the group on the device
    cpu = {key: t.data for g in groups for key, (_, t) in g.items()}

    def park(group: dict[int, tuple[str, torch.Tensor]]) -> None:
        for key, (_, t) in group.items():
            t.data = cpu[key].new_empty(0) if hollow else cpu[key]

    for g in groups:
        park(g)

    class GroupOnDevice(ModelHook):
        def __init__(self, index: int) -> None:
            self.index = index

        def pre_forward(self, module, *args, **kwargs):
            if active[0] != self.index:
                if active[0] is not None:
                    park(groups[active[0]])
                for key, (_, t) in groups[self.index].items():
                    t.data = cpu[key].to(device)
                active[0] = self.index
            return send_to_device(args, device), send_to_device(kwargs, device)

    owner = {key: i for i, g in enumerate(groups) for key in g}
    for module in model.modules():
        # every module whose tensors lie in one group, containers too: a forward may read a
        # child's buffers through a method (the VAE's latent statistics) before calling any layer
        found = {owner[k] for k in _tensors(module, "")}
        if len(found) == 1:
            add_hook_to_module(module, GroupOnDevice(found.pop()), append=True)
