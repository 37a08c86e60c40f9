"""Batched understanding (image(s) + question -> answer) over a ``cheers.pipeline.Pipeline``.

Greedy decoding, rows of a batch left-padded together by the engine; the answer of each row
is its tokens up to the first stop token (EOS or PAD), decoded and stripped. One code path
for MMBench, MME, the adapters and the demo.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from cheers.errors import InputError


def answer_batch(
    pipe,
    items: Sequence[tuple[list, str]],
    *,
    batch_size: int = 16,
    max_new_tokens: int = 32,
    progress: Callable[[int], None] | None = None,
) -> list[str]:
    """Answers to ``items``: ``(images, question)`` pairs, images PIL or paths (one or more).

    ``progress(n)`` is called after each batch with the number of items it answered.
    """
    from cheers.pipeline import load_image

    if batch_size < 1:
        raise InputError(f"batch size must be >= 1, got {batch_size}")
    tok, size = pipe.text_tokenizer, pipe.image_size
    stop = {pipe.cfg.tokens.eos, pipe.cfg.tokens.pad}
    answers: list[str] = []
    for start in range(0, len(items), batch_size):
        chunk = items[start : start + batch_size]
        ids = [tok.i2t_prompt(question, len(images)) for images, question in chunk]
        pixels = [[load_image(im, size) for im in images] for images, _ in chunk]
        got: list[list[int]] = [[] for _ in chunk]
        done = [False] * len(chunk)
        for step in pipe.engine.decode_text(
            ids, pixels, max_new_tokens=max_new_tokens, stop_ids=stop
        ):
            for j in range(len(chunk)):
                t = int(step[j])
                if done[j] or t in stop:
                    done[j] = True
                    continue
                got[j].append(t)
        answers += [tok.decode(t).strip() for t in got]
        if progress is not None:
            progress(len(chunk))
    return answers


def answer_rows(
    pipe,
    rows: Sequence[dict],
    prompt: Callable[[dict], str],
    *,
    source: str = "",
    batch_size: int = 16,
    max_new_tokens: int = 32,
    progress: bool = True,
) -> list[str]:
    """Answers to the rows of a VLMEvalKit table: each row's base64 ``image`` (references to
    other rows resolved) with the question ``prompt(row)``. A row whose image does not decode
    raises InputError naming ``source`` and the row, before any answering starts."""
    from tqdm import tqdm

    from cheers.eval.tables import decode_image, resolve_images, row_name

    rows = resolve_images(list(rows), source)
    where = [f"{source}: {row_name(i, r)}" for i, r in enumerate(rows)]
    for r, w in zip(rows, where):  # fail on a bad image before hours of answering
        decode_image(r, w)
    answers: list[str] = []
    bar = tqdm(total=len(rows), desc="answer", unit="q", disable=not progress)
    for start in range(0, len(rows), batch_size):  # decoded per batch: real images are large
        chunk = range(start, min(start + batch_size, len(rows)))
        items = [([decode_image(rows[i], where[i])], prompt(rows[i])) for i in chunk]
        answers += answer_batch(pipe, items, batch_size=batch_size, max_new_tokens=max_new_tokens)
        bar.update(len(items))
    bar.close()
    return answers


__all__ = ["answer_batch", "answer_rows"]
