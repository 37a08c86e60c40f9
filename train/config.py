"""Training and data configs, and the run config that joins them with the model config.

A run is described by one YAML file with three sections::

    model: {flavour: debug, ...}      # -> cheers.config.ModelConfig (flavour + overrides)
    train: {steps: 100, lr: 1e-4, ...} # -> TrainConfig
    data:  {shards: [...], ...}        # -> DataConfig

plus dotted overrides on the command line (``train.lr=3e-4``). Loading is strict: an
unknown key anywhere is a ``ConfigError`` naming it. The resolved config is written as
``config.json`` in every checkpoint, and ``run_config_from_dict`` reads it back.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from cheers.config import (
    ModelConfig,
    from_dict,
    load_yaml,
    merge,
    model_config_from_dict,
    parse_overrides,
    recipe_path,
    to_dict,
)
from cheers.errors import ConfigError
from cheers.lcqat.lcq_linear import LCQConfig

TASKS = ("t2i", "i2t", "text")


def _default_peak_tflops() -> dict[str, float]:
    # Dense bf16 tensor-core peaks from the vendors' data sheets (TFLOP/s per device),
    # matched as a substring of torch.cuda.get_device_name().
    return {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0, "4090": 165.0}


@dataclass(kw_only=True)
class TrainConfig:
    """Optimisation, parallelism, checkpointing and logging of one training run.

    Batch sizes count samples. ``global_batch = world_size * micro_batch * grad_accum``;
    ``grad_accum = 0`` derives it from the other three.
    """

    # where the model and the collate function come from ("module:attribute"); tests
    # point this at a toy task, every real recipe keeps the default
    task: str = "cheers.train.task:CheersTask"

    # --- length and batch
    steps: int = 1000
    global_batch: int = 8
    micro_batch: int = 1
    grad_accum: int = 0

    # --- optimiser (AdamW) and schedule
    lr: float = 1e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    weight_decay: float = 0.0
    schedule: Literal["constant", "cosine", "wsd"] = "constant"
    warmup_frac: float = 0.0
    warmup_steps: int | None = None  # set: overrides warmup_frac
    decay_frac: float = 0.1  # wsd: the last fraction of the steps decays linearly
    min_lr_ratio: float = 0.0  # cosine / wsd end at lr * min_lr_ratio
    grad_clip: float = 1.0  # max global grad norm; 0 = no clipping (the norm is still logged)
    ema_decay: float = 0.0  # 0 = no EMA

    # --- what trains: parameter-name patterns (see cheers.train.optim.select_trainable)
    trainable: list[str] = field(default_factory=lambda: ["*"])
    # an exported folder (config.json + model.safetensors) to start from
    init_from: str | None = None
    seed: int = 0

    # --- checkpoints
    out_dir: str = "runs/debug"
    ckpt_every: int = 1000
    keep_last: int = 3
    resume: str = "auto"  # "auto": latest checkpoint in out_dir; "never"; or a checkpoint path
    stop_after: int | None = None  # leave cleanly after this step (a job's time slice)
    # wall-clock budget of this run: training ends (with a checkpoint) once it is spent, and the
    # schedule runs on whichever is further along, steps or time (a time-boxed demo or job)
    max_seconds: float | None = None

    # --- logging
    log_every: int = 10
    tensorboard: bool = True
    progress: bool = True
    peak_tflops: dict[str, float] = field(default_factory=_default_peak_tflops)

    # --- parallelism and numerics
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["fp32", "bf16"] = "bf16"  # bf16 = FSDP2 bf16 params, fp32 reductions (GPU only)
    fsdp: bool = True
    reshard_after_forward: bool = True
    activation_checkpointing: bool = False
    compile: bool = False

    def __post_init__(self) -> None:
        positive = {"steps": self.steps, "global_batch": self.global_batch,
                    "micro_batch": self.micro_batch, "ckpt_every": self.ckpt_every,
                    "log_every": self.log_every, "keep_last": self.keep_last}
        for name, value in positive.items():
            if value < 1:
                raise ConfigError(f"train.{name} must be >= 1, got {value}")
        if self.grad_accum < 0:
            raise ConfigError(f"train.grad_accum must be >= 0 (0 = derived), got {self.grad_accum}")
        if self.lr <= 0:
            raise ConfigError(f"train.lr must be > 0, got {self.lr}")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ConfigError(f"train.betas must be two numbers in [0, 1), got {self.betas}")
        if not 0.0 <= self.warmup_frac < 1.0:
            raise ConfigError(f"train.warmup_frac must be in [0, 1), got {self.warmup_frac}")
        if self.warmup_steps is not None and self.warmup_steps < 0:
            raise ConfigError(f"train.warmup_steps must be >= 0, got {self.warmup_steps}")
        if not 0.0 < self.decay_frac <= 1.0:
            raise ConfigError(f"train.decay_frac must be in (0, 1], got {self.decay_frac}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ConfigError(f"train.ema_decay must be in [0, 1), got {self.ema_decay}")
        if self.grad_clip < 0:
            raise ConfigError(f"train.grad_clip must be >= 0, got {self.grad_clip}")
        if not self.trainable:
            raise ConfigError("train.trainable is empty: nothing would train")
        if ":" not in self.task:
            raise ConfigError(f"train.task={self.task!r} must be 'module:attribute'")
        if self.max_seconds is not None and self.max_seconds <= 0:
            raise ConfigError(f"train.max_seconds must be > 0, got {self.max_seconds}")
        if self.stop_after is not None and self.stop_after < 1:
            raise ConfigError(f"train.stop_after must be >= 1, got {self.stop_after}")

    @property
    def warmup(self) -> int:
        """Warm-up length in optimiser steps."""
        if self.warmup_steps is not None:
            return self.warmup_steps
        return round(self.warmup_frac * self.steps)

    def grad_accum_for(self, world_size: int) -> int:
        """Micro-batches per rank and step; raises ConfigError when the batch does not split."""
        per_step = world_size * self.micro_batch
        if self.grad_accum:
            if per_step * self.grad_accum != self.global_batch:
                raise ConfigError(
                    f"train.global_batch={self.global_batch} != world size {world_size} x "
                    f"train.micro_batch={self.micro_batch} x train.grad_accum={self.grad_accum}"
                )
            return self.grad_accum
        if self.global_batch % per_step:
            raise ConfigError(
                f"train.global_batch={self.global_batch} is not divisible by world size "
                f"{world_size} x train.micro_batch={self.micro_batch} = {per_step}"
            )
        return self.global_batch // per_step


@dataclass(kw_only=True)
class DataConfig:
    """WebDataset shards (``{key}.png|jpg`` + ``{key}.json``, as ``cheers.train.data`` reads them),
    mixed by task.

    ``shards`` entries are local paths with brace patterns (``data/t2i-{000..127}.tar``)
    or globs. A task listed in ``task_shards`` reads only those shards (cheaper than
    filtering mixed shards: each enabled task scans the shards it reads).

    ``jsonl``: JSONL files in the ``cheers data`` format (``cheers.data_format.SCHEMA``), read
    directly beside ``shards`` (either may be empty): checked at start-up as ``cheers data
    check`` checks them, bad lines logged and left out; images whose short side is below
    ``min_image_side`` pixels count as bad.
    """

    shards: list[str] = field(default_factory=list)
    jsonl: list[str] = field(default_factory=list)
    min_image_side: int = 32
    task_shards: dict[str, list[str]] = field(default_factory=dict)
    ratios: dict[str, float] = field(default_factory=lambda: {"t2i": 1.0, "i2t": 0.0, "text": 0.0})
    image_size: int | None = None  # None: model.tokenizer.image_size
    text_tokenizer_dir: str = ""
    shuffle_buffer: int = 1000  # samples shuffled together (a window across shard boundaries)
    shuffle_shards: bool = True  # a new shard order every epoch
    # logical data streams; rank r reads streams r, r + world, ... . Fix it (a multiple of
    # every world size you use) to get the same global batches on any number of ranks;
    # 0 = one stream per rank.
    num_streams: int = 0
    num_workers: int = 2  # image-decoding threads per rank (0: decode inline)

    def __post_init__(self) -> None:
        for name, value in self.ratios.items():
            if name not in TASKS:
                raise ConfigError(f"data.ratios: unknown task {name!r} (tasks: {', '.join(TASKS)})")
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise ConfigError(f"data.ratios.{name} must be a number >= 0, got {value!r}")
        if sum(self.ratios.values()) <= 0:
            raise ConfigError(f"data.ratios must have a positive entry, got {self.ratios}")
        for name, value in self.task_shards.items():
            if name not in TASKS:
                raise ConfigError(f"data.task_shards: unknown task {name!r}")
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise ConfigError(f"data.task_shards.{name} must be a list of paths, got {value!r}")
        if self.num_streams < 0 or self.num_workers < 0 or self.shuffle_buffer < 0:
            raise ConfigError("data.num_streams, data.num_workers, data.shuffle_buffer must be >= 0")
        if not isinstance(self.jsonl, list) or not all(isinstance(v, str) and v for v in self.jsonl):
            raise ConfigError(f"data.jsonl must be a list of JSONL paths, got {self.jsonl!r}")
        if self.min_image_side < 0:
            raise ConfigError(f"data.min_image_side must be >= 0, got {self.min_image_side}")

    def shards_for(self, task: str) -> list[str]:
        """The shard patterns the stream of ``task`` reads."""
        return self.task_shards.get(task, self.shards)


@dataclass(kw_only=True)
class LCQATConfig:
    """Quantization-aware training of the LLM's linears with LC-QAT (``cheers.lcqat``).

    With ``enabled`` the LLM's ``nn.Linear`` layers (``layer.include`` / ``layer.exclude``
    globs on names under ``llm``; embeddings and ``lm_head`` stay) become ``LCQLinear`` before
    activation checkpointing, compile and FSDP. They start from ``init``, a packed folder
    written by ``cheers quantize --method lcqat`` (the whole model: PTQ'd layers and every other
    tensor), or without it from ``train.init_from``'s dense weights rounded data-free. What
    trains is ``train.trainable`` as usual (e.g. ``["llm.layers"]``: theta, A, b, SU, SV, norms).
    Loss: the model's own (next-token CE + flow) plus ``distill_weight`` x KL(teacher ||
    student) over the text targets at ``temperature``; the teacher is the full-precision
    ``teacher`` folder (default: ``train.init_from``). ``cheers export`` writes the packed form.
    """

    enabled: bool = False
    init: str | None = None
    teacher: str | None = None
    distill_weight: float = 0.0
    temperature: float = 1.0
    layer: LCQConfig = field(default_factory=LCQConfig)

    def __post_init__(self) -> None:
        if self.distill_weight < 0:
            raise ConfigError(f"lcqat.distill_weight must be >= 0, got {self.distill_weight}")
        if self.temperature <= 0:
            raise ConfigError(f"lcqat.temperature must be > 0, got {self.temperature}")


def _default_lora_targets() -> list[str]:
    from cheers.lora import DEFAULT_TARGETS

    return list(DEFAULT_TARGETS)


@dataclass(kw_only=True)
class LoRAConfig:
    """LoRA fine-tuning through ``peft`` (``cheers.lora``): low-rank adapters on the layers whose
    module names match ``target`` (``fnmatch`` globs; default: the LLM's attention and MLP
    projections), scaled by ``alpha / rank``, with ``dropout`` on their input.

    With ``enabled`` every other parameter is frozen except those matching ``train_fully``
    (``train.trainable`` syntax, e.g. ``["head"]`` for the flow head); ``train.trainable`` must
    stay unset. The base weights come from ``train.init_from`` (or ``lcqat.init``) and are not
    saved: checkpoints hold the adapters, the fully-trained tensors and the optimizer state.
    """

    enabled: bool = False
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target: list[str] = field(default_factory=_default_lora_targets)
    train_fully: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise ConfigError(f"lora.rank must be >= 1, got {self.rank}")
        if self.alpha <= 0:
            raise ConfigError(f"lora.alpha must be > 0, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"lora.dropout must be in [0, 1), got {self.dropout}")
        if not self.target or not all(isinstance(t, str) and t for t in self.target):
            raise ConfigError(f"lora.target must be a non-empty list of module-name patterns, got {self.target!r}")
        if not all(isinstance(t, str) and t and not t.startswith("!") for t in self.train_fully):
            raise ConfigError(f"lora.train_fully must list parameter-name patterns, got {self.train_fully!r}")

    def peft(self):
        """peft's ``LoraConfig`` of these settings."""
        from cheers.lora import peft_config

        return peft_config(rank=self.rank, alpha=self.alpha, dropout=self.dropout, target=self.target)

    def trainable(self) -> list[str]:
        """What trains, as ``train.trainable`` patterns: the adapters and ``train_fully``."""
        from cheers.lora import ADAPTER_PATTERNS

        return [*ADAPTER_PATTERNS, *self.train_fully]


