"""Our Qwen2/Qwen3 LLM: parity with transformers, HF folders, KV cache, Cheers masks, errors."""

from __future__ import annotations

import json

import pytest
import torch

from cheers.adapters.hf_qwen import config_from_hf_qwen, hf_qwen_to_ours, load_hf_qwen, save_hf_qwen
from cheers.attention import build_dense_mask, image_block_ids
from cheers.config import LLMConfig
from cheers.errors import CheckpointError, InputError
from cheers.kv_cache import KVCache
from cheers.llm import LLM
from cheers.safetensors_io import load_checked

transformers = pytest.importorskip("transformers")

TINY = dict(
    vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-6,
)


def _randomize(model: torch.nn.Module, seed: int = 0) -> None:
    """Non-trivial values everywhere (HF init leaves biases 0 and norms 1, which hides bugs)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(1 + 0.1 * noise if "norm" in name else 0.05 * noise)


def _hf_model(kind: str, tied: bool, seed: int = 0):
    if kind == "qwen2":
        cfg = transformers.Qwen2Config(**TINY, tie_word_embeddings=tied, rope_theta=10000.0)
        model = transformers.Qwen2ForCausalLM(cfg)
    else:  # head_dim 24 != 64 / 4 on purpose
        cfg = transformers.Qwen3Config(
            **TINY, head_dim=24, tie_word_embeddings=tied, rope_theta=1e6, attention_bias=False
        )
        model = transformers.Qwen3ForCausalLM(cfg)
    _randomize(model, seed)
    return model.eval()


def _ours_from_hf(hf) -> LLM:
    cfg = config_from_hf_qwen(hf.config.to_dict())
    llm = LLM(cfg).eval()
    load_checked(llm, hf_qwen_to_ours(hf.state_dict(), cfg, source="hf"), source="hf")
    return llm


def _tiny_llm(seed: int = 0, **overrides) -> LLM:
    torch.manual_seed(seed)
    llm = LLM(LLMConfig(**{**TINY, **overrides}))
    llm.init_weights(std=0.1)
    return llm.eval()


# --------------------------------------------------------------------------- parity


@pytest.mark.parametrize("kind,tied", [("qwen2", True), ("qwen2", False), ("qwen3", False)])
@torch.no_grad()
def test_logits_match_transformers(kind, tied):
    hf = _hf_model(kind, tied)
    ours = _ours_from_hf(hf)
    assert ours.cfg.qk_norm == (kind == "qwen3") and ours.cfg.attention_bias == (kind == "qwen2")
    ids = torch.randint(0, 128, (2, 23), generator=torch.Generator().manual_seed(1))
    ref = hf(input_ids=ids).logits
    got = ours(ids)
    diff = (ref - got).abs().max().item()
    print(f"parity {kind} tied={tied}: max abs diff {diff:.3e}")
    assert diff < 1e-4


@pytest.mark.parametrize("kind,tied", [("qwen2", True), ("qwen3", False)])
@torch.no_grad()
def test_loads_transformers_folder_sharded(tmp_path, kind, tied):
    hf = _hf_model(kind, tied, seed=3)
    hf.save_pretrained(tmp_path, max_shard_size="60KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()  # really sharded
    ours = load_hf_qwen(tmp_path)
    ids = torch.randint(0, 128, (1, 17))
    diff = (hf(input_ids=ids).logits - ours(ids)).abs().max().item()
    print(f"HF folder -> ours ({kind}): max abs diff {diff:.3e}")
    assert diff < 1e-4
    if tied:
        assert ours.lm_head.weight is ours.embed_tokens.weight


@pytest.mark.parametrize("kind,tied,shard", [("qwen2", True, None), ("qwen3", False, 40_000)])
@torch.no_grad()
def test_our_save_loads_in_transformers(tmp_path, kind, tied, shard):
    ours = _ours_from_hf(_hf_model(kind, tied, seed=5))
    save_hf_qwen(ours, tmp_path, max_shard_bytes=shard)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == kind and config["architectures"][0].startswith(kind.title())
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ids = torch.randint(0, 128, (2, 11))
    diff = (hf(input_ids=ids).logits - ours(ids)).abs().max().item()
    print(f"ours -> HF folder ({kind}): max abs diff {diff:.3e}")
    assert diff < 1e-4
    again = load_hf_qwen(tmp_path)
    assert torch.equal(again(ids), ours(ids))


def test_load_hf_llm_accepts_tied_head_in_file(tmp_path):
    ours = _tiny_llm()
    save_hf_qwen(ours, tmp_path)
    from cheers.safetensors_io import read_state_dict, write_safetensors

    state = read_state_dict(tmp_path)
    assert "lm_head.weight" not in state
    state["lm_head.weight"] = state["model.embed_tokens.weight"]
    write_safetensors(state, tmp_path / "model.safetensors")
    ids = torch.randint(0, 128, (1, 5))
    with torch.no_grad():
        assert torch.equal(load_hf_qwen(tmp_path)(ids), ours(ids))


def test_load_hf_llm_dtype(tmp_path):
    save_hf_qwen(_tiny_llm(), tmp_path)
    assert load_hf_qwen(tmp_path).norm.weight.dtype == torch.float32
    assert load_hf_qwen(tmp_path, dtype=torch.bfloat16).lm_head.weight.dtype == torch.bfloat16


# --------------------------------------------------------------------------- construction


def test_meta_build_then_init():
    cfg = LLMConfig(**TINY)
    with torch.device("meta"):
        llm = LLM(cfg)
    assert llm.embed_tokens.weight.is_meta
    llm.to_empty(device="cpu")
    llm.init_weights()
    assert llm.lm_head.weight is llm.embed_tokens.weight
    q = llm.layers[0].self_attn.q_proj
    assert torch.all(q.bias == 0) and torch.all(llm.norm.weight == 1)
    assert abs(q.weight.std().item() - 0.02) < 0.003
    names = {n for n, _ in llm.named_parameters()}
    assert {"layers.1.self_attn.k_proj.bias", "layers.0.mlp.down_proj.weight", "norm.weight"} <= names
    with torch.no_grad():
        assert torch.isfinite(llm(torch.randint(0, 128, (1, 4)))).all()


def test_hidden_states_and_logits_agree():
    llm = _tiny_llm()
    ids = torch.randint(0, 128, (2, 6))
    with torch.no_grad():
        h = llm.hidden_states(ids)
        assert h.shape == (2, 6, 64)
        assert torch.equal(llm.logits(h), llm(ids))
        assert torch.allclose(llm(inputs_embeds=llm.embed_tokens(ids)), llm(ids))


# --------------------------------------------------------------------------- KV cache


@torch.no_grad()
def test_cache_decoding_equals_full_forward():
    llm = _tiny_llm()
    ids = torch.randint(0, 128, (2, 12))
    full = llm(ids)
    cache = llm.new_cache()
    steps = [llm(ids[:, :5], cache=cache), llm(ids[:, 5:8], cache=cache)]  # chunk after cache
    steps += [llm(ids[:, i : i + 1], cache=cache) for i in range(8, 12)]
    assert cache.seq_len == 12
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_cache_crop_then_rerun_equals_fresh_run():
    """The generator's loop: cached prompt, image block, crop back to the prompt, next block."""
    llm = _tiny_llm()
    emb = torch.randn(1, 14, 64)
    doc = torch.zeros(1, 14, dtype=torch.long)
    block = image_block_ids(torch.arange(14)[None] >= 10)  # image block at 10..13
    cache = KVCache(llm.cfg.num_hidden_layers, max_len=14)  # preallocated
    llm(inputs_embeds=emb[:, :10], cache=cache)
    mask = build_dense_mask(doc, block, q_len=4)  # [1, 1, 4, 14]
    llm(inputs_embeds=torch.randn(1, 4, 64), cache=cache, mask=mask)
    cache.crop(10)
    assert cache.seq_len == 10
    step = llm.hidden_states(inputs_embeds=emb[:, 10:], cache=cache, mask=mask)
    fresh = llm.hidden_states(inputs_embeds=emb, mask=build_dense_mask(doc, block))
    torch.testing.assert_close(step, fresh[:, 10:], atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_cache_batch_repeat_and_select():
    llm = _tiny_llm()
    prompt = torch.randint(0, 128, (1, 6))
    nxt = torch.randint(0, 128, (3, 2))
    cache = llm.new_cache()
    llm(prompt, cache=cache)
    big = cache.repeat_interleave(3)
    assert big.batch_size == 3 and cache.batch_size == 1  # the prompt cache is untouched
    got = llm(nxt, cache=big)
    ref = llm(torch.cat([prompt.expand(3, -1), nxt], dim=1))[:, 6:]
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    sel = big.index_select([2, 0])
    assert sel.seq_len == 8 and torch.equal(sel.layer(0)[0][0], big.layer(0)[0][2])
    both = KVCache.cat([cache, cache])
    assert both.batch_size == 2 and both.seq_len == 6


@torch.no_grad()
def test_cache_first_rows_runs_part_of_the_batch_in_place():
    llm = _tiny_llm()
    prompts = torch.randint(0, 128, (3, 6))
    nxt = torch.randint(0, 128, (2, 2))
    cache = KVCache(llm.cfg.num_hidden_layers, max_len=10)
    llm(prompts, cache=cache)
    held = cache.layer(0)[0].clone()
    part = cache.first_rows(2)
    got = llm(nxt, cache=part)
    torch.testing.assert_close(got, llm(torch.cat([prompts[:2], nxt], dim=1))[:, 6:], atol=1e-5, rtol=1e-5)
    assert part.seq_len == 8 and cache.seq_len == 6  # the full cache still holds the prompts alone
    assert torch.equal(cache.layer(0)[0], held)
    with pytest.raises(InputError, match=r"first_rows\(4\)"):
        cache.first_rows(4)
    with pytest.raises(InputError, match=r"first_rows\(1\)"):
        KVCache(2).first_rows(1)  # empty


# --------------------------------------------------------------------------- Cheers masks


def _layout(length=12, image=(4, 8)):
    doc = torch.zeros(1, length, dtype=torch.long)
    is_img = torch.zeros(1, length, dtype=torch.bool)
    is_img[:, image[0] : image[1]] = True
    return doc, image_block_ids(is_img)


@torch.no_grad()
def test_text_never_sees_later_image_but_image_is_bidirectional():
    llm = _tiny_llm()
    doc, block = _layout()
    mask = build_dense_mask(doc, block)
    emb = torch.randn(1, 12, 64)
    base = llm.hidden_states(inputs_embeds=emb, mask=mask)
    moved = emb.clone()
    moved[:, 7] += 1.0  # the last image token
    out = llm.hidden_states(inputs_embeds=moved, mask=mask)
    assert torch.allclose(out[:, :4], base[:, :4], atol=1e-6)  # text before the image: still
    assert (out[:, 4] - base[:, 4]).abs().max() > 1e-3  # first image token sees the last one
    assert (out[:, 10] - base[:, 10]).abs().max() > 1e-3  # later text sees the image


@torch.no_grad()
def test_packed_documents_are_independent_and_equal_unpacked():
    llm = _tiny_llm()
    a, b = torch.randn(1, 7, 64), torch.randn(1, 5, 64)
    doc = torch.tensor([[0] * 7 + [1] * 5 + [-1] * 2])
    is_img = torch.zeros(1, 14, dtype=torch.bool)
    is_img[:, 2:5] = True  # image in doc 0
    is_img[:, 9:11] = True  # image in doc 1
    block = image_block_ids(is_img)
    pos = torch.tensor([list(range(7)) + list(range(5)) + [0, 0]])
    packed = torch.cat([a, b, torch.zeros(1, 2, 64)], dim=1)
    out = llm.hidden_states(inputs_embeds=packed, position_ids=pos, mask=build_dense_mask(doc, block))
    assert torch.isfinite(out).all()  # padding rows included
    alone_a = llm.hidden_states(
        inputs_embeds=a, mask=build_dense_mask(doc[:, :7] * 0, image_block_ids(is_img[:, :7]))
    )
    alone_b = llm.hidden_states(
        inputs_embeds=b, mask=build_dense_mask(doc[:, 7:12] * 0, image_block_ids(is_img[:, 7:12]))
    )
    torch.testing.assert_close(out[:, :7], alone_a, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[:, 7:12], alone_b, atol=1e-5, rtol=1e-5)
    packed2 = packed.clone()
    packed2[:, 8] += 1.0  # touch doc 1 only
    out2 = llm.hidden_states(
        inputs_embeds=packed2, position_ids=pos, mask=build_dense_mask(doc, block)
    )
    assert torch.equal(out2[:, :7], out[:, :7])


@torch.no_grad()
def test_left_padding_gives_no_nan_and_matches_unpadded():
    llm = _tiny_llm()
    ids = torch.randint(0, 128, (1, 6))
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), ids], dim=1)
    doc = torch.tensor([[-1, -1, -1, 0, 0, 0, 0, 0, 0]])
    pos = torch.tensor([[0, 0, 0, 0, 1, 2, 3, 4, 5]])
    out = llm(padded, position_ids=pos, mask=build_dense_mask(doc))
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[:, 3:], llm(ids), atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_flex_backend_matches_sdpa():
    from cheers.attention import build_block_mask

    llm = _tiny_llm()
    doc, block = _layout()
    emb = torch.randn(1, 12, 64)
    try:
        flex = llm.hidden_states(
            inputs_embeds=emb, mask=build_block_mask(doc, block), backend="flex"
        )
    except Exception as e:  # noqa: BLE001 - any backend failure on this CPU build
        pytest.skip(f"FlexAttention cannot run on this CPU build: {type(e).__name__}: {e}")
    dense = llm.hidden_states(inputs_embeds=emb, mask=build_dense_mask(doc, block))
    torch.testing.assert_close(flex, dense, atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------- bad input


def test_over_long_sequence_raises_with_length_and_limit():
    llm = _tiny_llm()
    with pytest.raises(InputError, match=r"sequence length 65 .*max_position_embeddings=64"):
        llm(torch.zeros(1, 65, dtype=torch.long))
    cache = llm.new_cache()
    with torch.no_grad():
        llm(torch.zeros(1, 60, dtype=torch.long), cache=cache)
    with pytest.raises(InputError, match=r"70 \(60 cached \+ 10 new\).*64"):
        llm(torch.zeros(1, 10, dtype=torch.long), cache=cache)


def test_ids_xor_embeds():
    llm = _tiny_llm()
    with pytest.raises(InputError, match="exactly one"):
        llm()
    with pytest.raises(InputError, match="exactly one"):
        llm(torch.zeros(1, 2, dtype=torch.long), inputs_embeds=torch.zeros(1, 2, 64))


def test_wrong_model_type_names_file_and_type(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", **TINY}))
    with pytest.raises(CheckpointError, match=r"config\.json: model_type 'llama' is not supported"):
        load_hf_qwen(tmp_path)


def test_rope_theta_read_from_rope_parameters():
    data = {"model_type": "qwen2", **TINY, "rope_parameters": {"rope_type": "default", "rope_theta": 5e5}}
    assert config_from_hf_qwen(data).rope_theta == 5e5
    assert config_from_hf_qwen({"model_type": "qwen2", **TINY, "rope_theta": 7.0}).rope_theta == 7.0
    q3 = config_from_hf_qwen({"model_type": "qwen3", **TINY, "head_dim": 24})
    assert q3.head_dim == 24 and q3.qk_norm and not q3.attention_bias
    with pytest.raises(CheckpointError, match="rope_type 'yarn'"):
        config_from_hf_qwen({"model_type": "qwen2", **TINY, "rope_parameters": {"rope_type": "yarn"}})


def test_missing_tensor_in_folder_is_named(tmp_path):
    save_hf_qwen(_tiny_llm(), tmp_path)
    from cheers.safetensors_io import read_state_dict, write_safetensors

    state = read_state_dict(tmp_path)
    del state["model.layers.1.mlp.up_proj.weight"]
    write_safetensors(state, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"missing: layers\.1\.mlp\.up_proj\.weight"):
        load_hf_qwen(tmp_path)
    with pytest.warns(UserWarning, match="1 missing"):
        llm = load_hf_qwen(tmp_path, strict=False)
    assert torch.isfinite(llm.layers[1].mlp.up_proj.weight).all()
