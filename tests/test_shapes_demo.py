"""The shapes world's model: its VAE pretraining, a short training run that lowers both
losses, `cheers demo --from-scratch` and the default demo (the shipped model fine-tuned on a new
word) end to end on tiny budgets, the packed model's round trip, the new word's data."""

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
    from cheers.shapes.dataset import train_text_tokenizer
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


@pytest.fixture(scope="module")
def scratch_demo(tmp_path_factory):
    """``cheers demo --from-scratch`` for 6 steps: (its folder, its CHEERS_HOME)."""
    root = tmp_path_factory.mktemp("scratch")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CHEERS_HOME", str(root / "home"))
        cli_main(["demo", "--from-scratch", "--out", str(root / "demo"), "--steps", "6", *TINY_DEMO,
                  "model.transport.cfg_scale=2.5"])
    return root / "demo", root / "home"


@pytest.mark.slow
def test_demo_from_scratch_end_to_end(scratch_demo, tmp_path, monkeypatch):
    out, home = scratch_demo
    ratios = {run: json.loads((out / run / "config.json").read_text())["data"]["ratios"] for run in ("run-easy", "run")}
    assert ratios["run"]["i2t"] > 0
    # a model override reaches the starting model as well as the training runs
    for folder in ("init", "checkpoint"):
        assert json.loads((out / folder / "config.json").read_text())["transport"]["cfg_scale"] == 2.5
    # the world is the shipped model's
    from cheers.shapes.release import RECIPE

    assert json.loads((out / "data" / "manifest.json").read_text())["object_size"] == RECIPE.object_size
    metrics = json.loads((out / "metrics.json").read_text())
    after = metrics["after"]
    assert metrics["before"] is None and metrics["steps"] == 6
    for key in ("geneval_overall", "geneval_single_object", "geneval_color_attr", "shape_right", "colour_right",
                "coherent", "mmbench_overall", "open_shape", "open_colour", "open_count"):
        assert 0.0 <= after[key] <= 1.0 or after[key] != after[key], key  # nan: no image of that kind
    assert len(json.loads((out / "after" / "open_answers.json").read_text())) == 4
    # the fixed step count, split by the curriculum (0.35 of 6 -> 2 + 4), each run ending in its checkpoint
    runs = [int(next((out / run).glob("step_*")).name[5:]) for run in ("run-easy", "run")]
    assert runs == [2, 4]
    for name in ("index.html", "grid.png", "loss.png", "checkpoint/config.json", "checkpoint/tokenizer.json",
                 "after/geneval/00000/metadata.jsonl", "after/geneval/00000/samples/0003.png",
                 "after/geneval/results.jsonl", "log.txt"):
        assert (out / name).is_file(), name
    # the shipped VAE and semantic encoder are the starting model's
    from cheers.shapes.parts import PARTS_FILE, load_parts

    parts = load_parts(PARTS_FILE, flavour("shapes").tokenizer)
    init = load_file(str(out / "init" / "model.safetensors"))
    for key, value in parts["siglip"].items():
        torch.testing.assert_close(init[f"tokenizer.siglip.{key}"], value)
    # the cached checkpoint makes `cheers generate` work with no --ckpt
    monkeypatch.setenv("CHEERS_HOME", str(home))
    cli_main(["generate", "--prompt", "a red circle", "--steps", "2", "--out", str(tmp_path / "gen")])
    assert (tmp_path / "gen" / "00000.png").is_file()


@pytest.mark.slow
def test_demo_same_seed_same_first_losses(tmp_path, monkeypatch):
    """The step-budgeted demo is deterministic: two runs with one seed log the same losses."""
    monkeypatch.setenv("CHEERS_HOME", str(tmp_path / "home"))
    losses = []
    for name in ("a", "b"):
        cli_main(["demo", "--from-scratch", "--out", str(tmp_path / name), "--steps", "4", "--curriculum", "0",
                  "--no-cache", "--seed", "3", *TINY_DEMO])
        rows = [json.loads(line) for line in (tmp_path / name / "run" / "metrics.jsonl").read_text().splitlines()]
        losses.append([(r["step"], r["loss"], r["flow"], r["ce"]) for r in rows])
    assert [s for s, *_ in losses[0]] == [1, 2, 3, 4]
    assert losses[0] == losses[1]


