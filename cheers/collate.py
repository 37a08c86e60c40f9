"""Training samples -> packed ``Batch``: tokenisation with the chat layout, CFG prompt drop,
packing to the row budget. The trainer's data pipeline yields ``RawSample``s; this turns a
list of them into one batch."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path

from cheers.config import ModelConfig
from cheers.errors import InputError
from cheers.sequence import (
    IGNORE,
    Batch,
    Sequence,
    expand_placeholders,
    greedy_rows,
    null_prompt,
    pack,
)
from cheers.text_tokenizer import TextTokenizer


def _unit_hash(key: str) -> float:
    """A uniform number in [0, 1) fixed by the sample key (reproducible across restarts)."""
    return int(hashlib.sha1(key.encode()).hexdigest()[:8], 16) / 2**32


def _turns(conversations: list[dict]) -> list[tuple[str, str]]:
    """The (question, answer) pairs of LLaVA-style (``from/value``) or chat-style
    (``role/content``) turns, in order; system turns are skipped, and a user turn without a
    reply ends the chat."""
    pairs, question = [], None
    for t in conversations:
        role, value = t.get("from") or t.get("role"), t.get("value", t.get("content", ""))
        if role in ("human", "user"):
            question = value.replace("<image>", "").strip()
        elif role in ("gpt", "assistant") and question is not None:
            pairs.append((question, value.strip()))
            question = None
    if not pairs:
        raise InputError(f"conversations lack a user/assistant pair: {conversations!r}")
    return pairs


class Collator:
    """Callable ``list[RawSample] -> Batch``."""

    def __init__(self, cfg: ModelConfig, text_tokenizer: TextTokenizer, *, label_policy: str = "assistant",
                 cfg_drop_rate: float | None = None):
        if text_tokenizer.vocab_size > cfg.llm.vocab_size:  # ids past the embedding table
            raise InputError(f"{text_tokenizer.source} has {text_tokenizer.vocab_size} tokens, more than the "
                             f"model's llm.vocab_size={cfg.llm.vocab_size}: use the model's tokenizer or set "
                             f"model.llm.vocab_size >= {text_tokenizer.vocab_size}")
        if text_tokenizer.special != cfg.tokens:
            raise InputError(f"text tokenizer special ids {text_tokenizer.special} differ from model.tokens {cfg.tokens}")
        self.cfg, self.tok = cfg, text_tokenizer
        self.policy = label_policy
        self.drop = cfg.transport.cfg_drop_rate if cfg_drop_rate is None else cfg_drop_rate

    def sequence(self, sample) -> Sequence:
        tok, cfg = self.tok, self.cfg
        if sample.task == "t2i":
            ids, labels = tok.t2i_sample(sample.text, policy=self.policy)
            if _unit_hash(sample.key) < self.drop:
                # classifier-free guidance: the official null prompt (same length, <no_mean>),
                # which trains the image alone
                ids, labels = null_prompt(ids, cfg), [IGNORE] * len(labels)
            return expand_placeholders(ids, labels, cfg, [sample.image], [True])
        if sample.task == "i2t":  # every image opens the first user turn
            images = sample.images
            ids, labels = tok.i2t_chat_sample(_turns(sample.conversations), policy=self.policy,
                                              n_images=len(images))
            return expand_placeholders(ids, labels, cfg, images, [False] * len(images))
        if sample.task == "text":
            ids, labels = tok.text_sample(sample.text)
            return expand_placeholders(ids, labels, cfg, [])
        raise InputError(f"sample {sample.key}: unknown task {sample.task!r}")

    def __call__(self, samples) -> Batch:
        seqs = []
        for s in samples:
            seq = self.sequence(s)
            if len(seq) > self.cfg.max_seq_len:  # truncate text; never cut an image block
                keep = self.cfg.max_seq_len
                if any(i >= 0 for i in seq.image_index[keep:]):
                    raise InputError(f"sample {s.key}: {len(seq)} tokens with an image past max_seq_len")
                seq = Sequence(seq.ids[:keep], seq.targets[:keep], seq.image_index[:keep],
                               seq.image_slot[:keep], seq.bidirectional[:keep], seq.images, seq.is_gen)
            seqs.append(seq)
        rows = greedy_rows([len(s) for s in seqs], self.cfg.max_seq_len)
        return pack(seqs, self.cfg, rows=rows)


def make_collate(cfg: ModelConfig, text_tokenizer_dir: str | Path) -> Callable[[list], Batch]:
    """The trainer's collate function for a model config and a ``tokenizer.json`` folder."""
    if not str(text_tokenizer_dir).strip():
        raise InputError("data.text_tokenizer_dir is empty: set it to the folder of the model's tokenizer.json "
                         "(for the shapes world: python -m cheers.shapes.dataset --out DIR writes DIR/tokenizer)")
    return Collator(cfg, TextTokenizer.from_dir(text_tokenizer_dir))
