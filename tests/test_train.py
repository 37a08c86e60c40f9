"""The trainer on CPU with a toy model that has the Cheers model's interface and module names.

Runs launched in fresh processes (``python -m cheers.train``, ``torchrun``) find the toy
task as ``test_train:ToyTask`` through PYTHONPATH.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from einops import rearrange
from torch import nn

from cheers.config import ModelConfig, flavour
from cheers.errors import CheckpointError, ConfigError
from cheers.train.checkpoint import export, list_checkpoints, load_exported
from cheers.train.config import RunConfig, load_run_config
from cheers.train.data import DataError, RawSample
from cheers.train.optim import build_optimizer, lr_at, select_trainable
from cheers.train.trainer import train

sys.path.insert(0, str(Path(__file__).parent))
from test_train_data import write_shards  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
LATENT_CH = 8

# --------------------------------------------------------------------------- toy task


class _Block(nn.Module):
    """Pre-norm residual MLP on ``[B, N, D]``."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, 2 * dim)
        self.fc2 = nn.Linear(2 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(F.gelu(self.fc1(self.norm(x))))


class ToyModel(nn.Module):
    """A model with the Cheers interface: ``model(batch) -> {"loss", "ce", "flow"}``.

    Children mirror the real names (``tokenizer.{vae,pixel_decoder,siglip,compressor}``,
    ``llm.{embed_tokens,layers,norm,lm_head}``, ``head.{time_embed,stage_a,gate,stage_b}``)
    so that the recipes' trainable patterns can be checked against it. The "VAE" ends in a
    non-affine BatchNorm whose running statistics must not move while it is frozen.
    """

    def __init__(self, cfg: ModelConfig, stochastic: bool = True, delay: float = 0.0):
        super().__init__()
        dim, vocab, patch = cfg.llm.hidden_size, cfg.llm.vocab_size, cfg.tokenizer.siglip.patch_size
        self.stochastic, self.delay = stochastic, delay
        self.tokenizer = nn.Module()
        self.tokenizer.vae = nn.Sequential(nn.Conv2d(3, LATENT_CH, patch, stride=patch),
                                           nn.BatchNorm2d(LATENT_CH, affine=False))
        self.tokenizer.pixel_decoder = nn.Linear(LATENT_CH, LATENT_CH)
        self.tokenizer.siglip = nn.Linear(LATENT_CH, dim)
        self.tokenizer.compressor = nn.Linear(dim, dim)
        self.llm = nn.Module()
        self.llm.embed_tokens = nn.Embedding(vocab, dim)
        self.llm.layers = nn.ModuleList(_Block(dim) for _ in range(cfg.llm.num_hidden_layers))
        self.llm.norm = nn.LayerNorm(dim)
        self.llm.lm_head = nn.Linear(dim, vocab, bias=False)
        self.head = nn.Module()
        self.head.time_embed = nn.Linear(1, dim)
        self.head.stage_a = nn.ModuleList(_Block(dim) for _ in range(cfg.head.stage_a_blocks))
        self.head.gate = nn.Linear(dim, 1)
        self.head.stage_b = nn.Linear(dim, LATENT_CH)

    def fsdp_units(self) -> list[nn.Module]:
        return [*self.llm.layers, *self.head.stage_a]

    def init_weights(self) -> None:
        for m in self.modules():
            if m is not self and hasattr(m, "reset_parameters"):
                m.reset_parameters()

    def forward(self, batch: ToyBatch) -> dict[str, torch.Tensor]:
        if self.delay:
            time.sleep(self.delay)
        b = batch.tokens.shape[0]
        x1 = rearrange(self.tokenizer.vae(batch.images), "b c h w -> b (h w) c")  # [B, N, C]
        if self.stochastic:
            t = torch.rand(b, 1, 1, device=x1.device).to(x1.dtype)
            x0 = torch.randn_like(x1)
        else:
            t, x0 = torch.full((b, 1, 1), 0.5, device=x1.device, dtype=x1.dtype), torch.zeros_like(x1)
        xt = t * x1 + (1 - t) * x0
        img = self.tokenizer.compressor(self.tokenizer.siglip(self.tokenizer.pixel_decoder(xt)))
        n = img.shape[1]
        hidden = torch.cat([img, self.llm.embed_tokens(batch.tokens)], dim=1)  # [B, N + T, D]
        for layer in self.llm.layers:
            hidden = layer(hidden)
        hidden = self.llm.norm(hidden)
        logits = self.llm.lm_head(hidden[:, n:-1])  # [B, T - 1, V]
        ce = F.cross_entropy(rearrange(logits, "b t v -> b v t"), batch.tokens[:, 1:],
                             reduction="none").mean(1)  # [B]: every sample weighs the same
        a = hidden[:, :n] + self.head.time_embed(t)
        for block in self.head.stage_a:
            a = block(a)
        a = a * torch.sigmoid(self.head.gate(a))
        v_pred = self.head.stage_b(a)  # [B, N, C]
        flow = ((v_pred - (x1 - x0)) ** 2).mean((1, 2)) * batch.has_image  # [B]
        ce, flow = ce.mean(), flow.mean()
        return {"loss": ce + flow, "ce": ce, "flow": flow}


@dataclass
class ToyBatch:
    tokens: torch.Tensor  # [B, T] int64
    images: torch.Tensor  # [B, 3, H, W]
    has_image: torch.Tensor  # [B] float

    def to(self, device: torch.device) -> ToyBatch:
        return ToyBatch(self.tokens.to(device), self.images.to(device), self.has_image.to(device))

    @property
    def num_tokens(self) -> int:
        return self.tokens.numel()


def toy_collate(samples: list[RawSample], vocab: int, size: int, length: int = 12) -> ToyBatch:
    """Characters -> ids (mod vocab), padded with 0 to ``length``; zeros for missing images."""
    rows = []
    for s in samples:
        text = s.text + " ".join(str(c.get("value", "")) for c in s.conversations)
        ids = [1 + ord(ch) % (vocab - 1) for ch in text][:length]
        rows.append(ids + [0] * (length - len(ids)))
    images = torch.stack([s.image if s.image is not None else torch.zeros(3, size, size)
                          for s in samples])
    has = torch.tensor([float(s.image is not None) for s in samples])
    return ToyBatch(torch.tensor(rows), images, has)


class ToyTask:
    stochastic, delay = True, 0.0

    def build_model(self, cfg: ModelConfig) -> nn.Module:
        return ToyModel(cfg, stochastic=self.stochastic, delay=self.delay)

    def build_collate(self, cfg: RunConfig):
        return lambda samples: toy_collate(samples, cfg.model.llm.vocab_size,
                                           cfg.model.tokenizer.image_size)


class DeterministicToyTask(ToyTask):
    """No random noise: the loss of a sample does not depend on which rank draws it."""

    stochastic = False


class SlowToyTask(ToyTask):
    """Slow enough (50 ms a micro-batch) to be killed in the middle of a run."""

    delay = 0.05


# --------------------------------------------------------------------------- helpers


def run_cfg(tmp_path: Path, shards: str, *overrides: str) -> RunConfig:
    base = ["model.flavour=debug", "train.task=test_train:ToyTask", f"data.shards=['{shards}']",
            "data.ratios={t2i: 2, i2t: 1, text: 1}", "data.num_workers=0", "data.shuffle_buffer=6",
            "train.steps=6", "train.global_batch=4", "train.micro_batch=2", "train.lr=1e-2",
            "train.log_every=1", "train.tensorboard=false", "train.progress=false",
            f"train.out_dir={tmp_path / 'run'}", "train.ckpt_every=3", "train.warmup_steps=2",
            "train.schedule=cosine", "train.weight_decay=0.1"]
    return load_run_config(None, base + list(overrides))


def cli(args: list[str], *, torchrun: int = 0, wait: bool = True, timeout: float = 120):
    env = {**os.environ, "PYTHONPATH": f"{TESTS}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "OMP_NUM_THREADS": "1"}
    exe = Path(sys.executable)
    if torchrun:
        cmd = [str(exe.with_name("torchrun")), "--standalone", f"--nproc_per_node={torchrun}",
               "-m", "cheers.train", *args]
    else:
        cmd = [str(exe), "-m", "cheers.train", *args]
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    if not wait:
        return proc
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-4000:]
    return out


def cli_overrides(tmp_path: Path, shards: str, out: Path, *extra: str) -> list[str]:
    return ["model.flavour=debug", f"data.shards=['{shards}']", "data.ratios={t2i: 2, i2t: 1, text: 1}",
            "data.num_workers=1", "data.shuffle_buffer=6", "train.global_batch=4",
            "train.micro_batch=2", "train.lr=1e-2", "train.log_every=1", "train.tensorboard=false",
            "train.progress=false", f"train.out_dir={out}", "train.warmup_steps=2",
            "train.schedule=cosine", "train.ema_decay=0.9", *extra]


def metrics(out: Path) -> dict[int, dict]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line]
    return {r["step"]: r for r in rows}


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> str:
    return write_shards(tmp_path_factory.mktemp("shards"), n_shards=4, per_shard=8)