def test_packed_model_round_trip_and_refusals(scratch_demo, tmp_path):
    from cheers.errors import CheersError
    from cheers.pipeline import Pipeline
    from cheers.shapes.release import pack_model, read_model_log, unpack_model

    out, _home = scratch_demo
    size = pack_model(out / "checkpoint", tmp_path / "m.safetensors", {"recipe": {"object_size": "large"}})
    dense = load_file(str(out / "checkpoint" / "model.safetensors"))
    assert size < 0.6 * (out / "checkpoint" / "model.safetensors").stat().st_size  # fp16 on disk
    packed = load_file(str(tmp_path / "m.safetensors"))
    assert all(packed[k].dtype == torch.float16 for k, v in dense.items() if v.is_floating_point())
    assert read_model_log(tmp_path / "m.safetensors") == {"recipe": {"object_size": "large"}}
    folder = unpack_model(tmp_path / "m.safetensors", tmp_path / "unpacked")
    again = load_file(str(folder / "model.safetensors"))
    for k, v in dense.items():
        torch.testing.assert_close(again[k], v, rtol=1e-3, atol=1e-4)  # fp16 rounding
    assert (folder / "tokenizer.json").read_text() == (out / "checkpoint" / "tokenizer.json").read_text()
    Pipeline.from_pretrained(folder)  # loads as a checkpoint folder
    with pytest.raises(CheersError, match="not found"):
        read_model_log(tmp_path / "missing.safetensors")
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(CheersError, match="lacks"):
        unpack_model(tmp_path / "plain.safetensors")


@pytest.mark.slow
def test_default_demo_fine_tunes_the_packed_model(scratch_demo, tmp_path, monkeypatch):
    from cheers.shapes.release import pack_model

    out, _home = scratch_demo
    model = tmp_path / "model.safetensors"
    pack_model(out / "checkpoint", model, {"recipe": {"object_size": "large"}})
    monkeypatch.setenv("CHEERS_HOME", str(tmp_path / "home"))
    cli_main(["demo", "--model", str(model), "--out", str(tmp_path / "demo"), "--steps", "3",
              "--finetune-samples", "40", "--word-prompts", "1", "--eval-prompts", "1", "--eval-questions", "4",
              "--threads", "1", "train.global_batch=8", "train.micro_batch=8", "train.log_every=1"])
    demo = tmp_path / "demo"
    metrics = json.loads((demo / "metrics.json").read_text())
    assert metrics["steps"] == 3 and metrics["object_size"] == "large"
    for when in ("before", "after"):
        assert 0.0 <= metrics[when]["new word drawn in its colour"] <= 1.0
        assert (demo / when / "new-word" / "prompts-word" / "00000" / "samples" / "0003.png").is_file()
    run_cfg = json.loads((demo / "finetune" / "config.json").read_text())
    assert "shapes-model-" in run_cfg["train"]["init_from"]  # the unpacked shipped model
    assert run_cfg["train"]["steps"] == 3 and run_cfg["data"]["ratios"]["text"] == 0.0
    assert run_cfg["lora"]["enabled"]  # LoRA: the adapters, not the whole model, are trained and saved
    from cheers.lora import is_adapter_folder

    assert is_adapter_folder(demo / "adapter")
    for name in ("index.html", "new-word.png", "grid.png", "loss.png", "checkpoint/model.safetensors",
                 "checkpoint/tokenizer.json"):
        assert (demo / name).is_file(), name
    page = (demo / "index.html").read_text()
    assert "<th>before</th><th>after</th>" in page and "scarlet" in page
    assert (tmp_path / "home" / "shapes-demo" / "model.safetensors").is_file()


