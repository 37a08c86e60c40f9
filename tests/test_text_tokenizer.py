"""Prompts are laid out exactly as the official processor and training template lay them out."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from safetensors.torch import load_file
from tokenizers import Regex, Tokenizer, models, pre_tokenizers

from cheers.errors import CheckpointError, InputError
from cheers.sequence import GEN_PLACEHOLDER, IGNORE
from cheers.text_tokenizer import SPECIAL_STRINGS, TextTokenizer, train_bpe

INPUTS = Path(__file__).parent / "fixtures" / "official_cheers_tiny" / "inputs.safetensors"
D = 151370  # the fixture's special ids are the real ones minus D
REAL_IDS = {"pad": 151643, "chat_start": 151644, "eos": 151645, "image": 151665, "image_gen": 151666,
            "im_start": 151667, "im_end": 151668, "no_mean": 151669}
SYSTEM = " ".join(f"w{i}" for i in range(101, 107))


@pytest.fixture(scope="module")
def fixture_tokenizer():
    """A word-level tokenizer with the fixture's ids: "wN" -> N, "\\n" -> 198, roles 100/107/113."""
    vocab = {f"w{i}": i for i in range(300)}
    vocab.update({"\n": 198, "system": 100, "user": 107, "assistant": 113, "[UNK]": 299})
    vocab.update({SPECIAL_STRINGS[k]: v - D for k, v in REAL_IDS.items()})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(" "), behavior="removed"),
        pre_tokenizers.Split(Regex("\n"), behavior="isolated"),
    ])
    tok.add_special_tokens(list(SPECIAL_STRINGS.values()))
    return TextTokenizer(tok)


def words(ids):
    return " ".join(f"w{i}" for i in ids)


def test_understanding_prompt_matches_official(fixture_tokenizer):
    ids = load_file(INPUTS)["und.input_ids"][0].tolist()
    assert fixture_tokenizer.i2t_prompt(words(range(108, 113)), 1, system=SYSTEM) == ids


def test_generation_prompt_matches_official(fixture_tokenizer):
    ids = load_file(INPUTS)["t2i.input_ids"][0].tolist()
    assert fixture_tokenizer.t2i_prompt(words(range(130, 136)), system=SYSTEM) == ids


def test_training_sample_and_labels_match_official_template(fixture_tokenizer):
    inp = load_file(INPUTS)
    caption = words(range(120, 123)) + "\n" + words(range(123, 128))
    ids, labels = fixture_tokenizer.t2i_sample(caption, system=SYSTEM, policy="official")
    assert ids == inp["gen.input_ids"][0].tolist()
    official = inp["gen.labels"][0].tolist()
    # the label at the placeholder is irrelevant (the model replaces it by image slots)
    at = ids.index(GEN_PLACEHOLDER)
    assert labels[:at] + labels[at + 1:] == official[:at] + official[at + 1:]
    _, clean = fixture_tokenizer.t2i_sample(caption, system=SYSTEM, policy="assistant")
    assert clean[:at - 4] == [IGNORE] * (at - 4)


def test_trained_bpe_round_trips_and_has_special_ids():
    tok = train_bpe(["a red circle above a blue square", "How many stars?"] * 8, vocab_size=300)
    assert tok.decode(tok.encode("a red circle")) == "a red circle"
    assert tok.special.pad == 0 and tok.special.no_mean == 7
    with pytest.raises(InputError, match="the prompt is empty"):
        tok.t2i_prompt("  ")


def test_tokenizer_without_special_tokens_is_refused(tmp_path):
    tok = Tokenizer(models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]"))
    tok.save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(CheckpointError, match=re.escape("lacks the special tokens <|endoftext|>")):
        TextTokenizer.from_dir(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not a readable tokenizer.json"):
        TextTokenizer.from_dir(tmp_path)


def test_chat_sample_lays_out_every_turn_and_labels_every_answer(fixture_tokenizer):
    tok = fixture_tokenizer
    (q1, a1), (q2, a2) = (words([108, 109]), words([140])), (words([110, 111]), words([141, 142]))
    reply_end = [tok.special.eos] + tok.newline
    # one turn: the understanding prompt, then the answer, labelled alone
    ids, labels = tok.i2t_chat_sample([(q1, a1)], system=SYSTEM)
    prompt = tok.i2t_prompt(q1, 1, system=SYSTEM)
    assert ids == prompt + [140] + reply_end and (ids, labels) == tok.i2t_sample(q1, a1, system=SYSTEM)
    context = len(prompt) - len(tok.assistant_open())
    assert labels == [IGNORE] * context + ids[context:]
    # two turns: the second prompt is the chat-history prompt, and both answers are targets
    ids, labels = tok.i2t_chat_sample([(q1, a1), (q2, a2)], system=SYSTEM)
    prompt2 = tok.i2t_prompt(q2, 1, system=SYSTEM, history=[(q1, a1)])
    assert ids == prompt2 + [141, 142] + reply_end
    labelled = [t for t, lab in zip(ids, labels) if lab != IGNORE]
    assert labelled == tok.assistant_open() + [140] + reply_end + tok.assistant_open() + [141, 142] + reply_end
    assert all(lab in (IGNORE, t) for t, lab in zip(ids, labels))
    # the official policy also keeps the special tokens of the user turns
    _, official = tok.i2t_chat_sample([(q1, a1), (q2, a2)], system=SYSTEM, policy="official")
    assert sum(lab != IGNORE for lab in official) > len(labelled)
    with pytest.raises(InputError, match="at least one"):
        tok.i2t_chat_sample([], system=SYSTEM)
    with pytest.raises(InputError, match="empty"):
        tok.i2t_chat_sample([(q1, a1), (" ", a2)], system=SYSTEM)
