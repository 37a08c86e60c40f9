"""LC-QAT: transforms, the QAT layer and its estimator, PTQ, packing, baselines, quantize_model.

CPU, fp32, small layers. The Triton kernels are checked by the ``gpu`` tests at the end.
"""

from __future__ import annotations

import copy
import json
import math
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from cheers.errors import CheckpointError, ConfigError, InputError
from cheers.lcqat import (
    LCQConfig,
    LCQLinear,
    LSQLinear,
    PackedLCQLinear,
    apply_lcqat,
    apply_lsq,
    bits_per_weight,
    estimator_grad,
    export_lcqat,
    gptq_quantize,
    hadamard_matrix,
    hadamard_plan,
    hadamard_transform,
    lcq_ptq_layer,
    ldlq_round,
    load_lcqat,
    pack_codes,
    quantize_model,
    rtn_quantize,
    to_packed,
    unpack_codes,
)
from cheers.lcqat.baselines import dequantize_groups
from cheers.lcqat.kernels import reference_lcq_matmul, triton_available
from cheers.lcqat.lcq_linear import RoundWithEstimator, codebook
from cheers.lcqat.ptq import HessianCollector, damp_hessian, rotate_hessian

gpu = pytest.mark.skipif(not triton_available(), reason="needs CUDA and Triton")


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def _structured_layer(m: int = 64, n: int = 128) -> tuple[nn.Linear, torch.Tensor]:
    """A low-rank-plus-noise weight and an input mixing matrix with a decaying spectrum."""
    lin = nn.Linear(n, m)
    with torch.no_grad():
        lin.weight.copy_(0.05 * torch.randn(m, 8) @ torch.randn(8, n) + 0.02 * torch.randn(m, n))
    mix = torch.randn(n, n) * torch.linspace(1.0, 0.01, n).pow(2)[None, :]
    return lin, mix


def _inputs(mix: torch.Tensor, rows: int) -> torch.Tensor:
    return torch.randn(rows, mix.shape[0]) @ mix.T + 0.1 * torch.randn(rows, mix.shape[0])


def _rel_mse(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out - ref).pow(2).mean() / ref.pow(2).mean())


def _tiny_qwen2() -> nn.Module:
    transformers = pytest.importorskip("transformers")
    cfg = transformers.Qwen2Config(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    )
    return transformers.Qwen2ForCausalLM(cfg).eval()


# --------------------------------------------------------------------------- Hadamard


@pytest.mark.parametrize(
    "n, mode, k",
    [(64, "full", 1), (96, "full", 12), (80, "full", 20), (56, "full", 28), (72, "full", 36),
     (1536, "full", 12), (256, "full", 1), (384, "block128", 1), (48, "block128", 1)],
)
def test_hadamard_is_orthogonal(n: int, mode: str, k: int) -> None:
    plan = hadamard_plan(n, mode)
    assert plan.k == k
    h = hadamard_matrix(n, mode)  # [n, n] float64
    torch.testing.assert_close(h @ h.T, torch.eye(n, dtype=torch.float64), atol=1e-12, rtol=0)
    if mode == "full":  # a dense Hadamard matrix: all entries +-1/sqrt(n)
        torch.testing.assert_close(h.abs(), torch.full_like(h, 1 / math.sqrt(n)))
    else:  # block-diagonal
        assert h[: plan.block, plan.block :].abs().max() == 0
    x = torch.randn(3, n, dtype=torch.float64)
    torch.testing.assert_close(hadamard_transform(x, plan), x @ h.T)
    torch.testing.assert_close(hadamard_transform(hadamard_transform(x, plan), plan, transpose=True), x)


