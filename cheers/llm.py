"""Our own Qwen2 / Qwen2.5 / Qwen3 decoder, loading Hugging Face checkpoints unchanged.

Submodule names are those of ``transformers``' ``Qwen2ForCausalLM`` / ``Qwen3ForCausalLM``
without the leading ``model.``, so a HF state dict maps over by stripping that prefix.
Attention goes through :func:`cheers.attention.attend` (SDPA, FlexAttention or flash-attn) and
takes the Cheers mask (causal text, bidirectional image blocks) from ``cheers.attention``.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from cheers.attention import Backend, Mask, attend, build_causal_block_mask
from cheers.config import LLMConfig
from cheers.errors import CheckpointError, ConfigError, InputError
from cheers.hf_io import load_checked, read_json, read_state_dict, write_json, write_state_dict

# --------------------------------------------------------------------------- KV cache


class KVCache:
    """Per-layer keys and values ``[B, Hkv, S, Dh]`` for incremental decoding.

    Buffers are allocated on the first write with room for ``max_len`` positions (or what is
    needed, doubling when it runs out), so appending a step writes in place instead of
    concatenating. The cache is an inference tool: writes are in place, so do not backprop
    through it.
    """

    def __init__(self, num_layers: int, *, max_len: int | None = None) -> None:
        self.num_layers = num_layers
        self.max_len = max_len
        self._k: list[Tensor | None] = [None] * num_layers
        self._v: list[Tensor | None] = [None] * num_layers
        self._len = [0] * num_layers  # valid positions per layer

    @property
    def seq_len(self) -> int:
        """Positions held (layer 0 is written first in a forward, so it leads)."""
        return self._len[0]

    @property
    def batch_size(self) -> int | None:
        return None if self._k[0] is None else self._k[0].shape[0]

    def layer(self, i: int) -> tuple[Tensor, Tensor]:
        """Valid keys and values of layer ``i``: two ``[B, Hkv, S, Dh]`` views."""
        k, v = self._k[i], self._v[i]
        if k is None or v is None:
            raise InputError(f"KV cache layer {i} is empty")
        return k[:, :, : self._len[i]], v[:, :, : self._len[i]]

    def update(self, i: int, k_new: Tensor, v_new: Tensor) -> tuple[Tensor, Tensor]:
        """Append ``[B, Hkv, L, Dh]`` to layer ``i``; return everything held for that layer."""
        n, add = self._len[i], k_new.shape[2]
        k, v = self._k[i], self._v[i]
        if k is not None and k.shape[0] != k_new.shape[0]:
            raise InputError(
                f"KV cache holds batch {k.shape[0]}, got {k_new.shape[0]}; use "
                "repeat_interleave / index_select to change the cache's batch first"
            )
        if k is None or v is None or n + add > k.shape[2]:
            need = n + add
            cap = max(need, self.max_len or 0, 2 * (k.shape[2] if k is not None else 0))
            shape = (*k_new.shape[:2], cap, k_new.shape[3])
            k_big = k_new.new_empty(shape)
            v_big = v_new.new_empty(shape)
            if k is not None and v is not None and n:
                k_big[:, :, :n] = k[:, :, :n]
                v_big[:, :, :n] = v[:, :, :n]
            self._k[i], self._v[i] = k, v = k_big, v_big
        k[:, :, n : n + add] = k_new
        v[:, :, n : n + add] = v_new
        self._len[i] = n + add
        return k[:, :, : n + add], v[:, :, : n + add]

    def first_rows(self, n: int) -> KVCache:
        """A cache of this one's first ``n`` rows over the same buffers (views, no copy).

        What it appends is written into those buffers past this cache's own lengths, which
        stay as they were: the positions this cache holds are not touched.
        """
        if self._k[0] is None or not 0 < n <= self._k[0].shape[0]:
            raise InputError(f"first_rows({n}) of a KV cache holding batch {self.batch_size}")
        view = KVCache(self.num_layers, max_len=self.max_len)
        view._k = [None if k is None else k[:n] for k in self._k]
        view._v = [None if v is None else v[:n] for v in self._v]
        view._len = list(self._len)
        return view

    def crop(self, n: int) -> None:
        """Forget every position from ``n`` on (keeps the buffers for reuse)."""
        if n < 0:
            raise InputError(f"KV cache crop length must be >= 0, got {n}")
        self._len = [min(length, n) for length in self._len]

    def _map(self, fn: Callable[[Tensor], Tensor]) -> KVCache:
        out = KVCache(self.num_layers, max_len=self.max_len)
        for i in range(self.num_layers):
            if self._k[i] is not None:
                k, v = self.layer(i)
                out._k[i], out._v[i] = fn(k), fn(v)
                out._len[i] = self._len[i]
        return out

    def repeat_interleave(self, repeats: int) -> KVCache:
        """A new cache with every batch row repeated ``repeats`` times (row order 0,0,1,1,...)."""
        return self._map(lambda t: t.repeat_interleave(repeats, dim=0))

    def index_select(self, index: Tensor | list[int]) -> KVCache:
        """A new cache holding the batch rows ``index`` (in that order)."""
        return self._map(lambda t: t.index_select(0, torch.as_tensor(index, device=t.device)))

    def clone(self) -> KVCache:
        return self._map(lambda t: t.clone())

    @staticmethod
    def cat(caches: list[KVCache]) -> KVCache:
        """Stack caches of equal length along the batch (e.g. conditional + null prompt)."""
        lens = {c.seq_len for c in caches}
        if len(lens) != 1:
            raise InputError(f"cannot concatenate KV caches of different lengths {sorted(lens)}")
        first = caches[0]
        out = KVCache(first.num_layers, max_len=first.max_len)
        for i in range(first.num_layers):
            if first._k[i] is not None:
                ks, vs = zip(*(c.layer(i) for c in caches), strict=True)
                out._k[i], out._v[i] = torch.cat(ks), torch.cat(vs)
                out._len[i] = first._len[i]
        return out


# --------------------------------------------------------------------------- building blocks


class RMSNorm(nn.Module):
    """``x / rms(x) * weight``, normalised in fp32 then cast back to the input dtype."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        # Cast before the weight, as Qwen's reference does, so bf16 outputs match it bit for bit.
        return self.weight * x32.to(dtype)