# --------------------------------------------------------------------------- tests


@pytest.mark.slow
def test_fsdp_two_processes_match_one(tmp_path, shards):
    # same global batch of 4: 2 ranks x 1 sample x 2 micro-batches vs 1 rank x 2 x 2; the
    # frozen VAE keeps its BatchNorm in eval mode, so samples do not see each other
    common = ["train.task=test_train:DeterministicToyTask", "train.steps=7", "train.stop_after=5",
              "data.num_streams=2", "train.grad_clip=0.5", 'train.trainable=["*", "!tokenizer.vae"]']
    cli(cli_overrides(tmp_path, shards, tmp_path / "two", *common, "train.micro_batch=1"), torchrun=2)
    two = metrics(tmp_path / "two")
    one_cfg = cli_overrides(tmp_path, shards, tmp_path / "one", *common)
    one = {r["step"]: r for r in train(load_run_config(None, one_cfg)).history}
    assert sorted(two) == sorted(one) == [1, 2, 3, 4, 5]
    for step in one:
        for key in ("loss", "ce", "flow", "grad_norm", "lr"):
            assert two[step][key] == pytest.approx(one[step][key], rel=1e-5, abs=1e-6), (step, key)
    assert one[5]["loss"] < one[1]["loss"]
    ckpt = list_checkpoints(tmp_path / "two")[-1]
    assert json.loads((ckpt / "trainer.json").read_text())["world_size"] == 2
    assert sorted(p.name for p in ckpt.glob("rank*.pt")) == ["rank00000.pt", "rank00001.pt"]
    # both runs wrote a sharded checkpoint that exports to the same weights
    a = load_exported(export(tmp_path / "two", tmp_path / "exp2"))[1]
    b = load_exported(export(tmp_path / "one", tmp_path / "exp1"))[1]
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)
    # the 2-rank checkpoint resumes on 1 rank (resharded, both data streams) like the 1-rank one
    more = ["train.stop_after=7"]
    cont_two = train(load_run_config(None, cli_overrides(tmp_path, shards, tmp_path / "two",
                                                         *common, *more))).history
    cont_one = train(load_run_config(None, one_cfg + more)).history
    assert [r["step"] for r in cont_two] == [r["step"] for r in cont_one] == [6, 7]
    for r2, r1 in zip(cont_two, cont_one):
        assert r2["loss"] == pytest.approx(r1["loss"], rel=1e-5, abs=1e-6)


