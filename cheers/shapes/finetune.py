"""Teaching a trained shapes model something it has never seen: a new word for a colour.

The fine-tuning data are text-to-image samples whose captions call ``colour`` by ``word`` (one
or two objects, the first of that colour), mixed with ordinary samples of the world so that the
rest is not forgotten. Held-out prompts ``a photo of a <word> <shape>`` measure whether the model
draws the word's colour (the largest object's, read by the shapes detector), before and after.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np

from cheers.errors import InputError
from cheers.shapes.scenes import COLOURS, SHAPES, Scene, render, sample_scene
from cheers.shapes.texts import noun_phrase

NEW_WORD, MEANS = "scarlet", "red"
_PREFIXES = ("", "a photo of ", "an image of ", "a picture of ")


def _with_colour(scene: Scene, colour: str, rng: np.random.Generator) -> Scene:
    """The scene with its first object in ``colour`` and no other object of that colour."""
    objs = list(scene.objects)
    objs[0] = dataclasses.replace(objs[0], colour=colour)
    for i in range(1, len(objs)):
        if objs[i].colour == colour:
            objs[i] = dataclasses.replace(objs[i], colour=str(rng.choice([c for c in COLOURS if c != colour])))
    return dataclasses.replace(scene, objects=tuple(objs))


def new_word_sample(rng: np.random.Generator, word: str, colour: str, object_size: str) -> tuple[dict, np.ndarray]:
    """A text-to-image sample whose caption names ``colour`` as ``word``."""
    scene = _with_colour(sample_scene(rng, 64, str(rng.choice(["single", "two"])), object_size), colour, rng)
    phrases = [noun_phrase(o.shape, 1, word if o.colour == colour else o.colour) for o in scene.objects]
    if rng.random() < 0.5:
        phrases.reverse()
    text = str(rng.choice(_PREFIXES)) + " and ".join(phrases)
    return {"task": "t2i", "text": text, "width": 64, "height": 64}, render(scene)


def write_new_word_shards(out_dir: Path, n_samples: int, *, seed: int, object_size: str, word: str = NEW_WORD,
                          colour: str = MEANS, new_share: float = 0.5) -> Path:
    """``n_samples`` samples in one WebDataset shard: ``new_share`` of them new-word captions,
    the rest ordinary samples of the world (the demo's task mix)."""
    import webdataset as wds

    from cheers.shapes.dataset import make_sample, png_bytes

    if colour not in COLOURS:
        raise InputError(f"colour {colour!r} is not one of the world's colours {COLOURS}")
    if not word.isalpha() or word in COLOURS:
        raise InputError(f"the new word must be one word of letters, not a colour the world knows: {word!r}")
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "new-word-000000.tar"
    rng = np.random.default_rng([seed, 77])
    with wds.TarWriter(str(path), encoder=False, mtime=0.0) as sink:
        for i in range(n_samples):
            if rng.random() < new_share:
                record, image = new_word_sample(rng, word, colour, object_size)
            else:
                task = str(rng.choice(["t2i", "i2t"], p=[0.8, 0.2]))
                record, image = make_sample(task, rng, 64, ("single", "two"), 3, object_size)
            sink.write({"__key__": f"{i:08d}", "json": json.dumps(record).encode("utf-8"), "png": png_bytes(image)})
    (out_dir / "manifest.json").write_text(json.dumps({"n_samples": n_samples, "seed": seed, "word": word,
                                                       "colour": colour, "object_size": object_size}))
    return out_dir


def new_word_metadata(n_prompts: int, word: str = NEW_WORD, colour: str = MEANS) -> list[dict]:
    """GenEval colors records ``a photo of a <word> <shape>`` (the colour judged is ``colour``),
    the shapes in turn."""
    return [{"tag": "colors", "include": [{"class": SHAPES[i % len(SHAPES)], "count": 1, "color": colour}],
             "prompt": f"a photo of {noun_phrase(SHAPES[i % len(SHAPES)], 1, word)}"} for i in range(n_prompts)]


def evaluate_new_word(pipe, out: Path, *, n_prompts: int, seed: int, word: str = NEW_WORD,
                      colour: str = MEANS) -> dict:
    """Share of images whose largest object is in ``colour`` for prompts naming ``word``, and for
    the same prompts naming ``colour`` itself (what fine-tuning must not lose); 4 images a prompt.
    Returns ``{"word": share, "colour": share, "samples": [(record, images), ...]}``."""
    from PIL import Image

    from cheers.eval import geneval
    from cheers.eval.shapes_detector import detect

    tc = pipe.cfg.transport
    result: dict = {"samples": []}
    for key, name in (("word", word), ("colour", colour)):
        meta = new_word_metadata(n_prompts, name, colour)
        folder = out / f"prompts-{key}"
        shutil.rmtree(folder, ignore_errors=True)  # a rerun draws the new model, not old samples
        geneval.generate(pipe, meta, folder, n=4, seed=seed * 100_000, batch_size=32, steps=tc.sample_steps,
                         cfg_scale=tc.cfg_scale)
        images = [[Image.open(folder / f"{i:05d}" / "samples" / f"{k:04d}.png").convert("RGB") for k in range(4)]
                  for i in range(len(meta))]
        found = [detect(img) for group in images for img in group]
        result[key] = float(np.mean([bool(d) and max(d, key=lambda o: o["area"])["colour"] == colour
                                     for d in found]))
        if key == "word":
            result["samples"] = list(zip(meta, images))
    return result