def rope_cos_sin(position_ids: Tensor, head_dim: int, theta: float) -> tuple[Tensor, Tensor]:
    """Rotary tables in fp32 for rotate-half RoPE.

    Args:
        position_ids: ``[B, L]`` integer positions.
    Returns:
        cos, sin: ``[B, 1, L, Dh]`` fp32 (the 1 broadcasts over heads).
    """
    device = position_ids.device
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=device).float() / head_dim)
    freqs = position_ids.float()[..., None] * inv_freq  # [B, L, Dh/2]
    angles = torch.cat([freqs, freqs], dim=-1)  # [B, L, Dh]: both halves share a frequency
    return angles.cos()[:, None], angles.sin()[:, None]


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate ``x`` ``[B, H, L, Dh]`` by the tables; the product is taken in fp32."""
    x32 = x.float()
    x1, x2 = x32.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)  # rotate_half
    return (x32 * cos + rotated * sin).to(x.dtype)


class Attention(nn.Module):
    """Grouped-query self-attention with RoPE (and Qwen3's per-head q/k RMSNorm)."""

    def __init__(self, cfg: LLMConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv = cfg.num_attention_heads, cfg.num_key_value_heads
        self.head_dim = cfg.head_dim
        d, hd = cfg.hidden_size, cfg.head_dim
        self.q_proj = nn.Linear(d, self.n_heads * hd, bias=cfg.attention_bias)
        self.k_proj = nn.Linear(d, self.n_kv * hd, bias=cfg.attention_bias)
        self.v_proj = nn.Linear(d, self.n_kv * hd, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(self.n_heads * hd, d, bias=False)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(hd, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(hd, cfg.rms_norm_eps)
        self.qk_norm = cfg.qk_norm

    def forward(
        self,
        x: Tensor,
        cos: Tensor,
        sin: Tensor,
        mask: Mask,
        cache: KVCache | None,
        backend: Backend,
    ) -> Tensor:
        """``x`` ``[B, L, D]`` -> ``[B, L, D]``."""
        q = rearrange(self.q_proj(x), "b l (h d) -> b h l d", d=self.head_dim)  # [B, Hq, L, Dh]
        k = rearrange(self.k_proj(x), "b l (h d) -> b h l d", d=self.head_dim)  # [B, Hkv, L, Dh]
        v = rearrange(self.v_proj(x), "b l (h d) -> b h l d", d=self.head_dim)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)  # [B, Hkv, past + L, Dh]
        out = attend(q, k, v, mask, backend)  # [B, Hq, L, Dh]
        return self.o_proj(rearrange(out, "b h l d -> b l (h d)"))


class MLP(nn.Module):
    """SwiGLU: ``down(silu(gate(x)) * up(x))``."""

    def __init__(self, cfg: LLMConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    """Pre-norm block: ``x + attn(norm(x))``, then ``x + mlp(norm(x))``."""

    def __init__(self, cfg: LLMConfig, layer_idx: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, layer_idx)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(
        self, x: Tensor, cos: Tensor, sin: Tensor, mask: Mask, cache: KVCache | None, backend: Backend
    ) -> Tensor:
        """``[B, L, D]`` -> ``[B, L, D]``."""
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, backend)
        return x + self.mlp(self.post_attention_layernorm(x))


# --------------------------------------------------------------------------- the model


class LLM(nn.Module):
    """Qwen2 / Qwen2.5 / Qwen3 decoder with an LM head.

    Build on the meta device for big models: ``with torch.device("meta"): llm = LLM(cfg)``, then
    ``llm.to_empty(device=...)`` and ``llm.init_weights()`` (or load a checkpoint).
    """

    def __init__(self, cfg: LLMConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.tie_weights()

    def tie_weights(self) -> None:
        """Share ``lm_head.weight`` with ``embed_tokens.weight`` when the config says so."""
        if self.cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    @torch.no_grad()
    def init_weights(self, std: float = 0.02) -> None:
        """Matrices and embeddings ~ N(0, std), biases 0, norm weights 1; re-tie the head.

        ``to_empty`` gives tied parameters separate storage, hence the re-tie.
        """
        self.tie_weights()
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0.0, std)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Embedding):
                nn.init.normal_(m.weight, 0.0, std)
            elif isinstance(m, RMSNorm):
                nn.init.ones_(m.weight)

    def new_cache(self, max_len: int | None = None) -> KVCache:
        """An empty :class:`KVCache` for this model."""
        return KVCache(self.cfg.num_hidden_layers, max_len=max_len)

    def hidden_states(
        self,
        input_ids: Tensor | None = None,
        *,
        inputs_embeds: Tensor | None = None,
        position_ids: Tensor | None = None,
        mask: Mask = None,
        cache: KVCache | None = None,
        backend: Backend = "sdpa",
        capture_layer: int | None = None,
    ) -> Tensor | tuple[Tensor, Tensor]:
        """Final-norm hidden states ``[B, L, D]``; with ``capture_layer`` k, also the states
        after the first k layers (before any norm): ``(final, after_k)``.

        Args:
            input_ids: ``[B, L]`` token ids, or
            inputs_embeds: ``[B, L, D]`` embeddings (exactly one of the two).
            position_ids: ``[B, L]`` or ``[L]`` RoPE positions; default ``past .. past + L - 1``.
            mask: None (causal), a bool ``[B, 1, L, past + L]`` mask from
                ``cheers.attention.build_dense_mask`` or a ``BlockMask`` (backend ``"flex"``).
            cache: a :class:`KVCache`; the new keys and values are appended to it in place.
            backend: ``"sdpa"``, ``"flex"`` or ``"flash"``.
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise InputError("pass exactly one of input_ids and inputs_embeds")
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds  # [B, L, D]
        if x.dim() != 3 or x.shape[-1] != self.cfg.hidden_size:
            raise InputError(
                f"inputs must be [B, L] ids or [B, L, {self.cfg.hidden_size}] embeddings, "
                f"got shape {tuple(x.shape)}"
            )
        bsz, length = x.shape[:2]
        past = cache.seq_len if cache is not None else 0
        limit = self.cfg.max_position_embeddings
        if past + length > limit:
            raise InputError(
                f"sequence length {past + length} ({past} cached + {length} new) exceeds "
                f"max_position_embeddings={limit}"
            )
        if position_ids is None:
            position_ids = torch.arange(past, past + length, device=x.device)
        if position_ids.dim() == 1:
            position_ids = position_ids[None].expand(bsz, -1)
        if position_ids.shape != (bsz, length):
            raise InputError(
                f"position_ids shape {tuple(position_ids.shape)} != inputs [B, L] = {[bsz, length]}"
            )
        cos, sin = rope_cos_sin(position_ids, self.cfg.head_dim, self.cfg.rope_theta)
        if backend == "flex" and mask is None:  # build once here rather than in every layer
            mask = build_causal_block_mask(length, past + length, x.device)
        if capture_layer is not None and not 1 <= capture_layer <= len(self.layers):
            raise InputError(f"capture_layer={capture_layer}: the LLM has layers 1..{len(self.layers)}")
        captured = None
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, mask, cache, backend)
            if i + 1 == capture_layer:
                captured = x
        out = self.norm(x)
        return out if captured is None else (out, captured)

    def logits(self, hidden: Tensor) -> Tensor:
        """``[B, L, D]`` hidden states -> ``[B, L, V]`` logits."""
        return self.lm_head(hidden)

    def forward(
        self,
        input_ids: Tensor | None = None,
        *,
        inputs_embeds: Tensor | None = None,
        position_ids: Tensor | None = None,
        mask: Mask = None,
        cache: KVCache | None = None,
        backend: Backend = "sdpa",
    ) -> Tensor:
        """Logits ``[B, L, V]``; arguments as in :meth:`hidden_states`."""
        hidden = self.hidden_states(
            input_ids,
            inputs_embeds=inputs_embeds,
            position_ids=position_ids,
            mask=mask,
            cache=cache,
            backend=backend,
        )
        return self.logits(hidden)

    # ----------------------------------------------------------------------- HF folders

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        *,
        dtype: torch.dtype | None = None,
        device: str | torch.device = "cpu",
        strict: bool = True,
    ) -> LLM:
        """Load a HF Qwen2 / Qwen2.5 / Qwen3 folder (``config.json`` + safetensors, sharded or not).

        ``dtype=None`` keeps the checkpoint's floating dtype. With ``strict=False`` tensors
        that do not fit are reported in a warning and the rest keeps its fresh initialisation.
        """
        path = Path(path)
        cfg = llm_config_from_hf(read_json(path / "config.json"), source=str(path / "config.json"))
        state = read_state_dict(path)
        state = hf_to_llm_state_dict(state, cfg, source=str(path))
        if dtype is None:
            dtype = next((t.dtype for t in state.values() if t.is_floating_point()), torch.float32)
        with torch.device("meta"):
            model = cls(cfg).to(dtype)  # free on meta; to_empty then allocates in that dtype
        model.to_empty(device=device)
        if not strict:  # tensors missing from the file must still hold sane values
            model.init_weights()
        model.tie_weights()
        report = load_checked(model, state, source=str(path), strict=strict)
        if not report.ok:
            warnings.warn(report.describe("LLM"), stacklevel=2)
        return model

    def save_pretrained(self, path: str | Path, *, max_shard_bytes: int | None = None) -> None:
        """Write ``config.json`` and safetensors in the HF layout (``transformers`` loads it)."""
        path = Path(path)
        dtype = self.embed_tokens.weight.dtype
        state = {}
        for name, t in self.state_dict().items():
            if name == "lm_head.weight":
                if self.cfg.tie_word_embeddings:
                    continue  # HF stores a tied head once, as the embedding
                state[name] = t
            else:
                state["model." + name] = t
        write_state_dict(state, path, max_shard_bytes=max_shard_bytes)
        write_json(hf_config_from_llm(self.cfg, dtype=dtype), path / "config.json")


# --------------------------------------------------------------------------- HF conversion


def _rope_theta(data: dict[str, Any], source: str) -> float:
    """RoPE base from a HF config (transformers 5 nests it in ``rope_parameters``)."""
    params = data.get("rope_parameters") or data.get("rope_scaling") or {}
    if not isinstance(params, dict):
        raise CheckpointError(f"{source}: rope_parameters must be an object, got {params!r}")
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type != "default":
        raise CheckpointError(
            f"{source}: rope_type {rope_type!r} is not supported (only 'default' RoPE)"
        )
    theta = params.get("rope_theta", data.get("rope_theta", 10000.0))
    return float(theta)


def llm_config_from_hf(data: dict[str, Any], *, source: str = "config.json") -> LLMConfig:
    """An :class:`LLMConfig` from a HF ``config.json`` dict (model_type ``qwen2`` or ``qwen3``)."""
    model_type = data.get("model_type")
    if model_type not in ("qwen2", "qwen3"):
        raise CheckpointError(
            f"{source}: model_type {model_type!r} is not supported (expected 'qwen2' or 'qwen3')"
        )
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads"):
        if key not in data:
            raise CheckpointError(f"{source}: required key {key!r} is missing")
    if data.get("use_sliding_window"):
        raise CheckpointError(f"{source}: use_sliding_window=true is not supported")
    act = data.get("hidden_act", "silu")
    if act != "silu":
        raise CheckpointError(f"{source}: hidden_act {act!r} is not supported (expected 'silu')")
    qwen3 = model_type == "qwen3"
    if qwen3 and data.get("attention_bias", False):
        # Qwen3 puts that bias on o_proj too, which our o_proj does not have.
        raise CheckpointError(f"{source}: qwen3 with attention_bias=true is not supported")
    try:
        return LLMConfig(
            vocab_size=data["vocab_size"],
            hidden_size=data["hidden_size"],
            intermediate_size=data["intermediate_size"],
            num_hidden_layers=data["num_hidden_layers"],
            num_attention_heads=data["num_attention_heads"],
            num_key_value_heads=data.get("num_key_value_heads") or data["num_attention_heads"],
            head_dim=data.get("head_dim", 128 if qwen3 else None),
            rms_norm_eps=float(data.get("rms_norm_eps", 1e-6)),
            rope_theta=_rope_theta(data, source),
            max_position_embeddings=data.get("max_position_embeddings", 32768),
            tie_word_embeddings=bool(data.get("tie_word_embeddings", False)),
            attention_bias=not qwen3,
            qk_norm=qwen3,
        )
    except ConfigError as e:
        raise CheckpointError(f"{source}: {e}") from e


def hf_config_from_llm(cfg: LLMConfig, *, dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """The HF ``config.json`` dict for ``cfg`` (qwen3 when it has q/k norm, else qwen2)."""
    if cfg.qk_norm:
        if cfg.attention_bias:
            raise ConfigError("q/k norm with attention_bias has no HF equivalent (qwen3 biases o_proj)")
        model_type, arch = "qwen3", "Qwen3ForCausalLM"
    else:
        if not cfg.attention_bias:
            raise ConfigError("attention_bias=false without qk_norm has no HF qwen2/qwen3 equivalent")
        model_type, arch = "qwen2", "Qwen2ForCausalLM"
    out: dict[str, Any] = {
        "architectures": [arch],
        "model_type": model_type,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_hidden_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_key_value_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_position_embeddings,
        "rms_norm_eps": cfg.rms_norm_eps,
        # both spellings: transformers 5 reads rope_parameters, 4.x reads rope_theta
        "rope_theta": cfg.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "use_sliding_window": False,
        "dtype": str(dtype).removeprefix("torch."),
    }
    if model_type == "qwen3":
        out["attention_bias"] = False
    return out


def hf_to_llm_state_dict(
    state: dict[str, Tensor], cfg: LLMConfig, *, source: str
) -> dict[str, Tensor]:
    """Map HF names (``model.layers.0...``, ``lm_head.weight``) to ours.

    Old checkpoints' ``rotary_emb.inv_freq`` buffers are dropped (we compute RoPE). A tied
    model takes its head from the embedding, so a stored ``lm_head.weight`` is dropped; it is
    only checked to agree.
    """
    out: dict[str, Tensor] = {}
    for name, t in state.items():
        if name.endswith("rotary_emb.inv_freq"):
            continue
        out[name.removeprefix("model.")] = t
    head = out.get("lm_head.weight")
    if cfg.tie_word_embeddings and head is not None:
        emb = out.get("embed_tokens.weight")
        if emb is not None and (emb.shape != head.shape or not torch.equal(emb, head)):
            warnings.warn(
                f"{source}: tie_word_embeddings is true but lm_head.weight differs from "
                "embed_tokens.weight; using embed_tokens.weight for both",
                stacklevel=3,
            )
        del out["lm_head.weight"]
    return out