def test_hadamard_qwen_sizes_and_fallback() -> None:
    # Qwen2.5-1.5B: 1536 = 12 * 128, 8960 = 140 * 64 (Paley, q = 139), 256 = 2^8
    assert hadamard_plan(8960, "full").k == 140 and hadamard_plan(8960, "full").is_full
    assert hadamard_plan(8960, "block128").block == 128
    x = torch.randn(2, 8960, dtype=torch.float64)
    y = hadamard_transform(x, "full")
    torch.testing.assert_close(y.norm(dim=1), x.norm(dim=1))
    torch.testing.assert_close(hadamard_transform(y, "full", transpose=True), x)
    # 92 = 4 * 23: no construction for 23, 46 or 92 -> blocks of 4, with a warning
    hadamard_plan.cache_clear()
    with pytest.warns(UserWarning, match="no Hadamard construction for size 92"):
        plan = hadamard_plan(92, "full")
    assert plan.block == 4 and plan.k == 1
    h = hadamard_matrix(92)
    torch.testing.assert_close(h @ h.T, torch.eye(92, dtype=torch.float64))


# --------------------------------------------------------------------------- LCQLinear


def test_codes_stay_in_range_and_weights_are_codewords() -> None:
    q = LCQLinear.from_linear(nn.Linear(32, 16), LCQConfig(rotation="random"))
    with torch.no_grad():
        q.theta.mul_(50.0).add_(torch.randn_like(q.theta))  # push u far outside [0, 3]
    z = q.codes()
    assert z.dtype == torch.uint8 and int(z.min()) == 0 and int(z.max()) == 3
    w = q.rotated_weight().detach().reshape(-1, 4)  # [m n / 4, 4]
    cb = codebook(q.A.detach(), q.b.detach())
    dist = (w[:, None, :] - cb[None, :, :]).abs().amax(-1).min(1).values  # [m n / 4]
    assert float(dist.max()) < 1e-5


@pytest.mark.parametrize("r", [0.05, 0.25, 0.5, 0.75, 0.95])
@pytest.mark.parametrize("base", [0.0, 1.0, 2.0])
def test_estimator_gradient_matches_formula(r: float, base: float) -> None:
    u = torch.tensor([base + r], requires_grad=True)
    z = RoundWithEstimator.apply(u, 5.0, 3.0)
    z.sum().backward()
    want = 3.0 if r == 0.5 else min(3.0, 0.2 * abs(2 * r - 1) ** (0.2 - 1.0))
    assert u.grad.item() == pytest.approx(want, rel=1e-5)
    assert z.item() == min(3, max(0, round(base + r)))


def test_estimator_outside_code_range_and_layer_gradient() -> None:
    # below 0 the floor is clamped to 0, so r = u and |2r - 1| > 1: a small, decaying slope
    u = torch.tensor([-0.5, -2.0, 4.5])
    r = torch.tensor([-0.5, -2.0, 1.5])
    torch.testing.assert_close(estimator_grad(u), torch.clamp(0.2 * (2 * r - 1).abs() ** -0.8, max=3.0))
    # dL/dtheta = dL/dz * estimator * s, through A's transpose
    q = LCQLinear.from_linear(nn.Linear(8, 4, bias=False))
    x = torch.randn(5, 8)
    q(x).pow(2).sum().backward()
    for p in (q.theta, q.A, q.b, q.SU, q.SV):
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0


