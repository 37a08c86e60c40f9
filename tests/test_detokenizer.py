"""Incremental detokenization keeps characters split across tokens whole: on the project's
byte-level BPE, on a Qwen-style tokenizer, in ``Pipeline.stream`` and in the server's chat job."""

from __future__ import annotations

import asyncio

import pytest
import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

from cheers.debug_checkpoint import CORPUS
from cheers.detokenizer import Detokenizer
from cheers.text_tokenizer import train_bpe

# é and ñ are 2 bytes in UTF-8, 中 文 € 3, 😀 🎉 4
TEXT = "café 😀 ok, 中文 señor: 5€ 🎉!"
# Qwen2's pre-tokenizer split (letters, numbers one by one, punctuation, spaces), before ByteLevel
QWEN_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
              r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def byte_alphabet() -> dict[int, str]:
    """GPT-2's byte -> printable character map that byte-level BPE vocabularies are written in."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    out, extra = {}, 0
    for b in range(256):
        if b in printable:
            out[b] = chr(b)
        else:
            out[b] = chr(256 + extra)
            extra += 1
    return out


@pytest.fixture(scope="module")
def project_tokenizer():
    return train_bpe(CORPUS * 4, vocab_size=320)  # as `cheers debug-checkpoint` trains it


@pytest.fixture(scope="module")
def qwen_style():
    """A byte-level BPE laid out as Qwen2's tokenizer.json, whose merges cut characters inside:
    中 as [E4 B8][AD], 文 as [E6][96 87], 😀 as [F0 9F][98 80], 🎉 as [F0 9F 8E][89]."""
    chars = byte_alphabet()
    vocab = {c: i for i, c in enumerate(chars.values())}
    merges = []

    def merge(a: bytes, b: bytes) -> None:
        left, right = "".join(chars[x] for x in a), "".join(chars[x] for x in b)
        merges.append((left, right))
        vocab.setdefault(left + right, len(vocab))

    for a, b in [(b"\xe4", b"\xb8"), (b"\x96", b"\x87"), (b"\xf0", b"\x9f"), (b"\x98", b"\x80"),
                 (b"\xf0\x9f", b"\x8e"), (b"c", b"a"), (b"ca", b"f")]:
        merge(a, b)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    return tok


def one_token_per_byte(tokenizer, text: str) -> list[int]:
    """Ids of ``text`` with every byte its own token: each multi-byte character split."""
    chars = byte_alphabet()
    return [tokenizer.token_to_id(chars[b]) for b in text.encode()]


def pieces(tokenizer, ids: list[int]) -> list[str]:
    detok = Detokenizer(tokenizer)
    out = [detok.push(t) for t in ids]
    return [*out, detok.flush()]


def old_pieces(tokenizer, ids: list[int]) -> list[str]:
    """The append-when-longer decoding the server and ``Pipeline.stream`` used before."""
    out, text = [], ""
    for k in range(1, len(ids) + 1):
        new = tokenizer.decode(ids[:k])
        if len(new) > len(text):
            out.append(new[len(text):])
            text = new
    return out


def test_project_tokenizer_split_characters(project_tokenizer):
    for ids in (project_tokenizer.encode(TEXT), one_token_per_byte(project_tokenizer.tok, TEXT)):
        got = pieces(project_tokenizer, ids)
        assert "".join(got) == TEXT
        assert not any("\ufffd" in p for p in got)
        assert "".join(old_pieces(project_tokenizer, ids)) != TEXT  # what the old decoding did
    per_byte = pieces(project_tokenizer, one_token_per_byte(project_tokenizer.tok, TEXT))
    # a character comes out with its last byte, never before: 😀's 4 tokens give "", "", "", "😀"
    start = len("café ".encode())
    assert per_byte[start:start + 4] == ["", "", "", "😀"]
    assert per_byte[len("caf"):len("caf") + 2] == ["", "é"]


def test_qwen_style_tokenizer_split_characters(qwen_style):
    ids = qwen_style.encode(TEXT).ids
    tokens = [qwen_style.id_to_token(i) for i in ids]
    assert "ä¸" in tokens and "ðŁ" in tokens  # the merges really cut characters
    got = pieces(qwen_style, ids)
    assert "".join(got) == TEXT == qwen_style.decode(ids)
    assert not any("\ufffd" in p for p in got)
    assert "".join(old_pieces(qwen_style, ids)) != TEXT


def test_incomplete_tail_flushes_as_a_full_decode_would(project_tokenizer):
    ids = project_tokenizer.encode("ok ") + one_token_per_byte(project_tokenizer.tok, "😀")[:2]
    detok = Detokenizer(project_tokenizer)
    assert "".join(detok.push(t) for t in ids) == "ok "
    assert detok.flush() == project_tokenizer.decode(ids)[len("ok "):]
    assert detok.flush() == ""


def test_window_stays_short(project_tokenizer):
    """Each token decodes a few recent tokens, not the whole answer."""
    lengths = []

    class Counting:
        def decode(self, ids):
            lengths.append(len(ids))
            return project_tokenizer.decode(ids)

    detok = Detokenizer(Counting())
    text = "a red circle and two blue squares " * 20
    assert "".join(detok.push(t) for t in project_tokenizer.encode(text)) + detok.flush() == text
    assert max(lengths) <= 3


def test_pipeline_stream_keeps_characters_whole(project_tokenizer, tmp_path, monkeypatch):
    """``Pipeline.stream`` (and so ``cheers chat``/``understand``) on tokens that split characters."""
    from cheers.debug_checkpoint import make_debug_checkpoint
    from cheers.pipeline import Pipeline

    make_debug_checkpoint(tmp_path)
    pipe = Pipeline.from_pretrained(tmp_path)
    ids = one_token_per_byte(pipe.text_tokenizer.tok, TEXT)

    def decode_text(*_a, **_kw):
        for t in [*ids, pipe.cfg.tokens.eos]:
            yield torch.tensor([t])

    monkeypatch.setattr(pipe.engine, "decode_text", decode_text)
    got = list(pipe.stream([], "hi", max_new_tokens=len(ids) + 1))
    assert "".join(got) == TEXT and len(got) > 1
    assert not any("\ufffd" in p for p in got)


def test_server_chat_job_keeps_characters_whole(project_tokenizer):
    from cheers.serve.scheduler import ChatJob
    from cheers.serve.validation import ChatRequest

    ids = one_token_per_byte(project_tokenizer.tok, TEXT)
    loop = asyncio.new_event_loop()
    try:
        req = ChatRequest(ids=[1], images=[], prompt_tokens=1, max_tokens=len(ids), temperature=0.0, top_p=1.0,
                          seed=0)
        job = ChatJob(loop, req, project_tokenizer, stop_ids={project_tokenizer.special.eos})
        assert [job.feed(t) for t in ids] == [False] * (len(ids) - 1) + [True]
        loop.run_until_complete(asyncio.sleep(0))
        events = []
        while not job.events.empty():
            events.append(job.events.get_nowait())
    finally:
        loop.close()
    text = [e[1] for e in events if e[0] == "text"]
    assert "".join(text) == TEXT.strip()
    assert not any("\ufffd" in p for p in text)
    assert job.result[:2] == ("done", "length")
