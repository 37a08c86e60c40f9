"""The unified model on the debug flavour: masks, losses, meta-device build, bad inputs."""

from __future__ import annotations

import pytest
import torch

from cheers.config import flavour
from cheers.errors import InputError
from cheers.model import CheersModel
from cheers.sequence import (
    GEN_PLACEHOLDER,
    IGNORE,
    UND_PLACEHOLDER,
    expand_placeholders,
    greedy_rows,
    pack,
)


def sample_sequences(cfg, seed: int = 0):
    """A t2i, an i2t and a text-only sample with random words (ids < 200)."""
    g = torch.Generator().manual_seed(seed)
    tok = cfg.tokens
    words = lambda n: torch.randint(0, 200, (n,), generator=g).tolist()  # noqa: E731
    img = lambda: torch.rand(3, cfg.tokenizer.image_size, cfg.tokenizer.image_size, generator=g)  # noqa: E731
    t2i_ids = [tok.chat_start] + words(6) + [tok.eos, tok.chat_start] + [tok.im_start, GEN_PLACEHOLDER, tok.im_end, tok.eos]
    t2i_lab = [IGNORE] * 9 + [tok.im_start, IGNORE, tok.im_end, tok.eos]
    i2t_q = [tok.chat_start, tok.im_start, UND_PLACEHOLDER, tok.im_end] + words(5) + [tok.eos, tok.chat_start]
    answer = words(4) + [tok.eos]
    i2t_lab = [IGNORE] * len(i2t_q) + answer
    text = words(12) + [tok.eos]
    return [
        expand_placeholders(t2i_ids, t2i_lab, cfg, [img()]),
        expand_placeholders(i2t_q + answer, i2t_lab, cfg, [img()]),
        expand_placeholders(text, text, cfg, []),
    ]


def hidden_of(model, batch):
    with torch.no_grad():
        return model(batch, return_outputs=True)["hidden"]


