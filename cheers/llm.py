"""Our own Qwen2 / Qwen2.5 / Qwen3 decoder, loading Hugging Face checkpoints unchanged.

Submodule names are those of ``transformers``' ``Qwen2ForCausalLM`` / ``Qwen3ForCausalLM``
without the leading ``model.``, so a HF state dict maps over by stripping that prefix
(``cheers.adapters.hf_qwen`` reads and writes HF folders).
Attention goes through :func:`cheers.attention.attend` (SDPA, FlexAttention or flash-attn) and
takes the Cheers mask (causal text, bidirectional image blocks) from ``cheers.attention``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from cheers.attention import Backend, Mask, attend, build_causal_block_mask
from cheers.config import LLMConfig
from cheers.errors import InputError
from cheers.kv_cache import KVCache

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
    ) -> Tensor:
        """Final-norm hidden states ``[B, L, D]``.

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
        for layer in self.layers:
            x = layer(x, cos, sin, mask, cache, backend)
        return self.norm(x)

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