@dataclass(kw_only=True)
class RunConfig:
    """Everything one run needs: model, training and data configs (and optional LC-QAT)."""

    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    lcqat: LCQATConfig = field(default_factory=LCQATConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)

    def __post_init__(self) -> None:
        lc = self.lcqat
        if self.lora.enabled:
            if self.train.trainable != ["*"]:
                raise ConfigError(f"train.trainable={self.train.trainable} with lora.enabled: what trains is "
                                  "the adapters plus lora.train_fully; leave train.trainable unset")
            if self.train.init_from is None and not (lc.enabled and lc.init is not None):
                raise ConfigError("lora.enabled needs the base model to adapt: set train.init_from "
                                  "(or lcqat.init for a 2-bit base)")
        if lc.enabled and lc.distill_weight > 0 and (lc.teacher or self.train.init_from) is None:
            raise ConfigError("lcqat.distill_weight > 0 needs a teacher: set lcqat.teacher or train.init_from")
        if lc.init is not None and not lc.enabled:
            raise ConfigError("lcqat.init is set but lcqat.enabled is false")
        size = self.data.image_size
        if size is not None and size != self.model.tokenizer.image_size:
            raise ConfigError(
                f"data.image_size={size} differs from model.tokenizer.image_size="
                f"{self.model.tokenizer.image_size}; leave data.image_size unset to follow the model"
            )

    @property
    def image_size(self) -> int:
        """Side of the square training images in pixels."""
        return self.data.image_size or self.model.tokenizer.image_size

    def to_dict(self) -> dict[str, Any]:
        """Plain, JSON-able form (what ``config.json`` holds)."""
        return {"model": to_dict(self.model), "train": dataclasses.asdict(self.train),
                "data": dataclasses.asdict(self.data), "lcqat": dataclasses.asdict(self.lcqat),
                "lora": dataclasses.asdict(self.lora)}