@pytest.mark.slow
def test_killed_run_resumes_bit_for_bit(tmp_path, shards):
    killed, ref = tmp_path / "killed", tmp_path / "ref"
    common = ["train.steps=40", "train.ckpt_every=2", "train.keep_last=2"]
    proc = cli(cli_overrides(tmp_path, shards, killed, "train.task=test_train:SlowToyTask", *common),
               wait=False)
    deadline = time.time() + 90
    while not (killed / "step_0000004").is_dir():
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        assert time.time() < deadline, "no checkpoint after 90 s"
        time.sleep(0.01)
    time.sleep(0.07)  # land somewhere in the next steps, maybe inside a checkpoint write
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL  # killed, not finished
    done = list_checkpoints(killed)
    assert len(done) <= 2  # keep_last
    last = int(done[-1].name.split("_")[1])
    # a checkpoint whose writer died is never picked up
    (killed / f"step_{last + 1:07d}.tmp").mkdir(exist_ok=True)
    (killed / f"step_{last + 1:07d}.tmp" / "garbage.distcp").write_bytes(b"half written")
    stop = last + 3
    cli(cli_overrides(tmp_path, shards, killed, "train.task=test_train:ToyTask", *common,
                      f"train.stop_after={stop}"))
    cli(cli_overrides(tmp_path, shards, ref, "train.task=test_train:ToyTask", *common,
                      f"train.stop_after={stop}"))
    resumed, reference = metrics(killed), metrics(ref)
    assert sorted(resumed) == sorted(reference) == list(range(1, stop + 1))
    for step in range(1, stop + 1):
        for key in ("loss", "ce", "flow", "grad_norm", "lr"):
            assert resumed[step][key] == reference[step][key], (step, key)
    # the EMA, the optimizer and the weights end identical too
    a = load_exported(export(killed, tmp_path / "a", ema=True))[1]
    b = load_exported(export(ref, tmp_path / "b", ema=True))[1]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_corrupt_samples_are_counted_and_the_run_finishes(tmp_path):
    shards = write_shards(tmp_path / "bad", n_shards=2, per_shard=8, corrupt=True)
    cfg = run_cfg(tmp_path, shards, "train.steps=8", "data.num_streams=1",
                  "train.tensorboard=true")
    result = train(cfg)
    assert result.step == 8
    assert result.skipped["bad_image"] >= 1 and result.skipped["bad_json"] >= 1
    last = result.history[-1]
    assert last["skipped/bad_image"] == result.skipped["bad_image"]
    assert last["skipped/bad_json"] == result.skipped["bad_json"]
    assert list((tmp_path / "run" / "tb").glob("events.out.tfevents.*"))


