"""The official tiny checkpoint loads through the adapter and reproduces the official outputs.

Tolerance (fixture README s.8): |ours - official| <= 1e-4 * max(1, max |official|) per tensor.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cheers.adapters.official import official_to_ours, ours_to_official
from cheers.checkpoint import load_pretrained
from cheers.config import SpecialTokens
from cheers.engine import Engine
from cheers.safetensors_io import read_state_dict
from cheers.sequence import expand_placeholders, null_prompt, pack

OFFICIAL = Path(__file__).parent / "fixtures" / "official_cheers_tiny"

# the fixture's special ids are the real Qwen2 ids minus 151370 (README s.2)
D = 151370
TOKENS = SpecialTokens(pad=151643 - D, chat_start=151644 - D, eos=151645 - D, image=151665 - D,
                       image_gen=151666 - D, im_start=151667 - D, im_end=151668 - D, no_mean=151669 - D)


def assert_official(name: str, ours: torch.Tensor, official: torch.Tensor) -> float:
    diff = (ours.float() - official.float()).abs().max().item()
    bound = 1e-4 * max(1.0, official.abs().max().item())
    print(f"{name}: max |diff| = {diff:.2e} (bound {bound:.2e})")
    assert diff <= bound, f"{name}: max abs diff {diff} > {bound}"
    return diff


@pytest.fixture(scope="module")
def official():
    torch.set_num_threads(1)
    model = load_pretrained(OFFICIAL, tokens=TOKENS)
    return model, load_file(OFFICIAL / "inputs.safetensors"), load_file(OFFICIAL / "outputs.safetensors")


def test_understanding_forward(official):
    model, inp, out = official
    seq = expand_placeholders(inp["und.input_ids"][0].tolist(), None, model.cfg, [inp["und.pixel_values"][0]], [False])
    batch = pack([seq], model.cfg)
    # image slots where the official model puts them (positions 15..18)
    assert torch.equal(batch.image_index[0] >= 0, out["und.image_mask"][0].bool())
    with torch.no_grad():
        res = model(batch, return_outputs=True)
        logits = model.llm.logits(res["hidden"])
        x1 = model.tokenizer.encode(inp["und.pixel_values"])
        tokens, patch = model.image_tokens(x1)
    assert_official("und.x1_latent", x1, out["und.x1_latent"])
    assert_official("und.siglip_patch_embeds", patch, out["und.siglip_patch_embeds"])
    assert_official("und.und_projected", tokens, out["und.und_projected"])
    assert_official("und.llm_last_hidden", res["hidden"], out["und.llm_last_hidden"])
    assert_official("und.logits", logits, out["und.logits"])


def test_generation_training_forward(official):
    model, inp, out = official
    seq = expand_placeholders(inp["gen.input_ids"][0].tolist(), inp["gen.labels"][0].tolist(), model.cfg,
                              [inp["gen.pixel_values"][0]], [True])
    batch = pack([seq], model.cfg)
    batch.t, batch.noise = inp["gen.t"].reshape(1), inp["gen.noise"]
    # the official label rewriting, reproduced by our shifted targets
    assert torch.equal(batch.targets[0, :-1], out["gen.effective_text_labels"][0])
    with torch.no_grad():
        res = model(batch, return_outputs=True)
    assert_official("gen.llm_last_hidden", res["hidden"], out["gen.llm_last_hidden"])
    assert_official("gen.velocity_bchw", res["v_pred"], out["gen.velocity_bchw"])
    assert_official("gen.text_loss", res["ce"], out["gen.text_loss"])
    assert_official("gen.image_loss", res["flow"], out["gen.image_loss"])
    assert_official("gen.loss", res["loss"], out["gen.loss"])


def test_greedy_decoding(official):
    model, inp, out = official
    eng = Engine(model)
    steps = list(eng.decode_text([inp["und.input_ids"][0].tolist()], [[inp["und.pixel_values"][0]]],
                                 max_new_tokens=3, stop_ids={model.cfg.tokens.eos}))
    assert [int(s[0]) for s in steps] == out["und_gen.generated_ids"][0].tolist()


def test_text_to_image_sampling(official):
    model, inp, out = official
    ids = inp["t2i.input_ids"][0].tolist()
    null = null_prompt(ids, model.cfg)
    assert null == out["t2i.uncond_input_ids"][0].tolist()
    eng = Engine(model)
    seen = []
    orig = eng.image_velocity

    def spy(prefix, xt, t, cfg_scale):
        seen.append((xt.clone(), t))
        return orig(prefix, xt, t, cfg_scale)

    eng.image_velocity = spy
    latent = eng.sample_images([ids], [null], noise=inp["t2i.noise"], steps=int(inp["t2i.num_inference_steps"]),
                               cfg_scale=float(inp["t2i.cfg_scale"]), shift=float(inp["t2i.alpha"]),
                               prefix_images=[inp["t2i.pixel_values"][0]])
    for n, (xt, t) in enumerate(seen):
        assert t == pytest.approx(float(out[f"t2i.step{n}.t"]), abs=1e-7)
        assert_official(f"t2i.step{n}.x_t", xt, out[f"t2i.step{n}.x_t"])
    assert_official("t2i.final_latent", latent, out["t2i.final_latent"])
    with torch.no_grad():
        assert_official("t2i.image", model.tokenizer.decode(latent), out["t2i.image"])


def test_round_trip_is_exact(official):
    model, _, _ = official
    sd = read_state_dict(OFFICIAL)
    back = ours_to_official(official_to_ours(sd, model.cfg), model.cfg)
    assert set(back) == set(sd)
    for k in sd:
        assert torch.equal(back[k], sd[k]), k
