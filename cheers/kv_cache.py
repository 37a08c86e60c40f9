"""The key/value cache of incremental decoding: per-layer buffers that grow in place."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from cheers.errors import InputError


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
