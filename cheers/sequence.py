"""Sequence building: image blocks, labels, positions, packing; the typed ``Batch``.

A sample becomes one token sequence in which every image occupies N consecutive slots
(N = LLM tokens per image), delimited by ``<im_start>`` / ``<im_end>``. Rows may pack several
samples ("documents"); attention never crosses documents, is causal over text and
bidirectional inside each image block.

Targets are stored already shifted: ``targets[i]`` is the token that position i must predict
(-100: none). Following the released model, the ``<im_start>`` position and every image slot
predict nothing, so "last image token -> <im_end>" is not trained.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import torch

from cheers.config import ModelConfig
from cheers.errors import InputError

IGNORE = -100
# placeholders of the official processor: an understanding image / an image to generate
UND_PLACEHOLDER = -200
GEN_PLACEHOLDER = -300


@dataclass
class Sequence:
    """One sample, unpadded. Lists of equal length L; ``image_index`` counts images within the sample."""

    ids: list[int]
    targets: list[int]
    image_index: list[int]  # -1: text; else which of ``images`` fills the slot
    image_slot: list[int]  # rank of the slot inside its image (raster order); -1 for text
    bidirectional: list[bool]  # slot belongs to an image block with bidirectional attention
    images: list[torch.Tensor] = field(default_factory=list)  # [3, H, W] each, in [0, 1]
    is_gen: list[bool] = field(default_factory=list)  # per image: generation target (flow loss)

    def __len__(self) -> int:
        return len(self.ids)


@dataclass
class Batch:
    """A packed training / inference batch. Shapes: B rows of L tokens, I images."""

    input_ids: torch.Tensor  # [B, L] long; image slots hold the pad id (replaced by image tokens)
    targets: torch.Tensor  # [B, L] long; next-token target per position, -100 = none
    position_ids: torch.Tensor  # [B, L] long; restart at 0 for each packed document
    doc_ids: torch.Tensor  # [B, L] long; document id per token, -1 = padding
    block_ids: torch.Tensor  # [B, L] long; bidirectional image-block id, -1 = causal token
    image_index: torch.Tensor  # [B, L] long; row of ``images`` filling the slot, -1 = text
    image_slot: torch.Tensor  # [B, L] long; slot rank inside its image, -1 = text
    images: torch.Tensor | None = None  # [I, 3, H, W] pixels in [0, 1]
    is_gen: torch.Tensor | None = None  # [I] bool: images that carry a velocity loss
    t: torch.Tensor | None = None  # [I] optional fixed times (default: 1 und, sampled gen)
    noise: torch.Tensor | None = None  # [I, C, G, G] optional fixed x0

    def to(self, device: torch.device | str) -> Batch:
        kw = {f.name: getattr(self, f.name) for f in fields(self)}
        return Batch(**{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in kw.items()})

    @property
    def num_tokens(self) -> int:
        return int((self.doc_ids >= 0).sum())

    @property
    def num_images(self) -> int:
        return 0 if self.images is None else int(self.images.shape[0])


def shift_labels(labels: list[int], ids: list[int], image_index: list[int], im_start: int) -> list[int]:
    """Per-position labels (the token's own id or -100) -> next-token targets.

    targets[i] = labels[i+1], except that the ``<im_start>`` position and image slots get -100
    (the released model's label rewriting), and the last position predicts nothing.
    """
    out = labels[1:] + [IGNORE]
    for i, (tok, img) in enumerate(zip(ids, image_index)):
        if img >= 0 or tok == im_start:
            out[i] = IGNORE
    return [IGNORE if (t is None or t < 0) else t for t in out]


def expand_placeholders(ids: list[int], labels: list[int] | None, cfg: ModelConfig,
                        images: list[torch.Tensor], gen_flags: list[bool] | None = None) -> Sequence:
    """An official-processor sequence (images as -200 / -300 placeholders) -> ``Sequence``.

    Each placeholder becomes ``cfg.tokens_per_image`` bidirectional slots; ``labels`` are the
    official per-position labels (own id or -100), shifted here into targets.
    """
    n = cfg.tokens_per_image
    out_ids, out_labels, index, slot, bidir, is_gen = [], [], [], [], [], []
    labels = labels if labels is not None else [IGNORE] * len(ids)
    k = 0
    for tok, lab in zip(ids, labels):
        if tok in (UND_PLACEHOLDER, GEN_PLACEHOLDER):
            if k >= len(images):
                raise InputError(f"the sequence has more image placeholders than the {len(images)} images given")
            out_ids += [cfg.tokens.pad] * n
            out_labels += [IGNORE] * n
            index += [k] * n
            slot += list(range(n))
            bidir += [True] * n
            is_gen.append(tok == GEN_PLACEHOLDER if gen_flags is None else gen_flags[k])
            k += 1
        else:
            out_ids.append(tok)
            out_labels.append(lab)
            index.append(-1)
            slot.append(-1)
            bidir.append(False)
    if k != len(images):
        raise InputError(f"{len(images)} images given but the sequence has {k} image placeholders")
    targets = shift_labels(out_labels, out_ids, index, cfg.tokens.im_start)
    return Sequence(out_ids, targets, index, slot, bidir, list(images), is_gen)


def prepend_image(seq: Sequence, image: torch.Tensor, n_tokens: int, pad_id: int) -> Sequence:
    """Put an image's N tokens in front of a sequence as causal tokens (the official dummy
    image prefix of text-to-image prompts)."""
    shifted = [i + 1 if i >= 0 else -1 for i in seq.image_index]
    return Sequence(
        ids=[pad_id] * n_tokens + seq.ids,
        targets=[IGNORE] * n_tokens + seq.targets,
        image_index=[0] * n_tokens + shifted,
        image_slot=list(range(n_tokens)) + seq.image_slot,
        bidirectional=[False] * n_tokens + seq.bidirectional,
        images=[image] + seq.images,
        is_gen=[False] + seq.is_gen,
    )


def pack(seqs: list[Sequence], cfg: ModelConfig, *, max_tokens: int | None = None,
         rows: list[list[int]] | None = None) -> Batch:
    """Pack sequences into rows (right-padded) and build a ``Batch``.

    ``rows`` lists, per row, the indices of ``seqs`` to pack into it (default: one per row).
    A sequence longer than ``max_tokens`` (default ``cfg.max_seq_len``) raises ``InputError``.
    """
    limit = max_tokens or cfg.max_seq_len
    rows = rows if rows is not None else [[i] for i in range(len(seqs))]
    for i, s in enumerate(seqs):
        if len(s) > limit:
            raise InputError(f"sequence {i} has {len(s)} tokens, over the maximum of {limit}")
    lengths = [sum(len(seqs[i]) for i in r) for r in rows]
    if max(lengths) > limit:
        raise InputError(f"a packed row has {max(lengths)} tokens, over the maximum of {limit}")
    B, L = len(rows), max(lengths)
    pad = cfg.tokens.pad
    t = {k: torch.full((B, L), v, dtype=torch.long) for k, v in
         [("ids", pad), ("targets", IGNORE), ("pos", 0), ("doc", -1), ("block", -1), ("index", -1), ("slot", -1)]}
    images, is_gen = [], []
    for b, row in enumerate(rows):
        off = 0
        for d, si in enumerate(row):
            s = seqs[si]
            n = len(s)
            sl = slice(off, off + n)
            t["ids"][b, sl] = torch.tensor(s.ids)
            t["targets"][b, sl] = torch.tensor(s.targets)
            t["pos"][b, sl] = torch.arange(n)
            t["doc"][b, sl] = d
            base = len(images)
            idx = torch.tensor(s.image_index)
            t["index"][b, sl] = torch.where(idx >= 0, idx + base, idx)
            t["slot"][b, sl] = torch.tensor(s.image_slot)
            bid = torch.tensor(s.bidirectional)
            t["block"][b, sl] = torch.where(bid & (idx >= 0), idx + base, torch.full_like(idx, -1))
            images += s.images
            is_gen += s.is_gen
            off += n
    return Batch(
        input_ids=t["ids"], targets=t["targets"], position_ids=t["pos"], doc_ids=t["doc"],
        block_ids=t["block"], image_index=t["index"], image_slot=t["slot"],
        images=torch.stack(images) if images else None,
        is_gen=torch.tensor(is_gen, dtype=torch.bool) if images else None,
    )


def greedy_rows(lengths: list[int], budget: int) -> list[list[int]]:
    """First-fit-decreasing packing of sequence lengths into rows of at most ``budget`` tokens."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    rows: list[list[int]] = []
    room: list[int] = []
    for i in order:
        if lengths[i] > budget:
            raise InputError(f"sequence {i} has {lengths[i]} tokens, over the row budget of {budget}")
        for r, free in enumerate(room):
            if lengths[i] <= free:
                rows[r].append(i)
                room[r] -= lengths[i]
                break
        else:
            rows.append([i])
            room.append(budget - lengths[i])
    return [sorted(r) for r in rows]


def null_prompt(ids: list[int], cfg: ModelConfig) -> list[int]:
    """The official CFG null prompt: same length, every token but image delimiters and
    placeholders becomes ``<no_mean>``."""
    keep = {cfg.tokens.im_start, cfg.tokens.im_end, cfg.tokens.image, cfg.tokens.image_gen,
            UND_PLACEHOLDER, GEN_PLACEHOLDER}
    return [tok if tok in keep else cfg.tokens.no_mean for tok in ids]
