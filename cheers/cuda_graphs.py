"""Static-shape inference steps, replayed as CUDA graphs on a GPU.

At batch 1 a 1.5B model's step is a few hundred small kernels; launching them from Python
costs more than running them. Both inference loops have a step whose shapes never change:

- text-to-image: every sampling step runs the same image block against the same cached
  prompt, so the whole velocity (pixel decoder, SigLIP, LLM block, head, CFG) is one graph
  with ``xt`` and ``t`` as its inputs;
- decoding: one token a step. :class:`StaticKVCache` has a fixed capacity and a write
  position held on the device, and the attention mask covers the whole capacity (slots not
  yet written are masked), so every step has the same shapes too.

On the CPU the same static step runs eagerly (that is how the tests check it against the
dynamic path). Nothing here changes the maths: a replayed step runs the kernels of the eager
one.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from cheers.errors import InputError
from cheers.kv_cache import KVCache
from cheers.llm import LLM


class StaticKVCache(KVCache):
    """A :class:`KVCache` of fixed capacity whose write position lives on the device.

    :meth:`update` writes at ``write_pos`` (a device tensor, so a replayed graph writes at
    the current position) and returns the whole buffers ``[B, Hkv, capacity, Dh]``; the
    caller's mask hides the slots not written yet. :meth:`advance` moves the position.
    """

    def __init__(self, src: KVCache, capacity: int) -> None:
        super().__init__(src.num_layers, max_len=capacity)
        if capacity < src.seq_len:
            raise InputError(f"static KV cache capacity {capacity} < {src.seq_len} cached positions")
        for i in range(src.num_layers):
            k, v = src.layer(i)
            shape = (k.shape[0], k.shape[1], capacity, k.shape[3])
            self._k[i], self._v[i] = k.new_zeros(shape), v.new_zeros(shape)
            self._k[i][:, :, : k.shape[2]] = k
            self._v[i][:, :, : v.shape[2]] = v
            self._len[i] = src.seq_len  # host mirror: only read by checks outside a graph
        self.write_pos = torch.full((1,), src.seq_len, dtype=torch.long, device=self._k[0].device)

    def update(self, i: int, k_new: Tensor, v_new: Tensor) -> tuple[Tensor, Tensor]:
        idx = self.write_pos + torch.arange(k_new.shape[2], device=k_new.device)
        self._k[i].index_copy_(2, idx, k_new)
        self._v[i].index_copy_(2, idx, v_new)
        return self._k[i], self._v[i]

    def advance(self, n: int = 1) -> None:
        if self._len[0] + n > self.max_len:
            raise InputError(f"static KV cache full: capacity {self.max_len}")
        self.write_pos += n
        self._len = [length + n for length in self._len]

    def crop(self, n: int) -> None:
        raise InputError("a static KV cache cannot be cropped")


class GraphedStep:
    """``fn()`` over fixed input buffers, captured into a CUDA graph after one eager warm-up.

    The first call runs ``fn`` eagerly on a side stream (what graph capture needs: cuBLAS and
    cuDNN set up their workspaces there) and returns its result; it then captures ``fn``, and
    later calls replay it. Off CUDA, or with ``enabled=False``, every call runs ``fn``.
    """

    def __init__(self, fn: Callable[[], Tensor], device: torch.device, enabled: bool = True) -> None:
        self.fn = fn
        self.enabled = enabled and device.type == "cuda"
        self.graph: torch.cuda.CUDAGraph | None = None
        self.out: Tensor | None = None

    def __call__(self) -> Tensor:
        if not self.enabled:
            return self.fn()
        if self.graph is not None:
            self.graph.replay()
            return self.out
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            first = self.fn()  # the real first step; capture below runs nothing
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.out = self.fn()
        return first


class StaticDecoder:
    """One-token decoding steps of fixed shape over a prompt's cache (see the module doc).

    ``step(tokens [R]) -> logits [R, V]`` feeds the rows' next tokens at their next positions.
    ``compile=True`` runs the step through ``torch.compile`` (worth it for long generations).
    """

    def __init__(self, llm: LLM, cache: KVCache, doc_ids: Tensor, next_pos: Tensor, max_new_tokens: int,
                 *, graphs: bool = True, compile: bool = False) -> None:
        prompt = doc_ids.shape[1]
        self.llm = llm
        self.cache = StaticKVCache(cache, prompt + max_new_tokens)
        rows, device = doc_ids.shape[0], doc_ids.device
        self.slot_ok = torch.zeros(rows, prompt + max_new_tokens, dtype=torch.bool, device=device)
        self.slot_ok[:, :prompt] = doc_ids >= 0  # left padding stays hidden
        self.tokens = torch.zeros(rows, dtype=torch.long, device=device)
        self.pos = next_pos.clone()
        # compile fuses the ~40 small kernels a layer launches (norms, RoPE, casts); the
        # first step pays for the compilation
        forward = torch.compile(self._forward, dynamic=False) if compile else self._forward
        self._step = GraphedStep(forward, device, enabled=graphs)

    def _forward(self) -> Tensor:
        self.slot_ok.index_fill_(1, self.cache.write_pos, True)
        hidden = self.llm.hidden_states(self.tokens[:, None], position_ids=self.pos[:, None],
                                        mask=self.slot_ok[:, None, None, :], cache=self.cache)
        return self.llm.logits(hidden[:, -1])  # [R, V]

    def step(self, tokens: Tensor) -> Tensor:
        self.tokens.copy_(tokens)
        logits = self._step()
        self.pos += 1
        self.cache.advance(1)
        return logits


class StaticVelocity:
    """``velocity(xt, t)`` of a sampling loop as one fixed-shape step (see the module doc).

    ``fn(xt, t)`` is the eager velocity with ``t`` a 0-dim device tensor; inputs are copied
    into fixed buffers, and the result is a fresh tensor (the graph's output is reused).
    """

    def __init__(self, fn: Callable[[Tensor, Tensor], Tensor], like: Tensor, *, graphs: bool = True) -> None:
        self.fn = fn
        self.xt = torch.zeros_like(like)
        self.t = torch.zeros((), dtype=torch.float32, device=like.device)
        self._step = GraphedStep(lambda: self.fn(self.xt, self.t), like.device, enabled=graphs)

    def __call__(self, xt: Tensor, t: float) -> Tensor:
        self.xt.copy_(xt)
        self.t.fill_(t)
        return self._step().clone()
