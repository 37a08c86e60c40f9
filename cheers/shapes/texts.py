"""The shapes world's texts: captions, MMBench questions, open questions, plain texts and
GenEval prompts, each derived from a scene (``cheers.shapes.scenes``) or a random draw.

Everything is a pure function of a ``numpy.random.Generator`` passed in.
"""

from __future__ import annotations

import numpy as np

from cheers.errors import InputError
from cheers.eval.mmbench_prompt import OPTION_LETTERS, format_mmbench_prompt  # noqa: F401 (the shapes world asks in this prompt)
from cheers.shapes.scenes import (
    COLOURS,
    INVERSE_RELATION,
    RELATIONS,
    SHAPES,
    Scene,
    ShapeObject,
    relation_set,
    sample_scene,
)

PLURALS: dict[str, str] = {
    "circle": "circles",
    "square": "squares",
    "triangle": "triangles",
    "star": "stars",
    "cross": "crosses",
}
NUMBER_WORDS: dict[int, str] = {
    0: "zero", 1: "one", 2: "two", 3: "three", 4: "four", 5: "five", 6: "six",
}
GENEVAL_TAGS: tuple[str, ...] = (
    "single_object", "two_object", "counting", "colors", "position", "color_attr",
)
# L3 category -> MMBench L2 category (MMBench's own L2 names).
MMBENCH_L2: dict[str, str] = {
    "colour": "finegrained_perception (instance-level)",
    "shape": "finegrained_perception (instance-level)",
    "count": "finegrained_perception (cross-instance)",
    "position": "finegrained_perception (cross-instance)",
    "existence": "coarse_perception",
}


def article(word: str) -> str:
    """'a' or 'an' for the word that follows (GenEval's prompts say 'an orange')."""
    return "an" if word[:1].lower() in "aeiou" else "a"


def noun_phrase(shape: str, count: int = 1, colour: str | None = None) -> str:
    """'a red circle', 'an orange star', 'three crosses', 'two blue squares'."""
    words = ([colour] if colour else []) + [shape if count == 1 else PLURALS[shape]]
    body = " ".join(words)
    if count == 1:
        return f"{article(body)} {body}"
    return f"{NUMBER_WORDS[count]} {body}"


def _join(parts: list[str]) -> str:
    if len(parts) == 1:
        return parts[0]
    return ", ".join(parts[:-1]) + " and " + parts[-1]


def _groups(objects, with_colour: bool) -> list[tuple[str, str | None, int]]:
    """(shape, colour or None, count) in order of first appearance."""
    order: list[tuple[str, str | None]] = []
    counts: dict[tuple[str, str | None], int] = {}
    for o in objects:
        key = (o.shape, o.colour if with_colour else None)
        if key not in counts:
            order.append(key)
            counts[key] = 0
        counts[key] += 1
    return [(s, c, counts[(s, c)]) for s, c in order]


def caption(scene: Scene, rng: np.random.Generator) -> str:
    """A text-to-image caption that is true of the whole scene (every object is named).

    Several templates: with and without colours, with and without 'a photo of'
    (GenEval's phrasing), lists, counts and relations.
    """
    objs = list(scene.objects)
    prefix = str(rng.choice(["", "a photo of ", "an image of ", "a picture of "], p=[0.45, 0.35, 0.1, 0.1]))
    distinct_shapes = len({o.shape for o in objs}) == len(objs)
    use_colour = rng.random() < 0.7 or not distinct_shapes
    if scene.relation is not None and rng.random() < 0.85:
        a, rel, b = scene.relation
        if rng.random() < 0.5:  # the mirrored sentence is as true under GenEval's rule
            a, b, rel = b, a, INVERSE_RELATION[rel]
        oa, ob = objs[a], objs[b]
        ca, cb = (oa.colour, ob.colour) if use_colour or oa.shape == ob.shape else (None, None)
        return f"{prefix}{noun_phrase(oa.shape, 1, ca)} {rel} {noun_phrase(ob.shape, 1, cb)}"
    if scene.kind == "counting" and len({(o.shape, o.colour) for o in objs}) > 1:
        use_colour = rng.random() < 0.5  # colours differ: a count alone, or a list
    groups = _groups(objs, with_colour=use_colour)
    if rng.random() < 0.5:
        groups = [groups[i] for i in rng.permutation(len(groups))]
    body = _join([noun_phrase(s, n, c) for s, c, n in groups])
    if len(objs) > 1 and rng.random() < 0.1:
        body = f"{body} on a grey background"
    return prefix + body