def test_frozen_modules_stay_bit_identical(tmp_path, shards):
    patterns = ["tokenizer.compressor", "head", "llm.embed_tokens", "llm.lm_head"]
    cfg = run_cfg(tmp_path, shards, f"train.trainable={json.dumps(patterns)}", "train.ema_decay=0.5")
    torch.manual_seed(cfg.train.seed)
    initial = ToyModel(cfg.model)
    initial.init_weights()
    before = {k: v.clone() for k, v in initial.state_dict().items()}
    result = train(cfg)
    expected = sorted(n for n, _ in initial.named_parameters()
                      if any(n.startswith(p + ".") for p in patterns))
    assert result.trainable == expected
    assert "tokenizer.vae.0.weight" not in expected and "llm.layers.0.fc1.weight" not in expected
    after = load_exported(export(tmp_path / "run", tmp_path / "export"))[1]
    assert after.keys() == before.keys()
    for name, value in before.items():
        if name in expected:
            assert not torch.equal(after[name], value), f"{name} did not train"
        else:  # frozen parameters and the frozen BatchNorm's running statistics
            assert torch.equal(after[name], value), f"{name} changed"
    # the exported folder starts the next stage: the weights arrive unchanged
    cfg2 = run_cfg(tmp_path, shards, f"train.out_dir={tmp_path / 'next'}", "train.steps=1",
                   f"train.trainable={json.dumps(patterns)}",
                   f"train.init_from={tmp_path / 'export'}", "train.lr=1e-12", "train.grad_clip=0")
    train(cfg2)
    again = load_exported(export(tmp_path / "next", tmp_path / "export2"))[1]
    for name in before:
        torch.testing.assert_close(again[name], after[name], rtol=0, atol=1e-9)


def test_bad_input_gives_clear_errors(tmp_path, shards):
    with pytest.raises(DataError, match=r"shard not found: .*missing-000\.tar \(from data.shards entry .*missing-\{000\.\.007\}\.tar"):
        train(run_cfg(tmp_path, str(tmp_path / "missing-{000..007}.tar")))
    only_text = write_shards(tmp_path / "text", n_shards=2, per_shard=4, tasks=("text",))
    with pytest.raises(DataError, match="no usable t2i sample"):
        train(run_cfg(tmp_path, only_text, "data.num_streams=1"))
    with pytest.raises(ConfigError, match=r"train.global_batch=6 is not divisible by world size 1 "
                                          r"x train.micro_batch=4"):
        train(run_cfg(tmp_path, shards, "train.global_batch=6", "train.micro_batch=4"))
    with pytest.raises(ConfigError, match=r"train.global_batch=5 is not divisible by data.num_streams=2"):
        train(run_cfg(tmp_path, shards, "train.global_batch=5", "train.micro_batch=1",
                      "data.num_streams=2"))
    with pytest.raises(ConfigError, match="train.trainable pattern 'head.gates' matches no parameter"):
        train(run_cfg(tmp_path, shards, "train.trainable=[head.gates]"))
    with pytest.raises(ConfigError, match="unknown config key train.learning_rate"):
        run_cfg(tmp_path, shards, "train.learning_rate=1")
    # a resume folder written for other model shapes
    train(run_cfg(tmp_path, shards, "train.steps=1", "train.ckpt_every=1"))
    with pytest.raises(CheckpointError, match=r"another model config .*tokenizer.siglip.weight: "
                                              r"checkpoint \(32, 8\), model \(48, 8\).*"
                                              r"model.llm.hidden_size: checkpoint 32, config 48"):
        train(run_cfg(tmp_path, shards, f"train.out_dir={tmp_path / 'other'}",
                      f"train.resume={tmp_path / 'run'}", "model.llm.hidden_size=48"))
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        train(run_cfg(tmp_path, shards, f"train.resume={tmp_path / 'nowhere'}"))
    with pytest.raises(ConfigError, match="already holds checkpoints"):
        train(run_cfg(tmp_path, shards, "train.resume=never"))