def test_qat_forward_equals_dequantised_ptq_weights() -> None:
    lin, mix = _structured_layer(24, 32)
    x = _inputs(mix, 256)
    cfg = LCQConfig(rotation="random", sweeps=1)
    q, _ = lcq_ptq_layer("layer", lin, x.T @ x / x.shape[0], cfg)
    # the same rounding, recomputed independently from the layer's signs and scales
    h_rot = rotate_hessian(damp_hessian(x.T @ x / x.shape[0], cfg.damp), q)
    z, _ = ldlq_round(q.rotate_weight(lin.weight), h_rot, q.A.detach(), q.b.detach(), sweeps=1)
    assert torch.equal(q.codes(), z)
    # W_eff = diag(SV) H_m^T What H_n diag(SU) with dense Hadamard matrices and What = A z + b
    w_hat = (z.float().reshape(24, 8, 4) @ q.A.detach().T + q.b.detach()).reshape(24, 32)
    hm, hn = hadamard_matrix(24).float(), hadamard_matrix(32).float()
    w_eff = q.SV.detach()[:, None] * (hm.T @ w_hat @ hn) * q.SU.detach()[None, :]
    torch.testing.assert_close(q(x), x @ w_eff.T + lin.bias.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(q.dequantized_weight(), w_eff, atol=1e-5, rtol=1e-5)


def test_ptq_beats_rtn_on_correlated_inputs() -> None:
    lin, mix = _structured_layer()
    calib = [_inputs(mix, 256) for _ in range(4)]
    test = _inputs(mix, 2048)
    with torch.no_grad():
        ref = lin(test)
        errs = {}
        for method, opts in [("rtn", {}), ("gptq", {}), ("lcqat", {"finetune_steps": 30})]:
            model, report = quantize_model(nn.Sequential(copy.deepcopy(lin)), calib, method, exclude=(), progress=False, **opts)
            errs[method] = _rel_mse(model(test), ref)
    # LC-QAT at ~2.0 bits (2.45 here: SU/SV on a 64x128 layer) vs scalar RTN / GPTQ g64 at 2.5
    assert errs["lcqat"] < 0.5 * errs["rtn"], errs
    assert errs["lcqat"] < errs["gptq"], errs


def test_apply_lcqat_swaps_linears_only() -> None:
    model = nn.Sequential(nn.Embedding(10, 8), nn.Linear(8, 16), nn.LayerNorm(16), nn.Linear(16, 8))
    model.lm_head = nn.Linear(8, 10)
    names = apply_lcqat(model, LCQConfig())
    assert names == ["1", "3"]
    assert isinstance(model[1], LCQLinear) and isinstance(model[0], nn.Embedding)
    assert type(model.lm_head) is nn.Linear
    assert apply_lcqat(model) == []  # already swapped layers are left alone


# --------------------------------------------------------------------------- packing


def test_pack_unpack_round_trip() -> None:
    z = torch.randint(0, 4, (7, 64), dtype=torch.uint8)
    packed = pack_codes(z)
    assert packed.dtype == torch.uint8 and packed.shape == (7, 16)
    assert torch.equal(unpack_codes(packed), z)
    every = torch.arange(256, dtype=torch.uint8)[None, :]  # every byte value decodes and re-encodes
    assert torch.equal(pack_codes(unpack_codes(every)), every)
    assert int(pack_codes(torch.tensor([[1, 2, 3, 0]]))) == 1 | 2 << 2 | 3 << 4


def test_packed_inference_equals_fake_quant_forward() -> None:
    lin, mix = _structured_layer(48, 64)
    x = _inputs(mix, 16)
    q, _ = lcq_ptq_layer("l", lin, x.T @ x / 16, LCQConfig(rotation="random"))
    with torch.no_grad():
        q.A.add_(0.05 * torch.randn(4, 4))  # A, b after training are not the initial ones
        q.b.add_(0.05 * torch.randn(4))
        want = q(x)
        p = PackedLCQLinear.from_lcq(q)
        torch.testing.assert_close(p(x), want, rtol=2e-3, atol=2e-3 * float(want.abs().max()))
        # the kernels' algebra (codes @ x' + c, no decoded weight) matches the decoded product
        xt = hadamard_transform(x * p.SU.float(), p.plan_in)
        torch.testing.assert_close(reference_lcq_matmul(xt, p.codes, p.A, p.b), xt @ p.dequantized_rotated().T, rtol=1e-4, atol=1e-4)


def test_bits_per_weight_4096_layer() -> None:
    layer = PackedLCQLinear(4096, 4096, bias=False, device="meta")  # no memory: sizes only
    stored = sum(t.numel() * t.element_size() * 8 for t in layer.packed_tensors().values())
    assert bits_per_weight(layer) == pytest.approx(stored / 4096**2)
    assert 2.0 < bits_per_weight(layer) <= 2.02
    assert bits_per_weight((4096, 4096)) == bits_per_weight(layer)


def test_export_load_round_trip_and_bad_files(tmp_path) -> None:
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8, bias=False))
    calib = [torch.randn(8, 16) for _ in range(2)]
    quantize_model(model, calib, "lcqat", exclude=(), finetune_steps=2, progress=False)
    x = torch.randn(4, 16)
    with torch.no_grad():
        want = model(x)
    folder = export_lcqat(model, tmp_path / "q", {"name": "mlp"})
    config = json.loads((folder / "config.json").read_text())
    assert config["name"] == "mlp" and config["quantization"]["layers"] == ["0", "2"]
    tensors = load_file(folder / "model.safetensors")
    assert tensors["0.codes"].dtype == torch.uint8 and tensors["0.codes"].shape == (32, 4)
    stored_bits = sum(tensors[f"2.{k}"].numel() * tensors[f"2.{k}"].element_size() * 8 for k in ("codes", "A", "b", "SU", "SV"))
    assert bits_per_weight(model[2]) == pytest.approx(stored_bits / (8 * 32))

    def skeleton() -> nn.Module:
        return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8, bias=False))

    loaded = load_lcqat(skeleton(), folder)
    assert isinstance(loaded[0], PackedLCQLinear)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), want, rtol=2e-3, atol=2e-3 * float(want.abs().max()))

    bad = dict(tensors)
    del bad["2.SV"]
    save_file(bad, folder / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"2\.SV is missing"):
        load_lcqat(skeleton(), folder)
    bad = dict(tensors)
    bad["0.codes"] = torch.zeros(32, 5, dtype=torch.uint8)
    save_file(bad, folder / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"0\.codes has shape \(32, 5\)"):
        load_lcqat(skeleton(), folder)