def _options(rng: np.random.Generator, answer: str, pool: list[str], n_options: int) -> tuple[list[str], str]:
    """``answer`` plus ``n_options - 1`` distractors from ``pool``, shuffled; (options, letter)."""
    others = [p for p in pool if p != answer]
    n = min(n_options, len(others) + 1)
    picked = [answer] + [str(x) for x in rng.choice(others, size=n - 1, replace=False)]
    order = rng.permutation(n)
    opts = [picked[i] for i in order]
    return opts, OPTION_LETTERS[opts.index(answer)]


def _n_options(rng: np.random.Generator) -> int:
    return int(rng.choice([2, 3, 4], p=[0.15, 0.15, 0.7]))


def _question(category: str, question: str, opts: list[str], letter: str) -> dict:
    row = {"question": question, "hint": "", "options": opts, "answer": letter,
           "category": category, "l2-category": MMBENCH_L2[category]}
    for k, v in zip(OPTION_LETTERS, opts):
        row[k] = v
    return row


def mmbench_questions(scene: Scene, rng: np.random.Generator) -> list[dict]:
    """Every MMBench-style question this scene can answer unambiguously, one per category
    at most: dicts ``{question, hint, options, A.., answer (letter), category, l2-category}``.

    Categories (L3, with their MMBench L2 in ``MMBENCH_L2``): colour, shape, count,
    position, existence. Options are 2-4 and shuffled.
    """
    objs = list(scene.objects)
    out: list[dict] = []
    by_shape: dict[str, list[ShapeObject]] = {}
    by_colour: dict[str, list[ShapeObject]] = {}
    for o in objs:
        by_shape.setdefault(o.shape, []).append(o)
        by_colour.setdefault(o.colour, []).append(o)

    # colour: a shape present once
    unique_shapes = [s for s, v in by_shape.items() if len(v) == 1]
    if unique_shapes:
        o = by_shape[str(rng.choice(unique_shapes))][0]
        opts, letter = _options(rng, o.colour, list(COLOURS), _n_options(rng))
        q = str(rng.choice([f"What color is the {o.shape} in the image?",
                            f"What is the color of the {o.shape}?",
                            f"Which color is the {o.shape} shown in the picture?"]))
        out.append(_question("colour", q, opts, letter))

    # shape: a colour present once
    unique_colours = [c for c, v in by_colour.items() if len(v) == 1]
    if unique_colours:
        o = by_colour[str(rng.choice(unique_colours))][0]
        opts, letter = _options(rng, o.shape, list(SHAPES), _n_options(rng))
        q = str(rng.choice([f"What shape is the {o.colour} object in the image?",
                            f"Which shape is drawn in {o.colour}?",
                            f"What is the shape of the {o.colour} object?"]))
        out.append(_question("shape", q, opts, letter))

    # count: any shape, possibly absent
    shape = str(rng.choice(SHAPES)) if rng.random() < 0.2 else objs[int(rng.integers(len(objs)))].shape
    n = len(by_shape.get(shape, []))
    opts, letter = _options(rng, str(n), [str(k) for k in range(0, 6)], _n_options(rng))
    q = str(rng.choice([f"How many {PLURALS[shape]} are there in the image?",
                        f"How many {PLURALS[shape]} can be seen in the picture?",
                        f"What is the number of {PLURALS[shape]} in the image?"]))
    out.append(_question("count", q, opts, letter))

    # position: two objects named uniquely with exactly one relation between them
    keys = {(o.shape, o.colour) for o in objs}
    unique = [i for i, o in enumerate(objs)
              if sum((p.shape, p.colour) == (o.shape, o.colour) for p in objs) == 1]
    pairs = [(a, b) for a in unique for b in unique
             if a != b and len(relation_set(objs[a].bbox, objs[b].bbox)) == 1]
    if pairs:
        a, b = pairs[int(rng.integers(len(pairs)))]
        rel = next(iter(relation_set(objs[a].bbox, objs[b].bbox)))
        na, nb = f"{objs[a].colour} {objs[a].shape}", f"{objs[b].colour} {objs[b].shape}"
        opts, letter = _options(rng, rel, list(RELATIONS), _n_options(rng))
        q = str(rng.choice([f"Where is the {na} relative to the {nb}?",
                            f"What is the position of the {na} with respect to the {nb}?",
                            f"The {na} is ___ the {nb}. Which option fills the blank?"]))
        out.append(_question("position", q, opts, letter))

    # existence: yes/no, or which of these objects is present
    if rng.random() < 0.4:
        if rng.random() < 0.5:
            o = objs[int(rng.integers(len(objs)))]
            shape, colour, truth = o.shape, o.colour, "Yes"
        else:
            absent = [(s, c) for s in SHAPES for c in COLOURS if (s, c) not in keys]
            shape, colour = absent[int(rng.integers(len(absent)))]
            truth = "No"
        opts = ["Yes", "No"] if rng.random() < 0.5 else ["No", "Yes"]
        q = f"Is there {noun_phrase(shape, 1, colour)} in the image?"
        out.append(_question("existence", q, opts, OPTION_LETTERS[opts.index(truth)]))
    else:
        o = objs[int(rng.integers(len(objs)))]
        present = f"{o.colour} {o.shape}"
        absent = [f"{c} {s}" for s in SHAPES for c in COLOURS if (s, c) not in keys]
        opts, letter = _options(rng, present, absent, max(3, _n_options(rng)))
        q = str(rng.choice(["Which of the following objects appears in the image?",
                            "Which object can be found in the picture?"]))
        out.append(_question("existence", q, opts, letter))
    return out


