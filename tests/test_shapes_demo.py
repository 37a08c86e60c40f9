"""The shapes world's model: its VAE pretraining, a short training run that lowers both
losses, and `cheers demo` end to end on a tiny budget (report files and metrics schema)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from cheers.cli import main as cli_main
from cheers.config import flavour
from cheers.shapes.autoencoder import train_vae
from cheers.shapes.dataset import write_shards
from cheers.text_tokenizer import train_bpe


def test_shapes_flavour_dimensions():
    cfg = flavour("shapes")
    assert cfg.tokenizer.image_size == 64 and cfg.latent_grid == 8 and cfg.tokens_per_image == 16
    assert cfg.transport.prediction == "x1" and not cfg.dummy_image_prefix


@pytest.mark.slow
def test_vae_pretraining_lowers_reconstruction_loss():
    cfg = flavour("shapes").tokenizer.vae
    vae, losses = train_vae(cfg, 64, steps=40, batch=4)
    assert len(losses) == 40
    assert sum(losses[-5:]) / 5 < 0.7 * sum(losses[:5]) / 5
    # the latent statistics were fitted: normalised latents are roughly standard
    with torch.no_grad():
        x1 = vae.encode(torch.rand(4, 3, 64, 64))
    assert x1.shape == (4, 16, 8, 8)


@pytest.fixture(scope="module")
def shapes_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    write_shards(str(root / "data"), n_samples=256, seed=0, image_size=64, samples_per_shard=128)
    corpus = ["a photo of a red circle above a blue square", "How many stars are there?",
              "What colour is the triangle? A. red B. blue", "two green crosses", "assistant user system"]
    train_bpe(corpus * 20, vocab_size=400).save(root / "tok")
    return root


def test_demo_tokenizer_keeps_the_chat_template_short(shapes_data):
    """The template enters the BPE corpus at its true frequency: whole words, not letters."""
    from cheers.demo import train_text_tokenizer
    from cheers.text_tokenizer import DEFAULT_SYSTEM

    tok = train_text_tokenizer([shapes_data / "data"], [], vocab_size=400)
    assert len(tok.encode(DEFAULT_SYSTEM)) <= 7
    assert all(len(tok.encode(role)) == 1 for role in ("system", "user", "assistant"))
    assert len(tok.t2i_prompt("a photo of a blue square")) <= 32


@pytest.mark.slow
def test_short_shapes_training_lowers_both_losses(shapes_data, tmp_path):
    """CE from the training log; the flow loss on one fixed batch (fixed t and noise), since
    at random t a 5-step log of about 5 images is too noisy to show 80 steps of learning."""
    import copy
    import dataclasses

    from cheers.collate import make_collate
    from train.config import load_run_config
    from train.data import SampleLoader
    from train.task import CheersTask
    from train.trainer import train

    class KeepModel(CheersTask):
        """Keeps the model the trainer trains, and a copy of it as initialised."""

        def build_model(self, model_cfg):
            model = super().build_model(model_cfg)
            init = model.init_weights

            def init_and_copy():
                init()
                self.initial = copy.deepcopy(model)
            model.init_weights = init_and_copy
            self.model = model
            return model

    cfg = load_run_config("configs/shapes.yaml", [
        f"data.shards=['{shapes_data}/data/*.tar']", f"data.text_tokenizer_dir={shapes_data / 'tok'}",
        f"train.out_dir={tmp_path / 'run'}", "train.steps=80", "train.global_batch=8", "train.micro_batch=8",
        "train.warmup_steps=5", "train.log_every=5", "train.progress=false",
        "data.ratios={t2i: 0.6, i2t: 0.4, text: 0.0}", "train.trainable=['*']",
        # the velocity loss at uniform times: at 80 steps of 8 samples it falls at every t, the x1 loss
        # of a model whose VAE is untrained (a latent of tiny variance) hardly moves
        "model.transport.loss_target=velocity", "model.transport.x1_loss_t_min=0.25",
        "model.transport.time_sampling=uniform"])
    task = KeepModel()
    result = train(cfg, task)
    assert result.step == 80

    t2i_only = dataclasses.replace(cfg.data, ratios={"t2i": 1.0})
    loader = SampleLoader(t2i_only, image_size=cfg.model.tokenizer.image_size, seed=123)
    batch = make_collate(cfg.model, cfg.data.text_tokenizer_dir)(loader.next_batch(16))
    n, g = batch.num_images, cfg.model.latent_grid
    gen = torch.Generator().manual_seed(0)
    batch = dataclasses.replace(batch, t=torch.linspace(0.1, 0.9, n),
                                noise=torch.randn(n, cfg.model.tokenizer.vae.latent_channels, g, g, generator=gen))

    def fixed_batch_flow(model):
        model.eval()
        with torch.no_grad():
            return float(model(batch)["flow"])

    first = sum(h["ce"] for h in result.history[:2]) / 2
    last = sum(h["ce"] for h in result.history[-3:]) / 3
    flow_before, flow_after = fixed_batch_flow(task.initial), fixed_batch_flow(task.model)
    print(f"ce {first:.3f} -> {last:.3f}; fixed-batch flow {flow_before:.3f} -> {flow_after:.3f}")
    assert last < 0.7 * first
    assert flow_after < 0.85 * flow_before


@pytest.mark.slow
def test_time_budget_ends_a_run_with_a_checkpoint(shapes_data, tmp_path):
    from cheers.train.config import load_run_config
    from cheers.train.trainer import train

    cfg = load_run_config("configs/shapes.yaml", [
        f"data.shards=['{shapes_data}/data/*.tar']", f"data.text_tokenizer_dir={shapes_data / 'tok'}",
        f"train.out_dir={tmp_path / 'run'}", "train.steps=100000", "train.global_batch=4",
        "train.micro_batch=4", "train.max_seconds=3", "train.progress=false"])
    result = train(cfg)
    assert 0 < result.step < 100000
    assert result.checkpoint is not None and result.checkpoint.is_dir()


TINY_DEMO = ["--samples", "300", "--eval-prompts", "1", "--eval-questions", "4", "--threads", "1",
             "train.global_batch=8", "train.micro_batch=8", "train.log_every=1"]


@pytest.mark.slow
def test_demo_end_to_end_on_a_tiny_budget(tmp_path, monkeypatch):
    monkeypatch.setenv("CHEERS_HOME", str(tmp_path / "home"))
    cli_main(["demo", "--out", str(tmp_path / "demo"), "--steps", "6", *TINY_DEMO, "model.transport.cfg_scale=2.5"])
    out = tmp_path / "demo"
    ratios = {run: json.loads((out / run / "config.json").read_text())["data"]["ratios"] for run in ("run-easy", "run")}
    assert ratios["run"]["i2t"] > 0
    # a model override reaches the starting model as well as the training runs
    for folder in ("init", "checkpoint"):
        assert json.loads((out / folder / "config.json").read_text())["transport"]["cfg_scale"] == 2.5
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["geneval"]) == {"overall", "single_object", "two_object", "counting", "colors",
                                       "position", "color_attr"}
    assert 0.0 <= metrics["mmbench"]["overall"] <= 1.0
    assert set(metrics["open_questions"]) == {"colour", "shape", "count", "overall"}  # 4 questions
    assert len(json.loads((out / "open_answers.json").read_text())) == 4
    # the fixed step count, split by the curriculum (0.35 of 6 -> 2 + 4), each run ending in its checkpoint
    runs = [int(next((out / run).glob("step_*")).name[5:]) for run in ("run-easy", "run")]
    assert runs == [2, 4] and metrics["train"]["steps"] == 6
    for name in ("index.html", "grid.png", "loss.png", "checkpoint/config.json", "checkpoint/tokenizer.json",
                 "geneval/00000/metadata.jsonl", "geneval/00000/samples/0003.png", "geneval/results.jsonl"):
        assert (out / name).is_file(), name
    assert "floor" not in (out / "index.html").read_text()
    # the shipped VAE and semantic encoder are the starting model's
    from cheers.shapes.parts import PARTS_FILE, load_parts

    parts = load_parts(PARTS_FILE, flavour("shapes").tokenizer)
    init = load_file(str(out / "init" / "model.safetensors"))
    for key, value in parts["siglip"].items():
        torch.testing.assert_close(init[f"tokenizer.siglip.{key}"], value)
    # the cached checkpoint makes `cheers generate` work with no --ckpt
    cli_main(["generate", "--prompt", "a red circle", "--steps", "2", "--out", str(tmp_path / "gen")])
    assert (tmp_path / "gen" / "00000.png").is_file()


@pytest.mark.slow
def test_demo_same_seed_same_first_losses(tmp_path, monkeypatch):
    """The step-budgeted demo is deterministic: two runs with one seed log the same losses."""
    monkeypatch.setenv("CHEERS_HOME", str(tmp_path / "home"))
    losses = []
    for name in ("a", "b"):
        cli_main(["demo", "--out", str(tmp_path / name), "--steps", "4", "--curriculum", "0", "--no-cache",
                  "--seed", "3", *TINY_DEMO])
        rows = [json.loads(line) for line in (tmp_path / name / "run" / "metrics.jsonl").read_text().splitlines()]
        losses.append([(r["step"], r["loss"], r["flow"], r["ce"]) for r in rows])
    assert [s for s, *_ in losses[0]] == [1, 2, 3, 4]
    assert losses[0] == losses[1]


@pytest.mark.slow
def test_demo_minutes_budget_covers_the_whole_demo(tmp_path, monkeypatch):
    """--minutes bounds the demo as a whole: a short budget shrinks data and evaluation too."""
    import time

    monkeypatch.setenv("CHEERS_HOME", str(tmp_path / "home"))
    t0 = time.monotonic()
    cli_main(["demo", "--out", str(tmp_path / "demo"), "--minutes", "0.75", "--no-cache", "--samples", "2000",
              "--threads", "1", "train.global_batch=8", "train.micro_batch=8"])
    wall = time.monotonic() - t0
    metrics = json.loads((tmp_path / "demo" / "metrics.json").read_text())
    assert metrics["train"]["steps"] >= 1
    assert wall < 0.75 * 60 * 1.5, f"a 45 s budget took {wall:.0f} s"


def test_demo_refuses_shards_written_with_other_options(tmp_path):
    from cheers.demo import prepare
    from cheers.errors import CheersError

    write_shards(str(tmp_path / "data"), n_samples=4, seed=0, image_size=64, i2t_turns=1)
    with pytest.raises(CheersError, match="written with --i2t-turns 1, not 3"):
        prepare(tmp_path, 4, 0, print, i2t_turns=3)
    # write_shards answers with the letter by default; the demo asked for option text
    with pytest.raises(CheersError, match="multiple-choice answers are the letter, not the option"):
        prepare(tmp_path, 4, 0, print, i2t_turns=1, mcq_answer="option")


def test_report_shows_metrics_without_floors(tmp_path):
    from cheers.demo import write_html

    metrics = {"summary": "s", "mmbench": {"overall": 0.31},
               "geneval": {"overall": 0.25, "single_object": 0.1, "two_object": 0.15, "counting": 0.0},
               "mmbench_detail": {"Overall": 0.31, "colour": 0.5}, "open_questions": {"overall": 0.4}}
    write_html(tmp_path, metrics)
    page = (tmp_path / "index.html").read_text()
    assert "<td>overall</td><td>0.250</td></tr>" in page
    assert "<td>Overall</td><td>0.310</td></tr>" in page
    assert "floor" not in page and '<img src="grid.png"' in page
