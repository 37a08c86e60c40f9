"""Text tokenizer (a Hugging Face ``tokenizer.json``) and the chat layout of prompts.

The same code serves Qwen2.5's tokenizer and the byte-level BPE trained for the shapes world.
Prompts follow the Qwen2 chat template, with images as official placeholders (-200 for an
image to understand); the sequence builder expands them into image blocks.
"""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer

from cheers.config import SpecialTokens
from cheers.errors import CheckpointError, InputError
from cheers.sequence import GEN_PLACEHOLDER, IGNORE, UND_PLACEHOLDER

SPECIAL_STRINGS = {
    "pad": "<|endoftext|>",
    "chat_start": "<|im_start|>",
    "eos": "<|im_end|>",
    "image": "<image>",
    "image_gen": "<image_gen>",
    "im_start": "<im_start>",
    "im_end": "<im_end>",
    "no_mean": "<no_mean>",
}
DEFAULT_SYSTEM = "You are a helpful assistant."
# the files of a Hugging Face tokenizer folder: a checkpoint folder carries them beside its weights
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt")


def copy_tokenizer_files(src: str | Path, dst: str | Path) -> list[str]:
    """Copy the ``TOKENIZER_FILES`` that folder ``src`` holds into ``dst``; returns their names."""
    import shutil

    names = [n for n in TOKENIZER_FILES if (Path(src) / n).is_file()]
    for name in names:
        shutil.copy(Path(src) / name, Path(dst) / name)
    return names


class TextTokenizer:
    """Wraps ``tokenizers.Tokenizer``; ids of special tokens come from its vocabulary."""

    def __init__(self, tokenizer: Tokenizer, source: str = "tokenizer"):
        self.tok = tokenizer
        self.source = source
        missing = [s for s in SPECIAL_STRINGS.values() if tokenizer.token_to_id(s) is None]
        if missing:
            raise CheckpointError(f"{source}: the tokenizer lacks the special tokens {', '.join(missing)}")
        self.special = SpecialTokens(**{k: tokenizer.token_to_id(v) for k, v in SPECIAL_STRINGS.items()})
        self.newline = self.encode("\n")

    @classmethod
    def from_dir(cls, path: str | Path) -> TextTokenizer:
        path = Path(path)
        file = path / "tokenizer.json" if path.is_dir() else path
        if not file.is_file():
            raise CheckpointError(f"no tokenizer.json at {file}")
        try:
            tok = Tokenizer.from_file(str(file))
        except Exception as e:  # the library raises a bare Exception on bad JSON
            raise CheckpointError(f"{file}: not a readable tokenizer.json ({e})") from e
        return cls(tok, source=str(file))

    def save(self, path: str | Path) -> None:
        Path(path).mkdir(parents=True, exist_ok=True)
        self.tok.save(str(Path(path) / "tokenizer.json"))

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int], skip_special: bool = True) -> str:
        return self.tok.decode(ids, skip_special_tokens=skip_special)

    # ------------------------------------------------------------------ chat layout

    def turn(self, role: str, content: list[int]) -> list[int]:
        """``<|im_start|>{role}\\n{content}<|im_end|>\\n``."""
        sp = self.special
        return [sp.chat_start] + self.encode(role) + self.newline + content + [sp.eos] + self.newline

    def image_block(self, placeholder: int) -> list[int]:
        return [self.special.im_start, placeholder, self.special.im_end]

    def system(self, system: str | None = DEFAULT_SYSTEM) -> list[int]:
        return self.turn("system", self.encode(system)) if system else []

    def assistant_open(self) -> list[int]:
        return [self.special.chat_start] + self.encode("assistant") + self.newline

    def t2i_prompt(self, prompt: str, system: str | None = DEFAULT_SYSTEM) -> list[int]:
        """Generation prompt: system, user turn, open assistant turn, then ``<im_start>``."""
        if not prompt.strip():
            raise InputError("the prompt is empty")
        return self.system(system) + self.turn("user", self.encode(prompt)) + self.assistant_open() + [
            self.special.im_start]

    def i2t_prompt(self, question: str, n_images: int = 1, system: str | None = DEFAULT_SYSTEM,
                   history: list[tuple[str, str]] | None = None) -> list[int]:
        """Understanding prompt. The images open the first user turn; ``history`` holds earlier
        (question, answer) turns of a chat."""
        # the chat with an empty last answer, less that answer's closing: the assistant turn open
        ids, _ = self.i2t_chat_sample([*(history or []), (question, "")], system, n_images=n_images)
        return ids[: -(1 + len(self.newline))]

    # ------------------------------------------------------------------ training samples

    def labels(self, context: list[int], reply: list[int], policy: str) -> list[int]:
        """Per-position labels of ``context + reply`` (the reply is the assistant turn).

        ``assistant``: only the reply is labelled. ``official`` (the released training
        template): the reply, plus the special tokens and newlines of the system and user
        turns, which keep their own id.
        """
        if policy == "assistant":
            return [IGNORE] * len(context) + list(reply)
        if policy != "official":
            raise InputError(f"unknown label policy {policy!r}; use 'assistant' or 'official'")
        sp = self.special
        keep = {sp.chat_start, sp.eos, sp.im_start, sp.im_end, sp.no_mean, *self.newline}
        return [t if t in keep else IGNORE for t in context] + list(reply)

    def t2i_sample(self, caption: str, system: str | None = DEFAULT_SYSTEM, policy: str = "assistant"
                   ) -> tuple[list[int], list[int]]:
        """(ids, per-position labels) of a generation sample; the image is a -300 placeholder."""
        context = self.system(system) + self.turn("user", self.encode(caption))
        reply = self.assistant_open() + self.image_block(GEN_PLACEHOLDER) + [self.special.eos] + self.newline
        return context + reply, self.labels(context, reply, policy)

    def i2t_sample(self, question: str, answer: str, system: str | None = DEFAULT_SYSTEM,
                   policy: str = "assistant") -> tuple[list[int], list[int]]:
        return self.i2t_chat_sample([(question, answer)], system, policy)

    def i2t_chat_sample(self, turns: list[tuple[str, str]], system: str | None = DEFAULT_SYSTEM,
                        policy: str = "assistant", n_images: int = 1) -> tuple[list[int], list[int]]:
        """(ids, per-position labels) of a chat about ``n_images`` images: (question, answer)
        ``turns``, the images opening the first user turn; every answer is labelled."""
        if not turns:
            raise InputError("a chat sample needs at least one (question, answer) turn")
        ids: list[int] = []
        labels: list[int] = []
        context = self.system(system)
        images = (self.image_block(UND_PLACEHOLDER) + self.newline) * n_images
        for k, (question, answer) in enumerate(turns):
            if not question.strip():
                which = "the question" if len(turns) == 1 else f"question {k + 1} of the chat"
                raise InputError(f"{which} is empty")
            context += self.turn("user", images + self.encode(question))
            images = []
            reply = self.assistant_open() + self.encode(answer) + [self.special.eos] + self.newline
            ids += context + reply
            labels += self.labels(context, reply, policy)
            context = []
        return ids, labels

    def text_sample(self, text: str) -> tuple[list[int], list[int]]:
        ids = self.encode(text) + [self.special.eos]
        return ids, list(ids)


def train_bpe(texts: list[str], vocab_size: int = 512) -> TextTokenizer:
    """Train a byte-level BPE (the type of Qwen's tokenizer) on ``texts``; the special tokens
    take ids 0..7 in the order of ``SPECIAL_STRINGS``."""
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_STRINGS.values()),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    return TextTokenizer(tok, source="trained byte-level BPE")