# --------------------------------------------------------------------------- baselines


@pytest.mark.parametrize("group", [64, 128])
def test_baselines_have_four_levels_per_group(group: int) -> None:
    w = torch.randn(8, 256)
    x = torch.randn(512, 256) @ torch.randn(256, 256) / 16
    for codes, scale, lo in (rtn_quantize(w, group), gptq_quantize(w, x.T @ x / 512, group)):
        assert codes.dtype == torch.uint8 and int(codes.max()) <= 3
        w_hat = dequantize_groups(codes, scale, lo).reshape(8, 256 // group, group)
        levels = {len(torch.unique(g)) for g in w_hat.reshape(-1, group)}
        assert max(levels) == 4  # never more than 4; Gaussian groups use all four
        grid = lo[..., None] + scale[..., None] * torch.arange(4.0)  # [m, G, 4]
        assert (w_hat[..., None] - grid[:, :, None, :]).abs().min(-1).values.max() < 1e-5
    # RTN is nearest on its grid: no weight moves by more than half a step
    codes, scale, lo = rtn_quantize(w, group)
    err = (dequantize_groups(codes, scale, lo) - w).reshape(8, -1, group).abs().amax(-1)
    assert (err <= scale / 2 + 1e-6).all()


def test_lsq_qat_layer() -> None:
    lin = nn.Linear(128, 16)
    q = LSQLinear.from_linear(lin, group_size=64)
    w_hat = q.quantized_weight().detach().reshape(16, 2, 64)
    assert max(len(torch.unique(g)) for g in w_hat.reshape(-1, 64)) <= 4
    torch.testing.assert_close(w_hat, dequantize_groups(*rtn_quantize(lin.weight.detach(), 64)).reshape(16, 2, 64), atol=1e-6, rtol=0)
    q(torch.randn(4, 128)).pow(2).sum().backward()
    assert q.weight.grad.abs().sum() > 0 and q.step.grad.abs().sum() > 0 and q.offset.grad.abs().sum() > 0
    assert int(q.codes().max()) <= 3
    model = nn.Sequential(nn.Linear(128, 8), nn.Linear(8, 6))
    assert apply_lsq(model, 64) == ["0"]  # 8 inputs: not a multiple of the group


# --------------------------------------------------------------------------- quantize_model


def test_quantize_model_small_mlp_skips_odd_inputs() -> None:
    model = nn.Sequential(nn.Linear(6, 32), nn.GELU(), nn.Linear(32, 32), nn.GELU(), nn.Linear(32, 4))
    calib = [torch.randn(16, 6) for _ in range(3)]
    x = torch.randn(8, 6)
    with torch.no_grad():
        ref = model(x)
    model, report = quantize_model(model, calib, "lcqat", exclude=(), finetune_steps=5, progress=False)
    assert report.quantized == ["2", "4"]
    assert "0" in report.skipped and "multiple of 4" in report.skipped["0"]
    assert type(model[0]) is nn.Linear and isinstance(model[2], LCQLinear)
    with torch.no_grad():
        assert _rel_mse(model(x), ref) < 0.2


@pytest.mark.parametrize("method", ["lcqat", "rtn", "gptq"])
def test_quantize_model_transformers_qwen2(method: str) -> None:
    fp = _tiny_qwen2()
    calib = [{"input_ids": torch.randint(0, 128, (2, 16))} for _ in range(3)]
    model, report = quantize_model(copy.deepcopy(fp), calib, method, group_size=32, finetune_steps=5, progress=False) if method == "lcqat" else quantize_model(copy.deepcopy(fp), calib, method, group_size=32, progress=False)
    assert len(report.quantized) == 14 and not report.skipped  # 7 linears x 2 blocks
    assert "lm_head" not in report.quantized and type(model.lm_head) is nn.Linear
    assert isinstance(model.model.layers[1].mlp.down_proj, LCQLinear if method == "lcqat" else nn.Module)
    x = torch.randint(0, 128, (2, 16))
    with torch.no_grad():
        ref, out = fp(input_ids=x).logits, model(input_ids=x).logits
    assert torch.isfinite(out).all() and _rel_mse(out, ref) < 1.0
    if method == "lcqat":
        assert all(after <= before for before, after in report.block_mse)
        assert 2.0 < report.bits_per_weight < 2.7  # SU/SV cost more on 64-wide layers


@pytest.mark.slow
def test_quantize_model_resumes_per_block(tmp_path) -> None:
    fp = _tiny_qwen2()
    calib = [{"input_ids": torch.randint(0, 128, (2, 12))} for _ in range(2)]
    first, r1 = quantize_model(copy.deepcopy(fp), calib, "lcqat", state_dir=tmp_path, finetune_steps=3, progress=False)
    assert sorted(p.name for p in tmp_path.glob("block_*.pt")) == ["block_0000.pt", "block_0001.pt"]
    second, r2 = quantize_model(copy.deepcopy(fp), calib, "lcqat", state_dir=tmp_path, finetune_steps=3, progress=False)
    assert r1.resumed_blocks == [] and r2.resumed_blocks == [0, 1]
    x = torch.randint(0, 128, (1, 12))
    with torch.no_grad():
        assert torch.equal(first(input_ids=x).logits, second(input_ids=x).logits)
    with pytest.raises(CheckpointError, match="other settings"):
        quantize_model(copy.deepcopy(fp), calib, "lcqat", state_dir=tmp_path, finetune_steps=4, progress=False)


def test_quantize_our_llm_if_present() -> None:
    llm_mod = pytest.importorskip("cheers.llm")
    from cheers.config import flavour

    cfg = flavour("debug").llm
    fp = llm_mod.LLM(cfg).eval()
    calib = [torch.randint(0, cfg.vocab_size, (2, 8)) for _ in range(2)]
    model, report = quantize_model(copy.deepcopy(fp), calib, "lcqat", finetune_steps=3, progress=False)
    assert report.quantized and all(isinstance(model.get_submodule(n), LCQLinear) for n in report.quantized)
    assert any(".self_attn.q_proj" in n for n in report.quantized)
    with torch.no_grad():
        assert torch.isfinite(model(calib[0])).all()


# --------------------------------------------------------------------------- bad input


def test_bad_inputs_raise_clear_errors() -> None:
    with pytest.raises(InputError, match=r"10x6 .*input size 6 is not a multiple of 4"):
        LCQLinear(6, 10)
    model = nn.Sequential(nn.Linear(6, 8))
    with pytest.raises(InputError, match="layer '0'"):
        apply_lcqat(model)
    assert apply_lcqat(model, skip_incompatible=True) == []
    with pytest.raises(ConfigError, match="unknown quantization method 'awq'"):
        quantize_model(model, None, "awq")
    with pytest.raises(ConfigError, match="unknown LC-QAT option 'stepz'"):
        quantize_model(nn.Sequential(nn.Linear(8, 8)), [torch.randn(2, 8)], "lcqat", exclude=(), stepz=3)
    with pytest.raises(ConfigError, match="hadamard"):
        LCQConfig(hadamard="block64")
    with pytest.raises(InputError, match="needs calibration"):
        quantize_model(nn.Sequential(nn.Linear(64, 8)), None, "gptq", exclude=())
    with pytest.raises(InputError, match="expects inputs of size 8"):
        LCQLinear(8, 4)(torch.randn(2, 12))
    with pytest.raises(InputError, match="0..3"):
        pack_codes(torch.full((2, 4), 4, dtype=torch.uint8))


def test_hessian_collector_counts_rows() -> None:
    lin = nn.Linear(4, 2)
    xs = [torch.randn(3, 5, 4), torch.randn(7, 4)]
    with HessianCollector({"l": lin}) as hc:
        for x in xs:
            lin(x)
    flat = torch.cat([xs[0].reshape(-1, 4), xs[1]])
    torch.testing.assert_close(hc.hessian("l"), flat.T @ flat / 22)


# --------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("rows", [1, 3, 8, 9, 64])
def test_triton_matches_reference(rows: int) -> None:
    from cheers.lcqat.kernels import lcq_matmul

    m, n = 384, 1536
    codes = torch.randint(0, 256, (m, n // 4), dtype=torch.uint8, device="cuda")
    a = torch.randn(4, 4, device="cuda")
    b = torch.randn(4, device="cuda")
    xt = torch.randn(rows, n, device="cuda")
    want = reference_lcq_matmul(xt, codes, a, b)
    got = lcq_matmul(xt, codes, a, b, out_dtype=torch.float32).float()
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-3)
    got16 = lcq_matmul(xt, codes, a, b, out_dtype=torch.bfloat16).float()
    torch.testing.assert_close(got16, want, rtol=3e-2, atol=3e-2 * float(want.abs().max()))


@pytest.mark.gpu
@gpu
def test_packed_layer_cuda_matches_cpu() -> None:
    lin, mix = _structured_layer(96, 128)
    x = _inputs(mix, 32)
    q, _ = lcq_ptq_layer("l", lin, x.T @ x / 32, LCQConfig())
    p = PackedLCQLinear.from_lcq(q)
    with torch.no_grad():
        want = p(x)
        p_cuda = copy.deepcopy(p).cuda()
        for rows in (1, 8, 32):
            torch.testing.assert_close(p_cuda(x[:rows].cuda()).cpu(), want[:rows], rtol=1e-4, atol=1e-4)
            got16 = p_cuda(x[:rows].cuda().bfloat16()).float().cpu()  # half-precision paths
            torch.testing.assert_close(got16, want[:rows], rtol=3e-2, atol=3e-2 * float(want.abs().max()))


def test_to_packed_replaces_every_layer() -> None:
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    apply_lcqat(model)
    x = torch.randn(3, 8)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error")
        want = model(x)
        assert to_packed(model) == ["0", "2"]
        torch.testing.assert_close(model(x), want, rtol=2e-3, atol=2e-3)
