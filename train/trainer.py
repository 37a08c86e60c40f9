"""The training loop: one code path from a CPU process to FSDP2 across nodes.

``train(cfg)`` builds the data stream, the model (``train.task``), wraps it
(``parallelize``), restores the latest checkpoint when there is one, and runs
``train.steps`` optimiser steps of ``grad_accum`` micro-batches each. Every
``ckpt_every`` steps (and at the end, or at ``stop_after``) it writes a checkpoint that
resumes bit for bit; every ``log_every`` steps it logs the loss components, learning
rate, gradient norm, tokens/s and an MFU estimate to the console, ``metrics.jsonl`` and
TensorBoard.
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor
from tqdm import tqdm

from cheers.errors import ConfigError
from cheers.lora import adapter_shapes, add_adapters, base_names, initial_adapter_state

from .checkpoint import (
    init_from_export,
    list_checkpoints,
    load_checkpoint,
    resolve_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from .config import RunConfig
from .data import SKIP_REASONS, SampleLoader
from .ema import EMA
from .optim import build_optimizer, frozen_modules, lr_at, select_trainable, set_lr
from .parallelize import DistEnv, autocast, init_distributed, parallelize, shutdown_distributed
from .qat import build_distiller, student_state, swap_llm_linears
from .task import Task, load_task

log = logging.getLogger("cheers.train")


@dataclass
class TrainResult:
    """What a run did. ``history`` (rank 0 only) holds the logged metrics, one dict per log."""

    step: int
    out_dir: Path
    trainable: list[str]
    skipped: dict[str, int]
    history: list[dict[str, float]] = field(default_factory=list)
    checkpoint: Path | None = None
    ema: bool = False  # the checkpoint holds EMA weights (export them with ema=True)


def train(cfg: RunConfig, task: Task | None = None) -> TrainResult:
    """Run (or resume) the training described by ``cfg``; ``task`` overrides ``train.task``."""
    env = init_distributed(cfg.train.device, need_group=cfg.train.fsdp)
    ok = False
    try:
        result = Trainer(cfg, env, task).run()
        ok = True
        return result
    finally:
        if ok:
            shutdown_distributed(env)
        elif env.owns_group and dist.is_initialized():
            # a failing rank cannot wait in a barrier for peers that may be stuck elsewhere
            dist.destroy_process_group()


def adapted_state(weights: dict[str, torch.Tensor], folder: Path, *, inner, rename: dict[str, str],
                  start: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A LoRA run's starting state from the base folder's tensors: the base (through ``inner``,
    LC-QAT's conversion, when set) under the adapted model's names, plus the adapters' start."""
    if inner is not None:
        weights = inner(weights, folder)
    out = {rename.get(k, k): v for k, v in weights.items()}
    out.update(start)
    return out


def finetune_lora(base: str | Path, shards: list[str], out_dir: str | Path, *, steps: int,
                  recipe: str | Path = "lora-shapes", overrides: list[str] | tuple[str, ...] = (),
                  export_to: str | Path | None = None, merge: bool = False) -> TrainResult:
    """LoRA-fine-tune the checkpoint folder ``base`` on ``shards`` for ``steps`` optimiser steps
    (``cheers.train.config.lora_run_config``; the recipe's other settings, dotted ``overrides``
    on top). With ``export_to`` the last checkpoint is exported there: the adapter folder that
    ``Pipeline.from_pretrained(base, lora=...)`` applies, or with ``merge`` a plain checkpoint."""
    from .checkpoint import export
    from .config import lora_run_config

    cfg = lora_run_config(base, shards=shards, out_dir=out_dir, steps=steps, recipe=recipe, overrides=overrides)
    result = train(cfg)
    if export_to is not None:
        export(result.out_dir, export_to, ema=result.ema, merge=merge)
    return result


