"""Inference engines: the cached paths equal naive full recomputation; CFG."""

from __future__ import annotations

import pytest
import torch

from cheers.attention import build_dense_mask
from cheers.cuda_graphs import StaticDecoder
from cheers.debug_checkpoint import make_debug_checkpoint
from cheers.engine import Engine
from cheers.flow_head import transport
from cheers.pipeline import Pipeline
from cheers.sequence import expand_placeholders, null_prompt, pack


@pytest.fixture(scope="module")
def pipe(tmp_path_factory, fill_zero_layers):
    path = tmp_path_factory.mktemp("debug")
    make_debug_checkpoint(path)
    p = Pipeline.from_pretrained(path)
    fill_zero_layers(p.model)  # else every velocity is 0 and every sampled image its noise
    return p, path


def naive_velocity(model, rows, xt, t):
    """Velocity by a full forward of prompt + image block, no cache (one row per latent)."""
    cfg = model.cfg
    n = cfg.tokens_per_image
    out = []
    for r, ids in enumerate(rows):
        seq = expand_placeholders(ids, None, cfg, [])
        batch = pack([seq], cfg)
        tokens, patch = model.image_tokens(xt[r:r + 1])
        emb = torch.cat([model.embed(batch.input_ids, batch.image_index, batch.image_slot, None), tokens], 1)
        L = emb.shape[1]
        doc = torch.zeros(1, L, dtype=torch.long)
        block = torch.full((1, L), -1, dtype=torch.long)
        block[:, L - n:] = 0
        hidden = model.llm.hidden_states(inputs_embeds=emb, mask=build_dense_mask(doc, block))
        out.append(model.velocity(hidden[:, L - n:], torch.tensor([t]), xt[r:r + 1], patch))
    return torch.cat(out)


def test_prefix_cache_equals_full_recomputation(pipe):
    p, _ = pipe
    model, cfg = p.model, p.cfg
    rows = [p.text_tokenizer.t2i_prompt("a red circle"), p.text_tokenizer.t2i_prompt("two blue squares above a star")]
    nulls = [null_prompt(r, cfg) for r in rows]
    noise = torch.randn(2, cfg.tokenizer.vae.latent_channels, cfg.latent_grid, cfg.latent_grid)
    scale = 3.0
    with torch.no_grad():
        cached = Engine(model).sample_images(rows, nulls, noise=noise, steps=4, cfg_scale=scale, shift=0.5)

        def v(x, t):
            vc, vu = naive_velocity(model, rows, x, t), naive_velocity(model, nulls, x, t)
            return vu + scale * (vc - vu)

        naive = transport.sample_ode(v, noise, steps=4, shift=0.5)
    torch.testing.assert_close(cached, naive, atol=1e-4, rtol=1e-4)


def test_cfg_scale_one_is_the_conditional_branch(pipe):
    p, _ = pipe
    cfg = p.cfg
    rows = [p.text_tokenizer.t2i_prompt("a green star")]
    noise = torch.randn(1, cfg.tokenizer.vae.latent_channels, cfg.latent_grid, cfg.latent_grid)
    eng = Engine(p.model)
    a = eng.sample_images(rows, [null_prompt(rows[0], cfg)], noise=noise, steps=3, cfg_scale=1.0, shift=0.5)
    b = eng.sample_images(rows, None, noise=noise, steps=3, cfg_scale=5.0, shift=0.5)
    torch.testing.assert_close(a, b)


def test_guidance_only_inside_cfg_interval(pipe):
    """With ``transport.cfg_interval`` = [0.5, 1], steps at t < 0.5 take the conditional velocity
    alone and the others the guided one; eager and fixed-shape steps agree."""
    p, _ = pipe
    model, cfg = p.model, p.cfg
    rows = [p.text_tokenizer.t2i_prompt("a red circle")]
    nulls = [null_prompt(rows[0], cfg)]
    noise = torch.randn(1, cfg.tokenizer.vae.latent_channels, cfg.latent_grid, cfg.latent_grid,
                        generator=torch.Generator().manual_seed(2))
    kw = dict(noise=noise, steps=4, cfg_scale=4.0, shift=1.0)  # times 0, 1/3, 2/3, 1
    with torch.no_grad():
        every = Engine(model).sample_images(rows, nulls, **kw)
        old = cfg.transport.cfg_interval
        cfg.transport.cfg_interval = [0.5, 1.0]
        llm_rows = []  # rows of every LLM call: the prompt prefill, then one call a step
        forward = model.llm.hidden_states

        def counted(*args, **kwargs):
            llm_rows.append(kwargs["inputs_embeds"].shape[0] if "inputs_embeds" in kwargs else args[0].shape[0])
            return forward(*args, **kwargs)

        try:
            model.llm.hidden_states = counted
            eager = Engine(model, static=False).sample_images(rows, nulls, **kw)
            del model.llm.hidden_states
            got = [eager, Engine(model, static=True).sample_images(rows, nulls, **kw)]
        finally:
            cfg.transport.cfg_interval = old
            model.llm.__dict__.pop("hidden_states", None)
        # eager steps outside the interval (t = 0, 1/3) run the conditional row alone; the
        # steps at 2/3 and 1 (the official extra step) both rows
        assert llm_rows == [2, 1, 1, 2, 2]

        def v(x, t):
            vc, vu = naive_velocity(model, rows, x, t), naive_velocity(model, nulls, x, t)
            return vu + (4.0 if t >= 0.5 else 1.0) * (vc - vu)

        naive = transport.sample_ode(v, noise, steps=4, shift=1.0,
                                     official_last_step=cfg.transport.official_last_step)
    torch.testing.assert_close(got[0], naive, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got[1], got[0], atol=1e-5, rtol=1e-5)
    assert (every - got[0]).abs().max() > 1e-3  # the noisy steps' guidance did change the sample


