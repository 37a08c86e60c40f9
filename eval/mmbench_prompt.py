"""The MMBench prompt: the text a model reads for one multiple-choice question (no image tag).

``llava`` is the custom prompt VLMEvalKit gives LLaVA-style models (and the one the shapes
world trains on); ``vlmevalkit`` is ``ImageMCQDataset.build_prompt``'s layout.
"""

from __future__ import annotations

from cheers.errors import InputError

OPTION_LETTERS = "ABCD"
MMBENCH_SUFFIX = "Answer with the option's letter from the given choices directly."


def format_mmbench_prompt(question: str, options: list[str], hint: str | None = None,
                          style: str = "llava") -> str:
    """The MMBench prompt text (no image tag).

    ``style="llava"``: ``{hint}\\n{question}\\nA. ..\\nAnswer with the option's letter from
    the given choices directly.``; ``style="vlmevalkit"``: VLMEvalKit's
    ``ImageMCQDataset.build_prompt`` layout (``Hint:``/``Question:``/``Options:``).
    """
    letters = OPTION_LETTERS[: len(options)]
    if style == "llava":
        lines = ([hint] if hint else []) + [question]
        lines += [f"{k}. {v}" for k, v in zip(letters, options)]
        return "\n".join(lines + [MMBENCH_SUFFIX])
    if style == "vlmevalkit":
        text = f"Hint: {hint}\n" if hint else ""
        text += f"Question: {question}\nOptions:\n"
        text += "".join(f"{k}. {v}\n" for k, v in zip(letters, options))
        return text + "Please select the correct answer from the options above. \n"
    raise InputError(f"unknown MMBench prompt style {style!r}; expected 'llava' or 'vlmevalkit'")