TOTAL_COUNT_QUESTION = "How many objects are there in the image?"


def _ask_colour(shape: str) -> str:
    return f"What color is the {shape}?"


def _ask_shape(colour: str) -> str:
    return f"What shape is the {colour} object?"


def _ask_count(shape: str) -> str:
    return f"How many {PLURALS[shape]} are there?"


def open_question(scene: Scene, rng: np.random.Generator) -> tuple[str, str]:
    """A short open question about the scene and its answer (for i2t training)."""
    objs = list(scene.objects)
    kind = int(rng.integers(4))
    if kind == 0:
        return str(rng.choice(["Describe the image briefly.", "What is in the image?",
                               "Write a short caption for this picture."])), caption(scene, rng)
    if kind == 1:
        return TOTAL_COUNT_QUESTION, NUMBER_WORDS[len(objs)]
    o = objs[int(rng.integers(len(objs)))]
    if kind == 2 and sum(p.shape == o.shape for p in objs) == 1:
        return _ask_colour(o.shape), o.colour
    if sum(p.colour == o.colour for p in objs) == 1:
        return _ask_shape(o.colour), o.shape
    n = sum(p.shape == o.shape for p in objs)
    return _ask_count(o.shape), NUMBER_WORDS[n]


def open_questions(scene: Scene) -> list[dict]:
    """Every one-word open question of ``open_question``'s kinds that ``scene`` answers
    unambiguously: ``{category, question, answer}`` with categories colour (of a shape drawn
    once), shape (of a colour used once) and count (of each shape drawn, and of all objects)."""
    objs = scene.objects
    out = [{"category": "count", "question": TOTAL_COUNT_QUESTION, "answer": NUMBER_WORDS[len(objs)]}]
    for o in objs:
        if sum(p.shape == o.shape for p in objs) == 1:
            out.append({"category": "colour", "question": _ask_colour(o.shape), "answer": o.colour})
        if sum(p.colour == o.colour for p in objs) == 1:
            out.append({"category": "shape", "question": _ask_shape(o.colour), "answer": o.shape})
    for shape in dict.fromkeys(o.shape for o in objs):
        n = sum(p.shape == shape for p in objs)
        out.append({"category": "count", "question": _ask_count(shape), "answer": NUMBER_WORDS[n]})
    return out


_FACTS = [
    "A circle is round and has no corners.",
    "A square has four equal sides and four corners.",
    "A triangle has three sides and three corners.",
    "A star has five points.",
    "A cross has four arms of equal length.",
    "Red, orange, yellow, green, blue, purple, pink, brown, black and white are colors.",
    "The background of every picture is grey.",
    "If A is left of B, then B is right of A.",
    "If A is above B, then B is below A.",
]
_CORNERS = {"circle": "zero", "square": "four", "triangle": "three", "star": "ten", "cross": "twelve"}


