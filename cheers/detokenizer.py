"""Incremental detokenization: token ids in one at a time, finished text out.

A byte-level tokenizer (Qwen's, the shapes world's BPE) can split one UTF-8 character across
tokens; decoding after each token then ends in U+FFFD until the rest of the character arrives.
:class:`Detokenizer` holds such an incomplete tail back and emits it once it decodes cleanly, so
the pieces it emits join to the text of all the tokens. It decodes a short window of recent
tokens (from the last point where the text was complete), not the whole answer, so each token
costs the same however long the answer grows.
"""

from __future__ import annotations

from typing import Protocol

REPLACEMENT = "\ufffd"


class Decoder(Protocol):
    def decode(self, ids: list[int]) -> str: ...


class Detokenizer:
    """``push(token)`` -> the text that token completes (often ``""``); ``flush()`` -> what is
    still held back at the end (an incomplete character decodes to U+FFFD there, as a full
    decode would give it)."""

    def __init__(self, tokenizer: Decoder):
        self.tokenizer = tokenizer
        self.tokens: list[int] = []
        self.prefix = 0  # the window's first token: the text of tokens[:prefix] is complete and emitted
        self.read = 0  # tokens[:read] are emitted

    def push(self, token: int) -> str:
        self.tokens.append(token)
        done = self.tokenizer.decode(self.tokens[self.prefix:self.read])
        text = self.tokenizer.decode(self.tokens[self.prefix:])
        # a trailing U+FFFD is a character whose remaining bytes have not arrived yet
        if len(text) <= len(done) or text.endswith(REPLACEMENT):
            return ""
        self.prefix, self.read = self.read, len(self.tokens)
        return text[len(done):]

    def flush(self) -> str:
        """The held-back tail, once no more tokens will come."""
        done = self.tokenizer.decode(self.tokens[self.prefix:self.read])
        text = self.tokenizer.decode(self.tokens[self.prefix:])
        self.prefix = self.read = len(self.tokens)
        return text[len(done):] if len(text) > len(done) else ""