def test_schedules_and_param_groups():
    cfg = load_run_config(None, ["model.flavour=debug", "train.steps=100", "train.lr=1.0",
                                 "train.warmup_frac=0.1", "train.schedule=wsd", "train.decay_frac=0.2",
                                 "train.min_lr_ratio=0.1", "train.weight_decay=0.1"])
    t = cfg.train
    assert [lr_at(s, t) for s in (0, 4, 9)] == pytest.approx([0.1, 0.5, 1.0])
    assert lr_at(50, t) == 1.0 and lr_at(79, t) == 1.0
    assert lr_at(89, t) == pytest.approx(0.55) and lr_at(99, t) == pytest.approx(0.1)
    t.schedule = "cosine"
    assert lr_at(10, t) == pytest.approx(1.0) and lr_at(99, t) == pytest.approx(0.1)
    assert lr_at(54, t) == pytest.approx(0.1 + 0.9 * 0.5, abs=0.02)
    # a time budget moves the decay on, never the warm-up: that counts optimiser steps
    assert lr_at(0, t, time_frac=0.5) == pytest.approx(0.1) and lr_at(9, t, time_frac=0.5) == pytest.approx(1.0)
    assert lr_at(10, t, time_frac=0.99) == pytest.approx(lr_at(99, t)) == pytest.approx(0.1)
    assert lr_at(60, t, time_frac=0.2) == pytest.approx(lr_at(60, t))
    t.schedule = "constant"
    assert lr_at(99, t) == 1.0
    model = ToyModel(cfg.model)
    select_trainable(model, ["*", "!tokenizer.vae"])
    opt = build_optimizer(model, t)
    decay = {id(p) for p in opt.param_groups[0]["params"]}
    no_decay = {id(p) for p in opt.param_groups[1]["params"]}
    assert opt.param_groups[0]["weight_decay"] == 0.1 and opt.param_groups[1]["weight_decay"] == 0
    assert id(model.llm.layers[0].fc1.weight) in decay
    for p in (model.llm.embed_tokens.weight, model.llm.norm.weight, model.llm.layers[0].fc1.bias):
        assert id(p) in no_decay
    assert id(model.tokenizer.vae[0].weight) not in decay | no_decay


@pytest.mark.parametrize("stage", ["align", "pretrain", "sft"])
def test_recipes_load_and_name_real_modules(stage):
    cfg = load_run_config(ROOT / "configs" / f"cheers-1.5b-{stage}.yaml")
    assert cfg.model.flavour == "cheers-1.5b" and cfg.train.task == "cheers.train.task:CheersTask"
    toy = ToyModel(flavour("debug"))  # same module names as the real model
    trainable = select_trainable(toy, cfg.train.trainable)
    assert not any(n.startswith("tokenizer.vae.") for n in trainable)
    if stage == "align":
        assert not any(n.startswith(("llm.layers", "tokenizer.siglip")) for n in trainable)
    else:
        assert cfg.data.ratios == {"i2t": 3, "t2i": 6, "text": 1}  # und : gen : text
        assert cfg.train.init_from is not None
    if stage == "sft":
        assert set(trainable) == {n for n, _ in toy.named_parameters()} - {
            n for n, _ in toy.named_parameters() if n.startswith("tokenizer.vae.")}
    raw = yaml.safe_load((ROOT / "configs" / "debug.yaml").read_text())
    assert raw["model"]["flavour"] == "debug"
    load_run_config(ROOT / "configs" / "debug.yaml")


def test_ema_warms_up_so_a_short_run_forgets_the_initial_weights():
    from cheers.train.ema import EMA

    model = nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(1.0)
    ema = EMA(model, decay=0.995)
    assert ema.decay_at(1) == pytest.approx(2 / 11) and ema.decay_at(10**6) == 0.995
    with torch.no_grad():
        model.weight.fill_(0.0)  # the weights move once, then stay
    for step in range(1, 21):
        ema.update(step)
    # the initial weights keep prod_n (1 + n) / (10 + n) = 2 * ... * 21 / (11 * ... * 30), not 0.995^20 = 0.90
    left = ema.shadow["weight"].item()
    expected = 1.0
    for n in range(1, 21):
        expected *= (1 + n) / (10 + n)
    assert left == pytest.approx(expected, rel=1e-4) and left < 1e-3