def text_sample(rng: np.random.Generator, image_size: int = 64) -> str:
    """A short text-only training sample about the world: facts, Q/A, scene descriptions."""
    kind = int(rng.integers(5))
    if kind == 0:
        return str(rng.choice(_FACTS))
    if kind == 1:
        s = str(rng.choice(SHAPES))
        return f"Q: How many corners does a {s} have? A: {_CORNERS[s]}."
    if kind == 2:
        a, b = (int(x) for x in rng.choice(np.arange(1, 7), size=2, replace=False))
        word = "more" if rng.random() < 0.5 else "fewer"
        ans = max(a, b) if word == "more" else min(a, b)
        return (f"Q: Which is {word}, {NUMBER_WORDS[a]} or {NUMBER_WORDS[b]}? "
                f"A: {NUMBER_WORDS[ans]}.")
    if kind == 3:
        rel = str(rng.choice(RELATIONS))
        s1, s2 = (str(x) for x in rng.choice(SHAPES, size=2, replace=False))
        return (f"Q: The {s1} is {rel} the {s2}. Where is the {s2}? "
                f"A: {INVERSE_RELATION[rel]} the {s1}.")
    scene = sample_scene(rng, image_size)
    objs = scene.objects
    text = f"The picture shows {_join([noun_phrase(s, n, c) for s, c, n in _groups(objs, True)])}."
    if scene.relation is not None:
        a, rel, b = scene.relation
        text += (f" The {objs[a].colour} {objs[a].shape} is {rel} "
                 f"the {objs[b].colour} {objs[b].shape}.")
    return text


# ---------------------------------------------------------------------------
# GenEval-format prompts


def geneval_prompt(include: list[dict]) -> str:
    """GenEval's prompt for an include list (tags other than counting/position)."""
    return "a photo of " + " and ".join(
        noun_phrase(r["class"], 1, r.get("color")) for r in include)


def geneval_record(tag: str, rng: np.random.Generator) -> dict:
    """One GenEval metadata record over shape classes, with exactly the official keys
    (``tag``, ``include``, [``exclude``], ``prompt``) and prompt phrasings."""
    if tag == "single_object":
        include = [{"class": str(rng.choice(SHAPES)), "count": 1}]
        return {"tag": tag, "include": include, "prompt": geneval_prompt(include)}
    if tag in ("two_object", "position", "color_attr"):
        a, b = (str(x) for x in rng.choice(SHAPES, size=2, replace=False))
        if tag == "two_object":
            include = [{"class": a, "count": 1}, {"class": b, "count": 1}]
            return {"tag": tag, "include": include, "prompt": geneval_prompt(include)}
        if tag == "color_attr":
            ca, cb = (str(x) for x in rng.choice(COLOURS, size=2, replace=False))
            include = [{"class": a, "count": 1, "color": ca}, {"class": b, "count": 1, "color": cb}]
            return {"tag": tag, "include": include, "prompt": geneval_prompt(include)}
        rel = str(rng.choice(RELATIONS))
        include = [{"class": a, "count": 1}, {"class": b, "count": 1, "position": [rel, 0]}]
        return {"tag": tag, "include": include,
                "prompt": f"a photo of {noun_phrase(b)} {rel} {noun_phrase(a)}"}
    if tag == "counting":
        cls, n = str(rng.choice(SHAPES)), int(rng.integers(2, 5))
        return {"tag": tag, "include": [{"class": cls, "count": n}],
                "exclude": [{"class": cls, "count": n + 1}],
                "prompt": f"a photo of {noun_phrase(cls, n)}"}
    if tag == "colors":
        include = [{"class": str(rng.choice(SHAPES)), "count": 1, "color": str(rng.choice(COLOURS))}]
        return {"tag": tag, "include": include, "prompt": geneval_prompt(include)}
    raise InputError(f"unknown GenEval tag {tag!r}; expected one of {GENEVAL_TAGS}")


def geneval_metadata(n_per_tag: int, rng: np.random.Generator) -> list[dict]:
    """``n_per_tag`` records for each of the six GenEval tags, in GenEval's tag order."""
    if n_per_tag < 1:
        raise InputError(f"n_per_tag={n_per_tag}; must be >= 1")
    return [geneval_record(tag, rng) for tag in GENEVAL_TAGS for _ in range(n_per_tag)]
