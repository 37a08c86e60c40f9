"""Batched text decoding: rows share one KV cache and join or leave between steps.

``Engine.decode_text`` runs its eager steps through a ``DecodeBatch`` whose rows all join at
once; the server keeps one open (``Engine.decode_batch``) that requests join and leave
(continuous batching).

Every row is left-padded to the cache's width (doc id -1 on padding), so one masked forward
advances all rows by a token. A row joining is prefilled on its own batch and its cache is
padded and stacked onto the running one; a row leaving is dropped from the cache, and columns
that have become padding in every row are cut off. Each row keeps its own RoPE positions,
sampling settings and random generator, so its tokens are those of a solo
``Engine.decode_text`` run.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from cheers.attention import build_dense_mask
from cheers.errors import InputError
from cheers.kv_cache import KVCache


def pick_token(logits: torch.Tensor, temperature: float, top_p: float,
               generator: torch.Generator | None = None) -> torch.Tensor:
    """logits [R, V] -> token ids [R]: argmax at temperature 0, else top-p sampling."""
    if temperature <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(-1, descending=True)
        keep = sorted_p.cumsum(-1) - sorted_p < top_p  # always keeps the most likely token
        sorted_p = sorted_p * keep
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@dataclass
class RowSampling:
    """How one row picks its tokens: greedy at ``temperature == 0``, else top-p with its own
    generator (seeded like ``Pipeline.stream``'s, so a sampled answer is reproducible)."""

    temperature: float = 0.0
    top_p: float = 1.0
    generator: torch.Generator | None = None


def _rebuild(cache: KVCache, fn) -> KVCache:
    """A new cache whose layer ``i`` holds ``fn(k)``, ``fn(v)`` of this one's valid positions."""
    out = KVCache(cache.num_layers, max_len=cache.max_len)
    for i in range(cache.num_layers):
        k, v = cache.layer(i)
        out.update(i, fn(k), fn(v))
    return out


def _left_pad(cache: KVCache, doc: torch.Tensor, width: int) -> tuple[KVCache, torch.Tensor]:
    """Pad a cache ``[R, H, L, Dh]`` and its doc ids ``[R, L]`` on the left to ``width`` positions."""
    extra = width - doc.shape[1]
    if extra == 0:
        return cache, doc
    cache = _rebuild(cache, lambda t: F.pad(t, (0, 0, extra, 0)))
    return cache, F.pad(doc, (extra, 0), value=-1)


class DecodeBatch:
    """The rows decoding now. Each row's next-token logits are ready between steps.

    Use: ``join`` new prompts, ``pick`` the next token of every row, ``drop`` the rows that
    finished, then ``advance`` the others by the tokens they picked; repeat.
    """

    def __init__(self, engine):
        self.engine = engine  # a ``cheers.engine.Engine``: its ``prefill`` and its model's LLM
        self.cache: KVCache | None = None
        self.doc: torch.Tensor | None = None  # [R, L]: 0 on tokens, -1 on left padding
        self.pos: torch.Tensor | None = None  # [R]: RoPE position of each row's next token
        self.logits: torch.Tensor | None = None  # [R, V]: each row's next-token logits
        self.sampling: list[RowSampling] = []

    def __len__(self) -> int:
        return len(self.sampling)

    @property
    def width(self) -> int:
        """Positions the cache holds (the longest row, padding included)."""
        return 0 if self.doc is None else self.doc.shape[1]

    @torch.no_grad()
    def join(self, rows: list[list[int]], images: list[list[torch.Tensor]],
             sampling: list[RowSampling]) -> list[int]:
        """Prefill ``rows`` (token ids with -200 image placeholders, ``images[r]`` [3, H, W] in
        [0, 1]) and add them at the end of the batch. Returns each new row's prompt length."""
        if not (len(rows) == len(images) == len(sampling)) or not rows:
            raise InputError(f"join needs as many rows, image lists and samplings, got "
                             f"{len(rows)}, {len(images)}, {len(sampling)}")
        prefix = self.engine.prefill(rows, images)
        logits = self.engine.model.llm.logits(prefix.last_hidden)  # [R, V]
        lengths = [int(n) for n in prefix.next_pos]
        if self.cache is None:
            self.cache, self.doc, self.pos, self.logits = prefix.cache, prefix.doc_ids, prefix.next_pos, logits
        else:
            width = max(self.width, prefix.length)
            old_cache, old_doc = _left_pad(self.cache, self.doc, width)
            new_cache, new_doc = _left_pad(prefix.cache, prefix.doc_ids, width)
            self.cache = KVCache.cat([old_cache, new_cache])
            self.doc = torch.cat([old_doc, new_doc])
            self.pos = torch.cat([self.pos, prefix.next_pos])
            self.logits = torch.cat([self.logits, logits])
        self.sampling += sampling
        return lengths

    def pick(self) -> list[int]:
        """The next token of every row, from its logits and sampling settings."""
        if self.logits is None:
            return []
        greedy = self.logits.argmax(-1).tolist()
        out = []
        for r, s in enumerate(self.sampling):
            if s.temperature <= 0:
                out.append(int(greedy[r]))
            else:
                out.append(int(pick_token(self.logits[r:r + 1], s.temperature, s.top_p, s.generator)[0]))
        return out

    def drop(self, rows: list[int]) -> None:
        """Remove ``rows`` (indices into the batch) and the columns no remaining row uses."""
        if not rows:
            return
        gone = set(rows)
        keep = [r for r in range(len(self)) if r not in gone]
        if not keep:
            self.cache = self.doc = self.pos = self.logits = None
            self.sampling = []
            return
        index = torch.tensor(keep, device=self.doc.device)
        doc = self.doc.index_select(0, index)
        used = (doc >= 0).any(0).nonzero()
        start = int(used[0]) if len(used) else 0  # leading columns that are padding in every row
        self.cache = _rebuild(self.cache, lambda t: t.index_select(0, index)[:, :, start:])
        self.doc = doc[:, start:]
        self.pos = self.pos.index_select(0, index)
        self.logits = self.logits.index_select(0, index)
        self.sampling = [self.sampling[r] for r in keep]

    @torch.no_grad()
    def advance(self, tokens: list[int] | torch.Tensor) -> None:
        """Feed every row its picked token (ids, or ``[R]`` long) in one forward -> new logits."""
        if len(tokens) != len(self):
            raise InputError(f"advance got {len(tokens)} tokens for a batch of {len(self)} rows")
        if not len(tokens):
            return
        llm = self.engine.model.llm
        ids = torch.as_tensor(tokens, device=self.doc.device)[:, None]  # [R, 1]
        self.doc = torch.cat([self.doc, torch.zeros_like(self.doc[:, :1])], 1)
        hidden = llm.hidden_states(ids, position_ids=self.pos[:, None],
                                   mask=build_dense_mask(self.doc, None, q_len=1), cache=self.cache)
        self.pos = self.pos + 1
        self.logits = llm.logits(hidden[:, -1])
