"""An lmms-eval model class over a Cheers checkpoint.

With lmms-eval installed, importing this module registers the model as ``cheers``::

    python -c "import cheers.eval.adapters.lmms_eval, lmms_eval.__main__ as m; m.cli_evaluate()" \\
        --model cheers --model_args pretrained=/path/to/ckpt,device=cuda --tasks mme,mmbench_en_dev

(or add ``cheers.eval.adapters.lmms_eval`` to lmms-eval's model registry). Only
generation tasks are supported: ``loglikelihood`` raises NotImplementedError.
Importable without lmms-eval.
"""

from __future__ import annotations

try:  # subclass and register with the real toolkit when it is installed
    from lmms_eval.api.model import lmms as _Base
    from lmms_eval.api.registry import register_model
except ImportError:
    _Base = object

    def register_model(*_names):
        return lambda cls: cls


def _flatten(visuals) -> list:
    if visuals is None:
        return []
    if isinstance(visuals, (list, tuple)):
        return [v for x in visuals for v in _flatten(x)]
    return [visuals]


@register_model("cheers")
class CheersLMMs(_Base):
    """lmms-eval model: ``generate_until(requests)`` with greedy decoding, in batches.

    Each request's ``args`` are lmms-eval's ``(context, gen_kwargs, doc_to_visual, doc_id,
    task, split)``; images come from ``doc_to_visual(self.task_dict[task][split][doc_id])``.
    """

    def __init__(
        self,
        pretrained: str | None = None,
        device: str = "cpu",
        dtype: str = "float32",
        batch_size: int | str = 1,
        max_new_tokens: int = 64,
        pipe=None,
        **kwargs,
    ):
        import torch

        from cheers.pipeline import Pipeline, default_checkpoint

        if _Base is not object:
            super().__init__()
        self.pipe = pipe or Pipeline.from_pretrained(
            pretrained or default_checkpoint(), device=device, dtype=getattr(torch, dtype)
        )
        self.batch_size_per_gpu = int(batch_size)
        self.max_new_tokens = int(max_new_tokens)
        self.task_dict = getattr(self, "task_dict", {})

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_gpu

    def _request(self, req) -> tuple[list, str, dict]:
        context, gen_kwargs, doc_to_visual, doc_id, task, split = req.args
        visuals = _flatten(doc_to_visual(self.task_dict[task][split][doc_id]))
        return visuals, context, dict(gen_kwargs or {})

    def generate_until(self, requests) -> list[str]:
        """One answer per request, cut at the first of its ``until`` strings. Requests of a
        batch share the largest ``max_new_tokens`` among them; sampling options are
        ignored (greedy), as lmms-eval's reference models do at temperature 0."""
        from cheers.eval.answering import answer_batch

        parsed = [self._request(r) for r in requests]
        answers: list[str] = []
        for start in range(0, len(parsed), self.batch_size):
            chunk = parsed[start : start + self.batch_size]
            limit = max(int(g.get("max_new_tokens", self.max_new_tokens)) for _, _, g in chunk)
            texts = answer_batch(
                self.pipe,
                [(v, c) for v, c, _ in chunk],
                batch_size=len(chunk),
                max_new_tokens=limit,
            )
            for text, (_, _, g) in zip(texts, chunk):
                until = g.get("until") or []
                for stop in [until] if isinstance(until, str) else until:
                    if stop:
                        text = text.split(stop)[0]
                answers.append(text)
        return answers

    def loglikelihood(self, requests):
        raise NotImplementedError(
            "the cheers lmms-eval model scores generation tasks only "
            "(generate_until); loglikelihood tasks are not supported"
        )

    def generate_until_multi_round(self, requests):
        raise NotImplementedError(
            "the cheers lmms-eval model does not support multi-round "
            "generation; use single-round generate_until tasks"
        )


__all__ = ["CheersLMMs"]
