"""A VLMEvalKit model class over a Cheers checkpoint.

Register it in VLMEvalKit's ``vlmeval/config.py`` (``supported_VLM``), for example::

    from functools import partial
    from cheers.eval.adapters.vlmevalkit import CheersVLM
    supported_VLM["cheers"] = partial(CheersVLM, model_path="/path/to/ckpt", device="cuda")

then ``python run.py --data MMBench_DEV_EN MME --model cheers``. For multiple-choice
datasets the class builds our MMBench prompt (``use_custom_prompt``), so VLMEvalKit's
numbers match ``cheers eval mmbench run``; other datasets use VLMEvalKit's own prompts.
Importable without VLMEvalKit; with it installed the class subclasses its ``BaseModel``.
"""

from __future__ import annotations

try:  # subclass the real base when VLMEvalKit is installed
    from vlmeval.vlm.base import BaseModel as _Base
except ImportError:  # a duck type with the same methods otherwise
    _Base = object

_MCQ_NAMES = ("MMBench", "MMStar", "SEEDBench", "ScienceQA", "AI2D", "CCBench", "MMMU")


class CheersVLM(_Base):
    """VLMEvalKit model: ``generate_inner(message, dataset)`` answers with greedy decoding.

    ``message`` is VLMEvalKit's list of ``{"type": "image" | "text", "value": path or text}``;
    the images go first, the texts joined by newlines form the question.
    """

    INTERLEAVE = False
    allowed_types = ["text", "image"]

    def __init__(
        self,
        model_path: str | None = None,
        *,
        device: str = "cpu",
        dtype: str = "float32",
        max_new_tokens: int = 64,
        prompt_style: str = "llava",
        pipe=None,
        **kwargs,
    ):
        import torch

        from cheers.pipeline import Pipeline, default_checkpoint

        self.pipe = pipe or Pipeline.from_pretrained(
            model_path or default_checkpoint(), device=device, dtype=getattr(torch, dtype)
        )
        self.max_new_tokens = max_new_tokens
        self.prompt_style = prompt_style
        self.kwargs = kwargs

    def use_custom_prompt(self, dataset) -> bool:
        if dataset is None:
            return False
        try:
            from vlmeval.dataset import DATASET_TYPE

            return DATASET_TYPE(dataset) == "MCQ"
        except ImportError:
            return any(name in str(dataset) for name in _MCQ_NAMES)

    def build_prompt(self, line, dataset=None) -> list[dict]:
        """Our MMBench prompt for a multiple-choice row (a dict or pandas Series)."""
        from cheers.eval.mmbench import build_prompt

        row = dict(line)
        if _Base is not object and dataset is not None:
            images = self.dump_image(line, dataset)
        else:
            from cheers.eval.tables import decode_image

            images = [decode_image(row, f"index {row.get('index')}")]
        text = build_prompt(row, self.prompt_style)
        return [{"type": "image", "value": im} for im in images] + [{"type": "text", "value": text}]

    def generate_inner(self, message, dataset=None) -> str:
        if isinstance(message, str):
            message = [{"type": "text", "value": message}]
        images = [m["value"] for m in message if m["type"] == "image"]
        text = "\n".join(m["value"] for m in message if m["type"] == "text")
        return self.pipe.understand(images, text, max_new_tokens=self.max_new_tokens)

    def generate(self, message, dataset=None) -> str:
        """VLMEvalKit's entry point (its own ``generate`` when installed)."""
        if _Base is not object:
            return super().generate(message, dataset)
        return self.generate_inner(message, dataset)


__all__ = ["CheersVLM"]