def run_config_from_dict(data: dict[str, Any]) -> RunConfig:
    """Strictly build a RunConfig from ``{"model", "train", "data", "lcqat", "lora"}`` sections."""
    unknown = sorted(set(data) - {"model", "train", "data", "lcqat", "lora"})
    if unknown:
        raise ConfigError(f"unknown config key {unknown[0]} (valid top-level keys: data, lcqat, lora, model, train)")
    for section in ("model", "train", "data", "lcqat", "lora"):
        if not isinstance(data.get(section, {}), dict):
            raise ConfigError(f"{section}: expected a mapping, got {data[section]!r}")
    model = model_config_from_dict(data.get("model", {}))
    train = from_dict(TrainConfig, data.get("train", {}), prefix="train.")
    data_cfg = from_dict(DataConfig, data.get("data", {}), prefix="data.")
    lcqat = from_dict(LCQATConfig, data.get("lcqat", {}), prefix="lcqat.")
    lora = from_dict(LoRAConfig, data.get("lora", {}), prefix="lora.")
    return RunConfig(model=model, train=train, data=data_cfg, lcqat=lcqat, lora=lora)


def lora_run_config(base: str | Path, *, shards: list[str], out_dir: str | Path, steps: int,
                    recipe: str | Path = "lora-shapes", overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """The run config of a LoRA fine-tuning of the checkpoint folder ``base`` (its model config,
    weights and text tokenizer) on ``shards`` for ``steps`` steps into ``out_dir``: the recipe
    (a path or a shipped name) with those filled in, then dotted ``overrides``."""
    from cheers.checkpoint import load_config
    from cheers.config import recipe_path

    raw = load_yaml(recipe_path(recipe))
    raw["model"] = to_dict(load_config(base)[0])
    raw = merge(raw, {"train": {"init_from": str(base), "out_dir": str(out_dir), "steps": steps},
                      "data": {"shards": [str(s) for s in shards], "text_tokenizer_dir": str(base)}})
    return run_config_from_dict(merge(raw, _numbers(parse_overrides(list(overrides)))))


# YAML 1.1 reads "1e-4" (no dot) as a string; on a command line it is meant as a number
_EXP_FLOAT = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+$")


def _numbers(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _numbers(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_numbers(v) for v in value]
    if isinstance(value, str) and _EXP_FLOAT.match(value):
        return float(value)
    return value


def load_run_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """A RunConfig from a YAML file or a shipped recipe's name (or none: defaults) and dotted
    overrides."""
    raw = load_yaml(recipe_path(path)) if path is not None else {}
    raw = merge(raw, _numbers(parse_overrides(list(overrides))))
    return run_config_from_dict(raw)