def test_new_word_data_names_the_colour_by_the_word(tmp_path):
    import tarfile

    import numpy as np
    from PIL import Image

    from cheers.errors import InputError
    from cheers.eval.shapes_detector import detect
    from cheers.shapes.finetune import new_word_metadata, new_word_sample, write_new_word_shards

    rng = np.random.default_rng(0)
    for _ in range(20):
        record, image = new_word_sample(rng, "scarlet", "red", "large")
        found = detect(Image.fromarray(image))
        assert "scarlet" in record["text"] and "red" not in record["text"].split()
        assert sum(d["colour"] == "red" for d in found) == 1  # exactly the object the word names
    folder = write_new_word_shards(tmp_path / "d", 30, seed=1, object_size="large", new_share=0.5)
    with tarfile.open(folder / "new-word-000000.tar") as tar:
        texts = [json.loads(tar.extractfile(m).read())["text"] for m in tar.getmembers() if m.name.endswith(".json")]
    assert len(texts) == 30 and 5 <= sum("scarlet" in t for t in texts) <= 25
    meta = new_word_metadata(6)
    assert meta[0]["prompt"] == "a photo of a scarlet circle" and meta[0]["include"][0]["color"] == "red"
    assert len({m["include"][0]["class"] for m in meta}) == 5
    with pytest.raises(InputError, match="not a colour the world knows"):
        write_new_word_shards(tmp_path / "e", 3, seed=1, object_size="large", word="blue")


def test_demo_refuses_shards_written_with_other_options(tmp_path):
    from cheers.errors import CheersError
    from cheers.shapes.training import prepare

    write_shards(str(tmp_path / "data"), n_samples=4, seed=0, image_size=64, i2t_turns=1)
    with pytest.raises(CheersError, match="i2t_turns 1 \\(not 3\\): use"):
        prepare(tmp_path, 4, 0, print, i2t_turns=3)
    manifest = tmp_path / "data" / "manifest.json"  # shards of older code, answered with the letter
    manifest.write_text(json.dumps({k: v for k, v in json.loads(manifest.read_text()).items() if k != "mcq_answer"}))
    with pytest.raises(CheersError, match="i2t_turns 1 \\(not 3\\), mcq_answer letter \\(not option\\)"):
        prepare(tmp_path, 4, 0, print, i2t_turns=3)
    with pytest.raises(CheersError, match="object_size standard \\(not large\\)"):
        prepare(tmp_path, 4, 0, print, i2t_turns=1, object_size="large")


def test_demo_refuses_a_missing_model_before_any_work(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        cli_main(["demo", "--model", str(tmp_path / "none.safetensors"), "--out", str(tmp_path / "d")])
    assert e.value.code == 2
    assert "none.safetensors: file not found" in capsys.readouterr().err
    assert not (tmp_path / "d").exists()


def test_the_shipped_model_loads_and_carries_its_log(tmp_path):
    """The package's trained shapes model: at most 16 MB, fp16, its recipe, command and held-out
    scores in its metadata, and it loads as a checkpoint folder that generates and answers."""
    from cheers.pipeline import Pipeline
    from cheers.shapes.release import MAX_BYTES, MODEL_FILE, read_model_log, unpack_model

    assert MODEL_FILE.stat().st_size <= MAX_BYTES
    log = read_model_log(MODEL_FILE)
    assert log["command"].startswith("python -m cheers.shapes.release")
    assert log["recipe"]["steps"] == int(log["command"].split("--steps ")[1])
    for key in ("geneval_overall", "shape_right", "mmbench_overall", "open_shape"):
        assert 0.0 <= log["scores"][key] <= 1.0
    weights = load_file(str(MODEL_FILE))
    assert {v.dtype for v in weights.values() if v.is_floating_point()} == {torch.float16}
    pipe = Pipeline.from_pretrained(unpack_model(MODEL_FILE, tmp_path / "model"))
    assert pipe.cfg.flavour == "shapes"
    (image,) = pipe.generate(["a photo of a red circle"], steps=2, seed=0)
    assert image.size == (pipe.image_size, pipe.image_size)