def test_same_seed_same_image(pipe):
    p, _ = pipe
    a = p.generate(["a red circle"], seed=3, steps=2, cfg_scale=2.0)[0]
    b = p.generate(["a red circle"], seed=3, steps=2, cfg_scale=2.0)[0]
    c = p.generate(["a red circle"], seed=4, steps=2, cfg_scale=2.0)[0]
    assert a.tobytes() == b.tobytes() and a.tobytes() != c.tobytes()


def test_cached_decoding_equals_step_by_step(pipe):
    p, _ = pipe
    model, cfg = p.model, p.cfg
    image = torch.rand(3, 64, 64)
    ids = p.text_tokenizer.i2t_prompt("What colour is the circle?")
    got = [int(t[0]) for t in Engine(model).decode_text([ids], [[image]], max_new_tokens=6, stop_ids={-1})]
    # naive: re-run the whole sequence for every new token
    seq_ids, naive = list(ids), []
    with torch.no_grad():
        for _ in range(6):
            batch = pack([expand_placeholders(seq_ids, None, cfg, [image], [False])], cfg)
            hidden = model(batch, return_outputs=True)["hidden"]
            nxt = int(model.llm.logits(hidden[:, -1]).argmax(-1))
            naive.append(nxt)
            seq_ids.append(nxt)
    assert got == naive


def _static_vs_dynamic(model, p, device):
    """Latents and decoding logits of the static-shape steps against the dynamic ones."""
    cfg = p.cfg
    rows = [p.text_tokenizer.t2i_prompt("a red circle"), p.text_tokenizer.t2i_prompt("two blue squares above a star")]
    nulls = [null_prompt(r, cfg) for r in rows]
    noise = torch.randn(2, cfg.tokenizer.vae.latent_channels, cfg.latent_grid, cfg.latent_grid,
                        generator=torch.Generator().manual_seed(0)).to(device)
    kw = dict(noise=noise, steps=4, cfg_scale=3.0, shift=0.5)
    latents = [Engine(model, static=s).sample_images(rows, nulls, **kw) for s in (False, True)]
    # decoding: rows of different prompt lengths, so the left padding must stay hidden over
    # the static cache's whole capacity; fixed next tokens, logits compared at every step
    gen = torch.Generator().manual_seed(1)
    images = [[torch.rand(3, 64, 64, generator=gen)], [torch.rand(3, 64, 64, generator=gen)]]
    questions = [p.text_tokenizer.i2t_prompt("What colour is the circle?"),
                 p.text_tokenizer.i2t_prompt("Hi there, how many shapes are in this picture?")]
    feed = torch.randint(8, cfg.llm.vocab_size, (5, 2), generator=gen).to(device)
    eng = Engine(model)
    logits = []
    with torch.no_grad():
        for static in (False, True):
            prefix = eng.prefill(questions, images)
            doc, pos, steps = prefix.doc_ids, prefix.next_pos.clone(), []
            dec = StaticDecoder(model.llm, prefix.cache, doc, pos, len(feed)) if static else None
            for tok in feed:
                if dec is not None:
                    steps.append(dec.step(tok).clone())
                    continue
                doc = torch.cat([doc, torch.zeros_like(doc[:, :1])], 1)
                hidden = model.llm.hidden_states(tok[:, None], position_ids=pos[:, None], cache=prefix.cache,
                                                 mask=build_dense_mask(doc, None, q_len=1))
                pos += 1
                steps.append(model.llm.logits(hidden[:, -1]))
            logits.append(torch.stack(steps))
    return latents, logits


def test_static_steps_equal_dynamic_ones(pipe):
    """The fixed-shape steps (CUDA graphs on a GPU) give the dynamic path's results."""
    p, _ = pipe
    latents, logits = _static_vs_dynamic(p.model, p, "cpu")
    torch.testing.assert_close(latents[1], latents[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits[1], logits[0], atol=1e-5, rtol=1e-5)


@pytest.mark.gpu
def test_cuda_graphs_equal_eager(pipe):
    if not torch.cuda.is_available():
        pytest.skip("needs a GPU")
    p, _ = pipe
    model = p.model.to("cuda")
    try:
        out = _static_vs_dynamic(model, p, "cuda")
    finally:
        p.model.to("cpu")
    latents, logits = out
    torch.testing.assert_close(latents[1], latents[0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(logits[1], logits[0], atol=1e-4, rtol=1e-4)


def test_stop_tokens_stop(pipe):
    p, _ = pipe
    image = torch.rand(3, 64, 64)
    ids = p.text_tokenizer.i2t_prompt("What colour?")
    eng = Engine(p.model)
    first = [int(t[0]) for t in eng.decode_text([ids], [[image]], max_new_tokens=5, stop_ids={-1})]
    stop = first[1]
    stopped = [int(t[0]) for t in eng.decode_text([ids], [[image]], max_new_tokens=5, stop_ids={stop})]
    # decoding ends right after the first stop token it emits
    assert stopped == first[: first.index(stop) + 1]