def _seed_all(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def _count_params(model: nn.Module) -> tuple[int, int]:
    """(all parameters, those that multiply activations), each tensor counted once.

    The second is the N of the 6 N FLOPs-per-token estimate: an embedding lookup costs no
    FLOPs, but a table tied to ``lm_head`` is a matmul and counts.
    """
    matmul = {id(m.weight) for m in model.modules() if isinstance(m, nn.Linear)}
    seen: set[int] = set()
    total = flop = 0
    for module in model.modules():
        for p in module.parameters(recurse=False):
            if id(p) in seen:
                continue
            seen.add(id(p))
            total += p.numel()
            if not isinstance(module, nn.Embedding) or id(p) in matmul:
                flop += p.numel()
    return total, flop


class Trainer:
    """State of one run on one rank. Build with ``Trainer(cfg, env)``, then ``run()``."""

    _t_start = 0.0  # wall clock at the start of run()
    _frac = 0.0  # spent fraction of train.max_seconds at the current step

    def __init__(self, cfg: RunConfig, env: DistEnv, task: Task | None = None):
        self.cfg, self.env = cfg, env
        tc = cfg.train
        self.accum = tc.grad_accum_for(env.world_size)
        num_streams = cfg.data.num_streams or env.world_size
        if num_streams % env.world_size:
            raise ConfigError(
                f"data.num_streams={num_streams} is not a multiple of the world size {env.world_size}"
            )
        if tc.global_batch % num_streams:
            raise ConfigError(
                f"train.global_batch={tc.global_batch} is not divisible by data.num_streams="
                f"{num_streams}: every data stream gives the same number of samples per step"
            )
        self.out_dir = Path(tc.out_dir)
        self.resume_from = self._resume_path()

        # data first: a missing shard should fail before minutes of model building
        self.loader = SampleLoader(cfg.data, image_size=cfg.image_size, rank=env.rank,
                                   world_size=env.world_size, seed=tc.seed, model=cfg.model)
        try:
            self._setup(task)
        except BaseException:
            self.loader.close()  # its decode threads would outlive the failed run
            raise

    def _setup(self, task: Task | None) -> None:
        cfg, env, tc = self.cfg, self.env, self.cfg.train
        task = task if task is not None else load_task(tc.task)
        self.collate = task.build_collate(cfg)  # a tokenizer that does not fit fails before the model is built
        self.model, self.trainable = self._build_model(task)
        self.frozen = frozen_modules(self.model)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = build_optimizer(self.model, tc)
        self.ema = EMA(self.model, tc.ema_decay) if tc.ema_decay > 0 else None
        self.distiller = build_distiller(cfg, env)
        self.step, self.tokens_seen = 0, 0
        # per-rank stream of randomness (noise, t, CFG drop), distinct across ranks
        _seed_all(tc.seed * 1_000_003 + 17 * (env.rank + 1))
        if self.resume_from is not None:
            self._restore(self.resume_from)
        elif env.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            (self.out_dir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
            (self.out_dir / "metrics.jsonl").write_text("")
        self.peak_flops = self._peak_flops()

    # ------------------------------------------------------------------ setup

    def _resume_path(self) -> Path | None:
        resume = self.cfg.train.resume
        found = list_checkpoints(self.out_dir)
        if resume == "auto":
            return found[-1] if found else None
        if resume == "never":
            if found:
                raise ConfigError(
                    f"train.out_dir={self.out_dir} already holds checkpoints ({found[-1].name}); "
                    "set train.resume=auto to continue that run or choose another train.out_dir"
                )
            return None
        return resolve_checkpoint(resume)

    def _build_model(self, task: Task) -> tuple[nn.Module, list[str]]:
        tc, env, lc = self.cfg.train, self.env, self.cfg.lcqat
        # the same seed on every rank: a CPU-built model is identical everywhere before
        # sharding, so runs on 1 and N ranks start from the same weights
        _seed_all(tc.seed)
        source = lc.init if lc.enabled and lc.init is not None else tc.init_from
        meta_init = source is not None
        if meta_init:
            # weights come from a file: skip the random init, allocate only the shards
            with torch.device("meta"):
                model = task.build_model(self.cfg.model)
        else:
            model = task.build_model(self.cfg.model)
            if hasattr(model, "init_weights"):
                model.init_weights()
        convert = None
        if lc.enabled:  # a module swap, before checkpointing, compile and FSDP wrap the model
            lcq_names = swap_llm_linears(model, lc, empty=meta_init)
            convert = partial(student_state, names=lcq_names, lc=lc)
            if env.is_main:
                log.info("lcqat: %d LLM linears are LCQLinear (start: %s)", len(lcq_names),
                         source or "random weights, rounded")
        if self.cfg.lora.enabled:  # after the LC-QAT swap (adapters may wrap its layers), before FSDP
            adapted = add_adapters(model, self.cfg.lora.peft())
            convert = partial(adapted_state, inner=convert, rename=base_names(model),
                              start=initial_adapter_state(adapter_shapes(model), tc.seed))
            if env.is_main:
                log.info("lora: adapters on %d layers (rank %d), base from %s", len(adapted),
                         self.cfg.lora.rank, source)
        trainable = select_trainable(model, self.cfg.lora.trainable() if self.cfg.lora.enabled
                                     else tc.trainable)
        self.n_params, self.n_flop_params = _count_params(model)
        if not meta_init:
            model.to(env.device)
        model = parallelize(model, env, dtype=tc.dtype, fsdp=tc.fsdp,
                            activation_checkpointing=tc.activation_checkpointing,
                            compile=tc.compile, reshard_after_forward=tc.reshard_after_forward,
                            frozen_units_in_root=self.cfg.lora.enabled)
        if meta_init:
            model.to_empty(device=env.device)
            if not hasattr(model, "init_weights"):
                raise ConfigError("train.init_from needs model.init_weights() for buffers")
            with torch.no_grad():
                model.init_weights()
            init_from_export(model, source, self.cfg, env, convert=convert)
        if env.is_main:
            log.info("model: %.2fM parameters, %.2fM trainable in %d tensors",
                     self.n_params / 1e6, sum(p.numel() for p in model.parameters()
                                              if p.requires_grad) / 1e6, len(trainable))
        return model, trainable

    def _restore(self, path: Path) -> None:
        env = self.env
        loaded = load_checkpoint(path, model=self.model, optimizer=self.optimizer, ema=self.ema,
                                 run_cfg=self.cfg, env=env)
        meta, states = loaded["meta"], loaded["rank_states"]
        self.step, self.tokens_seen = meta["step"], meta.get("tokens", 0)
        if meta.get("world_size") == env.world_size:
            self.loader.load_state_dict(states[0]["data"])
            set_rng_state(states[0]["rng"], env.device)
        else:
            # another world size: gather every stream's position; RNG streams cannot be
            # split or merged, so they restart from a seed tied to the step
            data = {"num_streams": states[0]["data"]["num_streams"], "rr": 0, "streams": {},
                    "skipped": {}}
            for s in states:
                data["streams"].update(s["data"]["streams"])
            self.loader.load_state_dict(data)
            _seed_all(self.cfg.train.seed * 1_000_003 + 17 * (env.rank + 1) + self.step)
            log.warning("resumed %s saved on %s ranks with %d: RNG streams reseeded",
                        path, meta.get("world_size"), env.world_size)
        if env.is_main:
            metrics = self.out_dir / "metrics.jsonl"
            if metrics.is_file():  # drop lines of steps the crashed run did after the checkpoint
                lines = [ln for ln in metrics.read_text().splitlines()
                         if ln.strip() and json.loads(ln)["step"] <= self.step]
                metrics.write_text("".join(ln + "\n" for ln in lines))
            log.info("resumed from %s at step %d", loaded["path"], self.step)

    def _peak_flops(self) -> float | None:
        if self.env.device.type != "cuda":
            return None
        name = torch.cuda.get_device_name(self.env.device)
        for key, tflops in self.cfg.train.peak_tflops.items():
            if key in name:
                return tflops * 1e12
        return None

    # ------------------------------------------------------------------ loop

    def run(self) -> TrainResult:
        tc, env = self.cfg.train, self.env
        last = tc.steps if tc.stop_after is None else min(tc.steps, tc.stop_after)
        self.model.train()
        for module in self.frozen:
            module.eval()
        writer = None
        if tc.tensorboard and env.is_main:
            from torch.utils.tensorboard import SummaryWriter

            writer = SummaryWriter(str(self.out_dir / "tb"))
        bar = tqdm(total=last, initial=self.step, disable=not (env.is_main and tc.progress),
                   dynamic_ncols=True, desc="train")
        history: list[dict[str, float]] = []
        window = _Window()
        saved: Path | None = None
        self._t_start = time.monotonic()
        try:
            while self.step < last:
                self._frac = self._time_frac()
                t0 = time.perf_counter()
                losses, grad_norm, tokens, lr = self._train_step()
                self.step += 1
                self.tokens_seen += tokens
                window.add(losses, grad_norm, tokens, time.perf_counter() - t0)
                bar.update(1)
                if self.step % tc.log_every == 0 or self.step == last:
                    row = self._log(window, lr)
                    window = _Window()
                    if env.is_main:
                        history.append(row)
                        self._write_row(row, writer, bar)
                if self._frac >= 1.0:  # train.max_seconds spent
                    last = bar.total = self.step  # the bar ends at 100% where the run ends
                if self.step % tc.ckpt_every == 0 or self.step == last:
                    saved = self._save()
        finally:
            bar.close()
            if writer is not None:
                writer.close()
            self.loader.close()
        skipped = {k: v for k, v in self._global_skipped().items() if v}
        if env.is_main and skipped:
            log.warning("skipped samples: %s", skipped)
        return TrainResult(step=self.step, out_dir=self.out_dir, trainable=self.trainable,
                           skipped=skipped, history=history, checkpoint=saved,
                           ema=self.cfg.train.ema_decay > 0)

    def _time_frac(self) -> float:
        """Spent fraction of ``train.max_seconds`` as rank 0 sees it (0 without a budget), so
        every rank uses the same learning rate and stops at the same step."""
        budget = self.cfg.train.max_seconds
        if budget is None:
            return 0.0
        frac = torch.tensor([min(1.0, (time.monotonic() - self._t_start) / budget)], dtype=torch.float64,
                            device=self.env.device)
        if self.env.world_size > 1:
            dist.broadcast(frac, src=0)
        return float(frac.item())

    def _train_step(self) -> tuple[dict[str, torch.Tensor], torch.Tensor, int, float]:
        """One optimiser step: ``accum`` micro-batches, clip, AdamW, EMA.

        Returns this rank's mean loss components ``{name: scalar}``, the global grad norm
        (before clipping), this rank's token count and the learning rate used.
        """
        tc, env = self.cfg.train, self.env
        lr = lr_at(self.step, tc, self._frac)
        set_lr(self.optimizer, lr)
        sums: dict[str, torch.Tensor] = {}
        tokens = 0
        for _ in range(self.accum):
            batch = self.collate(self.loader.next_batch(tc.micro_batch)).to(env.device)
            tokens += int(batch.num_tokens)
            with autocast(env, tc.dtype, tc.fsdp):
                out = self.model(batch) if self.distiller is None else self.distiller(self.model, batch)
            # each micro-batch weighs 1 / (accum * world): FSDP averages over ranks
            (out["loss"] / self.accum).backward()
            for name, value in out.items():
                if isinstance(value, torch.Tensor) and value.ndim == 0:
                    v = value.detach().float()
                    sums[name] = sums[name] + v if name in sums else v
        max_norm = tc.grad_clip if tc.grad_clip > 0 else math.inf
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, max_norm)
        if isinstance(grad_norm, DTensor):
            grad_norm = grad_norm.full_tensor()
        if torch.isfinite(grad_norm):
            self.optimizer.step()
            if self.ema is not None:
                self.ema.update(self.step + 1)
        else:
            log.warning("step %d: gradient norm %s, update skipped", self.step + 1, grad_norm.item())
        self.optimizer.zero_grad(set_to_none=True)
        return {k: v / self.accum for k, v in sums.items()}, grad_norm.detach(), tokens, lr

    # ------------------------------------------------------------------ logging and saving

    def _global_skipped(self) -> dict[str, int]:
        counts = torch.tensor([self.loader.skipped.get(r, 0) for r in SKIP_REASONS], dtype=torch.float64)
        if dist.is_initialized() and self.env.world_size > 1:
            counts = counts.to(self.env.device)
            dist.all_reduce(counts)
        return {r: int(c) for r, c in zip(SKIP_REASONS, counts.tolist())}

    def _log(self, window: _Window, lr: float) -> dict[str, float]:
        """Average the window over steps and ranks (every rank calls this)."""
        env = self.env
        names = sorted(window.sums)
        vec = torch.stack([window.sums[n] for n in names] + [window.grad_norm]).to(env.device)
        vec = vec.double()
        tokens = torch.tensor([float(window.tokens)], dtype=torch.float64, device=env.device)
        if dist.is_initialized() and env.world_size > 1:
            dist.all_reduce(vec)
            dist.all_reduce(tokens)
            vec[:-1] /= env.world_size
            vec[-1] /= env.world_size  # the same norm on every rank
        vec = (vec / window.steps).tolist()
        tokens_per_s = tokens.item() / max(window.seconds, 1e-9)
        row: dict[str, Any] = {"step": self.step, **dict(zip(names, vec[:-1])),
                               "grad_norm": vec[-1], "lr": lr, "tokens_per_s": tokens_per_s}
        if self.peak_flops:
            row["mfu"] = 6 * self.n_flop_params * tokens_per_s / (self.peak_flops * env.world_size)
        for reason, n in self._global_skipped().items():
            if n:
                row[f"skipped/{reason}"] = n
        return row

    def _write_row(self, row: dict[str, Any], writer: Any, bar: tqdm) -> None:
        with open(self.out_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        if writer is not None:
            for k, v in row.items():
                if k != "step":
                    writer.add_scalar(k if "/" in k else f"train/{k}", v, row["step"])
        mfu = f"{row['mfu']:.1%}" if "mfu" in row else "n/a"
        text = (f"step {row['step']} loss {row.get('loss', float('nan')):.4f} lr {row['lr']:.2e} "
                f"gnorm {row['grad_norm']:.3f} tok/s {row['tokens_per_s']:.0f} mfu {mfu}")
        if bar.disable:
            log.info(text)
        else:
            bar.set_postfix_str(text.split(" ", 2)[2])

    def _save(self) -> Path:
        env = self.env
        rank_state = {"data": self.loader.state_dict(), "rng": rng_state(env.device)}
        meta = {"world_size": env.world_size, "num_streams": self.loader.num_streams,
                "tokens": self.tokens_seen}
        path = save_checkpoint(self.out_dir, self.step, model=self.model, optimizer=self.optimizer,
                               ema=self.ema, rank_state=rank_state, run_cfg=self.cfg, env=env,
                               keep_last=self.cfg.train.keep_last, meta=meta)
        if env.is_main:
            log.info("saved %s", path)
        return path


class _Window:
    """Running sums between two log lines (this rank)."""

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.grad_norm = torch.zeros((), dtype=torch.float64)
        self.tokens = 0
        self.steps = 0
        self.seconds = 0.0

    def add(self, losses: dict[str, torch.Tensor], grad_norm: torch.Tensor, tokens: int,
            seconds: float) -> None:
        for k, v in losses.items():
            v = v.double()
            self.sums[k] = self.sums[k] + v if k in self.sums else v
        gn = grad_norm.double()
        self.grad_norm = self.grad_norm.to(gn.device) + gn
        self.tokens += tokens
        self.steps += 1
        self.seconds += seconds