@pytest.mark.parametrize("name", ["debug", "shapes"])
def test_an_image_becomes_the_tokens_the_config_counts(name):
    """``latent_grid`` and ``tokens_per_image``, which size every packed sequence, are what the
    vision tokenizer makes of an image of the flavour's size."""
    cfg = flavour(name)
    model = CheersModel(cfg)
    model.init_weights()
    size = cfg.tokenizer.image_size
    with torch.no_grad():
        x1 = model.tokenizer.encode(torch.rand(2, 3, size, size))
        tokens, patches = model.tokenizer(x1)
    assert x1.shape[-2:] == (cfg.latent_grid, cfg.latent_grid)
    assert tokens.shape == (2, cfg.tokens_per_image, cfg.llm.hidden_size)
    assert patches.shape[:2] == (2, cfg.latent_grid ** 2)
    with pytest.raises(InputError, match=f"images must be {size}x{size}"):
        model.tokenizer.encode(torch.rand(1, 3, size // 2, size // 2))


def test_forward_returns_losses(debug_model, debug_cfg):
    batch = pack(sample_sequences(debug_cfg), debug_cfg)
    out = debug_model(batch)
    assert set(out) >= {"loss", "ce", "flow"}
    assert out["ce"] > 0 and out["flow"] > 0
    torch.testing.assert_close(out["loss"], out["ce"] + out["flow"])


def test_text_does_not_see_later_image_but_image_block_is_bidirectional(debug_model, debug_cfg):
    seq = sample_sequences(debug_cfg)[0]  # t2i: image block at the end
    batch = pack([seq], debug_cfg)
    batch.t = torch.tensor([0.5])
    batch.noise = torch.randn(1, debug_cfg.tokenizer.vae.latent_channels, debug_cfg.latent_grid, debug_cfg.latent_grid)
    h0 = hidden_of(debug_model, batch)
    slots = (batch.image_index[0] >= 0).nonzero().squeeze(1)
    first, last = int(slots[0]), int(slots[-1])
    # change only the image: text before it must not move, every image slot must
    batch.images = torch.rand_like(batch.images)
    h1 = hidden_of(debug_model, batch)
    torch.testing.assert_close(h1[0, :first], h0[0, :first], rtol=0, atol=0)
    assert (h1[0, first] - h0[0, first]).abs().max() > 1e-4  # first slot sees later slots of its block
    assert (h1[0, last] - h0[0, last]).abs().max() > 1e-4


@pytest.mark.slow
def test_packed_samples_do_not_see_each_other(debug_model, debug_cfg):
    seqs = sample_sequences(debug_cfg)
    noise = torch.randn(2, debug_cfg.tokenizer.vae.latent_channels, debug_cfg.latent_grid, debug_cfg.latent_grid)
    packed = pack(seqs, debug_cfg, rows=[[0, 1, 2]])
    packed.t, packed.noise = torch.tensor([0.3, 1.0]), noise
    hp = hidden_of(debug_model, packed)
    off = 0
    img = 0
    for s in seqs:
        single = pack([s], debug_cfg)
        n_img = len(s.images)
        if n_img:
            single.t, single.noise = packed.t[img:img + n_img], noise[img:img + n_img]
        hs = hidden_of(debug_model, single)
        # fp noise only (batched convs); a leak across documents moves values by O(0.1)
        torch.testing.assert_close(hp[0, off:off + len(s)], hs[0], atol=1e-4, rtol=1e-4)
        off += len(s)
        img += n_img


@pytest.mark.slow
def test_loss_falls_over_30_adamw_steps(debug_cfg):
    torch.manual_seed(0)
    model = CheersModel(debug_cfg)
    model.init_weights()
    model.train()
    batch = pack(sample_sequences(debug_cfg), debug_cfg)
    batch.noise = torch.randn(2, debug_cfg.tokenizer.vae.latent_channels, debug_cfg.latent_grid, debug_cfg.latent_grid)
    batch.t = torch.tensor([0.4, 1.0])
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    losses = []
    for _ in range(30):
        out = model(batch)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        losses.append((out["ce"].item(), out["flow"].item()))
    print("ce", losses[0][0], "->", losses[-1][0], "flow", losses[0][1], "->", losses[-1][1])
    assert losses[-1][0] < 0.5 * losses[0][0]
    assert losses[-1][1] < 0.8 * losses[0][1]


def test_cheers_1_5b_on_meta_matches_released_model():
    cfg = flavour("cheers-1.5b")
    assert cfg.tokens_per_image == 256 and cfg.latent_grid == 32
    with torch.device("meta"):
        model = CheersModel(cfg)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731  (unique: ties count once)
    parts = {n: count(model.get_submodule(n)) for n in [
        "tokenizer.vae.encoder", "tokenizer.vae.decoder", "tokenizer.pixel_decoder", "tokenizer.siglip",
        "tokenizer.compressor", "llm", "head.time_embed", "head.stage_a", "head.gate", "head.stage_b"]}
    for name, n in parts.items():
        print(f"{name:28s} {n / 1e6:9.2f}M")
    total = count(model)
    assert sum(parts.values()) == total
    print(f"total unique {total / 1e6:.2f}M; with the tied lm_head stored: {(total + model.llm.lm_head.weight.numel()) / 1e9:.3f}B")
    assert round(total / 1e6) == 2571
    assert round((total + model.llm.lm_head.weight.numel()) / 1e9, 2) == 2.80
    # a 512 px image becomes 256 LLM tokens of width 1536
    tokens, patch = model.image_tokens(torch.empty(1, 128, 32, 32, device="meta"))
    assert tokens.shape == (1, 256, 1536) and patch.shape == (1, 1024, 1152)


def test_bad_images_and_lengths(debug_model, debug_cfg):
    with pytest.raises(InputError, match=r"\[B, 3, H, W\].*\(2, 4, 64, 64\)"):
        debug_model.tokenizer.encode(torch.rand(2, 4, 64, 64))
    with pytest.raises(InputError, match="64x64.*48x48"):
        debug_model.tokenizer.encode(torch.rand(1, 3, 48, 48))
    long = expand_placeholders(list(range(100)) * 6, None, debug_cfg, [])
    with pytest.raises(InputError, match="600 tokens, over the maximum of 512"):
        pack([long], debug_cfg)
    with pytest.raises(InputError, match="2 images given but the sequence has 1"):
        expand_placeholders([1, UND_PLACEHOLDER], None, debug_cfg, [torch.rand(3, 64, 64)] * 2)


def test_greedy_rows_packs_within_budget():
    rows = greedy_rows([5, 3, 7, 2, 4], budget=8)
    assert sorted(i for r in rows for i in r) == [0, 1, 2, 3, 4]
    assert all(sum([5, 3, 7, 2, 4][i] for i in r) <= 8 for r in rows)
    with pytest.raises(InputError, match="9 tokens, over the row budget of 8"):
        greedy_rows([9], budget=8)


def test_compressor_out_rms_fixes_the_image_token_scale():
    """The shapes-world option scales every LLM image token to the configured RMS; the
    official layout cannot hold it and says so."""
    import dataclasses

    from cheers.adapters.official import config_to_official
    from cheers.errors import CheckpointError

    cfg = flavour("debug")
    cfg = dataclasses.replace(cfg, tokenizer=dataclasses.replace(cfg.tokenizer, compressor_out_rms=0.05))
    torch.manual_seed(0)
    model = CheersModel(cfg)
    model.init_weights()
    g = cfg.latent_grid
    with torch.no_grad():
        tokens, _ = model.image_tokens(torch.randn(2, cfg.tokenizer.vae.latent_channels, g, g) * 10)
    rms = tokens.pow(2).mean(-1).sqrt()  # [I, N]: one value per token
    torch.testing.assert_close(rms, torch.full_like(rms, 0.05), rtol=1e-3, atol=1e-6)
    with pytest.raises(CheckpointError, match="compressor_out_rms"):
        config_to_official(cfg)


def test_x1_output_is_read_with_the_training_clamp_in_sampling():
    """With x1 prediction the loss trains ``(out - xt) / max(1 - t, t_min)`` against x1 - x0;
    the sampler's velocity must read the output the same way, or near t = 1 it scales the
    velocity by t_min / (1 - t)."""
    import dataclasses

    from cheers.flow_head import transport

    cfg = flavour("debug")
    cfg = dataclasses.replace(cfg, transport=dataclasses.replace(cfg.transport, prediction="x1",
                                                                 x1_loss_t_min=0.25))
    torch.manual_seed(0)
    model = CheersModel(cfg).eval()
    model.init_weights()
    for p in model.head.stage_b.final.linear.parameters():  # a non-zero output
        torch.nn.init.normal_(p, std=0.5)
    g, c, n = cfg.latent_grid, cfg.tokenizer.vae.latent_channels, cfg.tokens_per_image
    hidden, xt = torch.randn(2, n, cfg.llm.hidden_size), torch.randn(2, c, g, g)
    patch = torch.randn(2, g * g, cfg.tokenizer.siglip.hidden_size)
    t = torch.tensor([0.4, 0.95])
    with torch.no_grad():
        out = model.head(hidden, t, patch).transpose(1, 2).reshape(2, c, g, g)
        v = model.velocity(hidden, t, xt, patch)
    torch.testing.assert_close(v[0], (out[0] - xt[0]) / 0.6)
    torch.testing.assert_close(v[1], (out[1] - xt[1]) / 0.25)  # not / 0.05
    torch.testing.assert_close(v, transport.velocity_from_x1(out, xt, t, t_min=0.25))


def test_time_scale_multiplies_t_and_stays_out_of_the_official_layout():
    import dataclasses

    from cheers.adapters.official import config_to_official
    from cheers.errors import CheckpointError
    from cheers.flow_head.model import TimeEmbedding

    t = torch.tensor([0.0, 0.3, 1.0])
    scaled, plain = TimeEmbedding(256, 8, 8, scale=1000.0), TimeEmbedding(256, 8, 8)
    torch.testing.assert_close(scaled.sinusoid(t), plain.sinusoid(1000.0 * t))
    # as is, the slowest frequencies barely move over t in [0, 1]; scaled, they do
    spread = lambda emb: (emb.sinusoid(torch.tensor([1.0])) - emb.sinusoid(torch.tensor([0.0]))).abs()  # noqa: E731
    assert (spread(plain) > 0.1).sum() < 64 < (spread(scaled) > 0.1).sum()  # of 256 dims
    cfg = flavour("debug")
    with pytest.raises(CheckpointError, match="time_scale"):
        config_to_official(dataclasses.replace(cfg, head=dataclasses.replace(cfg.head, time_scale=1000.0)))


def test_latent_shortcuts_read_the_right_cells_and_stay_out_of_the_official_layout():
    """``tokenizer.latent_to_llm`` adds a linear map of each LLM token's own 2x2 latent cells;
    ``head.latent_to_stage_b`` adds one of each cell of xt to stage B's input. Both are
    shapes-world options that the official layout refuses."""
    import dataclasses

    from cheers.adapters.official import config_to_official
    from cheers.errors import CheckpointError

    base = flavour("debug")
    cfg = dataclasses.replace(base, tokenizer=dataclasses.replace(base.tokenizer, latent_to_llm=True),
                              head=dataclasses.replace(base.head, latent_to_stage_b=True))
    torch.manual_seed(0)
    model = CheersModel(cfg).eval()
    model.init_weights()
    g, c = cfg.latent_grid, cfg.tokenizer.vae.latent_channels
    xt = torch.randn(2, c, g, g)
    tok = model.tokenizer
    with torch.no_grad():
        tok.latent_proj.weight.zero_()
        tok.latent_proj.bias.zero_()
        plain, _ = tok(xt)
        # output unit 0 reads input (py=1, px=0, channel 2): row 2 gi + 1, column 2 gj
        tok.latent_proj.weight[0, (1 * 2 + 0) * c + 2] = 1.0
        tokens, _ = tok(xt)
    shortcut = (tokens - plain)[..., 0].reshape(2, g // 2, g // 2)
    torch.testing.assert_close(shortcut, xt[:, 2, 1::2, 0::2])
    assert (tokens - plain)[..., 1:].abs().max() == 0

    hidden = torch.randn(2, cfg.tokens_per_image, cfg.llm.hidden_size)
    patch = torch.randn(2, g * g, cfg.tokenizer.siglip.hidden_size)
    t = torch.tensor([0.3, 0.7])
    with torch.no_grad():
        for p in model.head.stage_b.final.linear.parameters():
            torch.nn.init.normal_(p, std=0.5)
        a = model.head(hidden, t, patch, xt)
        b = model.head(hidden, t, patch, xt + 1.0)
        model.head.latent_in.weight.zero_()
        model.head.latent_in.bias.zero_()
        c1, c2 = model.head(hidden, t, patch, xt), model.head(hidden, t, patch, xt + 1.0)
    assert (a - b).abs().max() > 1e-3  # stage B reads xt itself
    torch.testing.assert_close(c1, c2)  # and through nothing else but latent_in
    with pytest.raises(InputError, match="needs xt"):
        model.head(hidden, t, patch)
    only_llm, only_stage_b = (dataclasses.replace(cfg, head=base.head),
                              dataclasses.replace(cfg, tokenizer=base.tokenizer))
    for option, one_on in (("latent_to_llm", only_llm), ("latent_to_stage_b", only_stage_b)):
        with pytest.raises(CheckpointError, match=option):
            config_to_official(one_on)


@pytest.mark.parametrize("variant", ["released", "latent_paths"])
def test_training_forward_reads_the_model_as_the_sampler_does(variant, fill_zero_layers):
    """The flow loss's velocity for a text-to-image sample packed behind two other samples
    equals the sampler's velocity for the same prompt, latent and t (also with the shapes
    world's direct paths from xt, ``tokenizer.latent_to_llm`` and ``head.latent_to_stage_b``,
    and its clean-latent prediction, ``transport.prediction="x1"``)."""
    import dataclasses

    from cheers.engine import Engine
    from cheers.flow_head import transport

    base = flavour("debug")
    latent_paths = variant != "released"
    cfg = dataclasses.replace(base, tokenizer=dataclasses.replace(base.tokenizer, latent_to_llm=latent_paths),
                              head=dataclasses.replace(base.head, latent_to_stage_b=latent_paths),
                              transport=dataclasses.replace(base.transport,
                                                            prediction="x1" if latent_paths else "velocity"))
    torch.manual_seed(0)
    model = CheersModel(cfg).eval()
    model.init_weights()
    fill_zero_layers(model)
    seqs = sample_sequences(cfg, seed=3)
    batch = pack([seqs[2], seqs[1], seqs[0]], cfg, rows=[[0, 1, 2]])  # the t2i sample last in its row
    g, c = cfg.latent_grid, cfg.tokenizer.vae.latent_channels
    batch.t = torch.tensor([1.0, 0.35])  # images in sample order: understanding, then generation
    batch.noise = torch.randn(2, c, g, g)
    with torch.no_grad():
        v_train = model(batch, return_outputs=True)["v_pred"]  # [1, C, G, G]
        x1 = model.tokenizer.encode(batch.images[1:])
        xt = transport.interpolate(x1, batch.noise[1:], torch.tensor([0.35]))
        ids = seqs[0].ids
        prompt = ids[: ids.index(cfg.tokens.im_start) + 1]
        engine = Engine(model)
        v_sample = engine.image_velocity(engine.prefill([prompt], [[]]), xt, 0.35, cfg_scale=1.0)
    torch.testing.assert_close(v_train, v_sample, atol=1e-5, rtol=1e-5)
