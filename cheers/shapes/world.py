"""The shapes world: procedural scenes of flat coloured shapes, with their texts.

A scene holds 1-4 non-overlapping shapes (``SHAPES``) in the ten GenEval colour
names (``COLOURS``, fixed RGB in ``PALETTE``) on a mid-grey background. From a
scene we derive a text-to-image caption, MMBench-format multiple-choice
questions and plain texts; independently we derive GenEval-format prompt
metadata with shape names as classes, and scenes that satisfy such metadata.

Everything is a pure function of a ``numpy.random.Generator`` passed in: no
global random state. Coordinates are pixels, x to the right, y downwards; a
pixel (row i, column j) covers [j, j+1) x [i, i+1). Boxes are
``(x0, y0, x1, y1)`` with exclusive ends, so a box's width is ``x1 - x0``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from cheers.errors import InputError

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross")
PLURALS: dict[str, str] = {
    "circle": "circles",
    "square": "squares",
    "triangle": "triangles",
    "star": "stars",
    "cross": "crosses",
}
# GenEval's colour names, in its order (evaluate_images.py COLORS).
COLOURS: tuple[str, ...] = (
    "red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white",
)
# Pairwise RGB distance >= 98, and >= 108 from the background, so a pixel can be
# told apart after mild blur and noise; blends with the background stay >= 67 away
# from every third colour.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "orange": (250, 130, 10),
    "yellow": (240, 230, 30),
    "green": (40, 165, 60),
    "blue": (40, 80, 220),
    "purple": (140, 40, 190),
    "pink": (245, 140, 200),
    "brown": (125, 75, 30),
    "black": (20, 20, 20),
    "white": (245, 245, 245),
}
BACKGROUND: tuple[int, int, int] = (128, 128, 128)
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")
INVERSE_RELATION: dict[str, str] = {
    "left of": "right of", "right of": "left of", "above": "below", "below": "above",
}
POSITION_MARGIN = 0.1  # GenEval's position_threshold
NUMBER_WORDS: dict[int, str] = {
    0: "zero", 1: "one", 2: "two", 3: "three", 4: "four", 5: "five", 6: "six",
}
GENEVAL_TAGS: tuple[str, ...] = (
    "single_object", "two_object", "counting", "colors", "position", "color_attr",
)
SCENE_KINDS: tuple[str, ...] = ("single", "two", "position", "counting", "multi")
MIN_IMAGE_SIZE, MAX_IMAGE_SIZE = 64, 256
MAX_OBJECTS = 4

# L3 category -> MMBench L2 category (MMBench's own L2 names).
MMBENCH_L2: dict[str, str] = {
    "colour": "finegrained_perception (instance-level)",
    "shape": "finegrained_perception (instance-level)",
    "count": "finegrained_perception (cross-instance)",
    "position": "finegrained_perception (cross-instance)",
    "existence": "coarse_perception",
}
MMBENCH_CATEGORIES: tuple[str, ...] = tuple(MMBENCH_L2)
OPTION_LETTERS = "ABCD"
# The prompt of DESIGN.md s.6 (LLaVA's MMBench prompt) and VLMEvalKit's default one.
MMBENCH_SUFFIX = "Answer with the option's letter from the given choices directly."

_STAR_INNER = 0.45  # inner/outer radius; fatter than the regular star's 0.382 so tips survive blur
_STAR_WIDTH = 2.0 * np.sin(np.deg2rad(72.0))  # 1.902 R
_STAR_HEIGHT = 1.0 + np.cos(np.deg2rad(36.0))  # 1.809 R
_SUPERSAMPLE = 4


@dataclass(frozen=True)
class ShapeObject:
    """One shape: its class, colour, the square it is drawn in, and its rendered box.

    ``anchor`` is the centre (x, y) and ``size`` the side (pixels) of the square the
    shape is inscribed in; ``bbox`` ``(x0, y0, x1, y1)`` (exclusive ends) is the tight
    box of the pixels the shape covers by at least half, ``centre`` that box's centre.
    """

    shape: str
    colour: str
    anchor: tuple[float, float]
    size: float
    bbox: tuple[int, int, int, int]

    @property
    def centre(self) -> tuple[float, float]:
        x0, y0, x1, y1 = self.bbox
        return ((x0 + x1) / 2.0, (y0 + y1) / 2.0)

    def to_dict(self) -> dict:
        return {
            "class": self.shape,
            "colour": self.colour,
            "bbox": list(self.bbox),
            "centre": list(self.centre),
            "anchor": list(self.anchor),
            "size": self.size,
        }


@dataclass(frozen=True)
class Scene:
    """A rendered-to-be image: ``objects`` on a ``width`` x ``height`` grey canvas.

    ``kind`` is one of ``SCENE_KINDS`` (or ``"geneval"``); ``relation`` ``(a, rel, b)``
    says objects[a] is ``rel`` of objects[b] unambiguously (the only relation GenEval's
    rule finds between them), when the scene was built around one.
    """

    width: int
    height: int
    objects: tuple[ShapeObject, ...]
    kind: str
    relation: tuple[int, str, int] | None = None

    def to_dict(self) -> dict:
        return {
            "width": self.width,
            "height": self.height,
            "kind": self.kind,
            "relation": None if self.relation is None else list(self.relation),
            "objects": [o.to_dict() for o in self.objects],
        }


# ---------------------------------------------------------------------------
# geometry and rendering


def relation_set(box_a, box_b, margin: float = POSITION_MARGIN) -> set[str]:
    """Relations of box A to box B by GenEval's rule (the centre offset, shrunk by ``margin``
    times the summed box sizes, must point mostly along one axis): the scorer's own rule, so a
    scene always satisfies what it is scored on."""
    from cheers.eval.geneval_rules import relative_position

    return relative_position(box_a, box_b, margin)


def _star_vertices(cx: float, cy: float, size: float) -> np.ndarray:
    """10 vertices (x, y) of a point-up five-point star whose box is size x 0.95 size."""
    radius = size / _STAR_WIDTH
    # centre the star's box (height 1.809 R, from cy - R to cy + 0.809 R) on cy
    oy = cy + radius * (1.0 - (_STAR_HEIGHT - 1.0)) / 2.0
    k = np.arange(10)
    r = np.where(k % 2 == 0, radius, radius * _STAR_INNER)
    ang = np.deg2rad(-90.0 + 36.0 * k)
    return np.stack([cx + r * np.cos(ang), oy + r * np.sin(ang)], axis=1)


def _inside_polygon(px: np.ndarray, py: np.ndarray, verts: np.ndarray) -> np.ndarray:
    """Even-odd rule point-in-polygon, vectorised over the points."""
    inside = np.zeros(px.shape, dtype=bool)
    n = len(verts)
    for i in range(n):
        x1, y1 = verts[i]
        x2, y2 = verts[(i + 1) % n]
        crosses = (y1 > py) != (y2 > py)
        with np.errstate(divide="ignore", invalid="ignore"):
            xint = x1 + (py - y1) * (x2 - x1) / (y2 - y1)
        inside ^= crosses & (px < xint)
    return inside


def _inside(shape: str, px: np.ndarray, py: np.ndarray, cx: float, cy: float, size: float):
    h = size / 2.0
    dx, dy = px - cx, py - cy
    if shape == "circle":
        return dx * dx + dy * dy <= h * h
    if shape == "square":
        return (np.abs(dx) <= h) & (np.abs(dy) <= h)
    if shape == "triangle":  # apex up, base = height = size
        return (dy <= h) & (np.abs(dx) <= (dy + h) / 2.0)
    if shape == "cross":  # plus sign, arms a third of the size wide
        a = size / 6.0
        return ((np.abs(dx) <= h) & (np.abs(dy) <= a)) | ((np.abs(dx) <= a) & (np.abs(dy) <= h))
    if shape == "star":
        return _inside_polygon(px, py, _star_vertices(cx, cy, size))
    raise InputError(f"unknown shape {shape!r}; expected one of {SHAPES}")


def coverage(shape: str, anchor: tuple[float, float], size: float, height: int, width: int,
             supersample: int = _SUPERSAMPLE) -> np.ndarray:
    """Fraction of each pixel the shape covers, float32 [height, width] in [0, 1]."""
    cx, cy = anchor
    h = size / 2.0 + 1.0
    x0, x1 = max(int(np.floor(cx - h)), 0), min(int(np.ceil(cx + h)), width)
    y0, y1 = max(int(np.floor(cy - h)), 0), min(int(np.ceil(cy + h)), height)
    out = np.zeros((height, width), dtype=np.float32)
    if x1 <= x0 or y1 <= y0:
        return out
    sub = (np.arange(supersample) + 0.5) / supersample
    xs = (np.arange(x0, x1)[:, None] + sub[None, :]).reshape(-1)
    ys = (np.arange(y0, y1)[:, None] + sub[None, :]).reshape(-1)
    px, py = np.meshgrid(xs, ys)  # [(y1-y0)*ss, (x1-x0)*ss]
    hit = _inside(shape, px, py, cx, cy, size).astype(np.float32)
    hit = hit.reshape(y1 - y0, supersample, x1 - x0, supersample).mean(axis=(1, 3))
    out[y0:y1, x0:x1] = hit
    return out


def _mask_bbox(mask: np.ndarray) -> tuple[int, int, int, int]:
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        raise InputError("shape covers no pixel; size too small for the image")
    return (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)


def make_object(shape: str, colour: str, anchor: tuple[float, float], size: float,
                height: int, width: int) -> ShapeObject:
    """A ``ShapeObject`` with its box measured from the rendered coverage."""
    if shape not in SHAPES:
        raise InputError(f"unknown shape {shape!r}; expected one of {SHAPES}")
    if colour not in PALETTE:
        raise InputError(f"unknown colour {colour!r}; expected one of {COLOURS}")
    cov = coverage(shape, anchor, size, height, width)
    return ShapeObject(shape=shape, colour=colour, anchor=(float(anchor[0]), float(anchor[1])),
                       size=float(size), bbox=_mask_bbox(cov >= 0.5))


def render(scene: Scene) -> np.ndarray:
    """RGB uint8 [height, width, 3]; anti-aliased by 4x4 supersampling."""
    img = np.empty((scene.height, scene.width, 3), dtype=np.float32)
    img[:] = BACKGROUND
    for obj in scene.objects:
        cov = coverage(obj.shape, obj.anchor, obj.size, scene.height, scene.width)[..., None]
        img = img * (1.0 - cov) + np.asarray(PALETTE[obj.colour], np.float32) * cov
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def object_masks(scene: Scene) -> list[np.ndarray]:
    """Per object, the bool [height, width] mask of pixels it covers by at least half."""
    return [coverage(o.shape, o.anchor, o.size, scene.height, scene.width) >= 0.5
            for o in scene.objects]


# ---------------------------------------------------------------------------
# scene sampling


def _check_size(image_size: int) -> None:
    if not (MIN_IMAGE_SIZE <= int(image_size) <= MAX_IMAGE_SIZE):
        raise InputError(f"image_size={image_size}; the shapes world draws "
                         f"{MIN_IMAGE_SIZE}..{MAX_IMAGE_SIZE} px")


def _size_range(n: int, image_size: int) -> tuple[float, float]:
    # fractions of the side; 4 shapes of at most 0.26 S plus gaps fit easily
    hi = {1: 0.45, 2: 0.38, 3: 0.32, 4: 0.29}[n]
    lo = max(0.25, 16.0 / image_size)
    return lo * image_size, max(hi * image_size, lo * image_size)


def _place(rng: np.random.Generator, specs: list[tuple[str, str]], image_size: int,
           relation: str | None = None, tries: int = 200) -> tuple[ShapeObject, ...]:
    """Place shapes of ``specs`` without overlap (>= 2 px gap between their squares).

    With ``relation``, two specs and ``objects[1] relation objects[0]`` must be the
    only relation GenEval's rule finds between them.
    """
    n = len(specs)
    gap = max(2.0, 0.04 * image_size)
    lo, hi = _size_range(n, image_size)
    for attempt in range(tries):
        # shrink the sizes on repeated failure so sampling always ends
        shrink = 1.0 if attempt < tries // 2 else 0.8
        sizes = rng.uniform(lo, max(lo, hi * shrink), size=n)
        anchors: list[tuple[float, float]] = []
        for s in sizes:
            h = s / 2.0 + 1.0
            for _ in range(50):
                c = (float(rng.uniform(h, image_size - h)), float(rng.uniform(h, image_size - h)))
                if all(abs(c[0] - a[0]) >= (s + t) / 2 + gap or abs(c[1] - a[1]) >= (s + t) / 2 + gap
                       for a, t in zip(anchors, sizes)):
                    anchors.append(c)
                    break
            else:
                break
        if len(anchors) < n:
            continue
        objs = tuple(make_object(sh, co, a, s, image_size, image_size)
                     for (sh, co), a, s in zip(specs, anchors, sizes))
        if relation is not None and relation_set(objs[1].bbox, objs[0].bbox) != {relation}:
            continue
        return objs
    raise InputError(f"could not place {n} shapes in {image_size} px after {tries} tries")


def _random_colour(rng: np.random.Generator, exclude: tuple[str, ...] = ()) -> str:
    return str(rng.choice([c for c in COLOURS if c not in exclude]))


def sample_scene(rng: np.random.Generator, image_size: int = 64, kind: str | None = None) -> Scene:
    """A random scene of 1-4 shapes; ``kind`` (one of ``SCENE_KINDS``) picks its layout:

    single (1 shape), two (2 distinct shapes), position (2 distinct shapes with one
    unambiguous relation), counting (2-4 shapes of one class), multi (3-4 shapes).
    """
    _check_size(image_size)
    if kind is None:
        kind = str(rng.choice(SCENE_KINDS))
    if kind not in SCENE_KINDS:
        raise InputError(f"unknown scene kind {kind!r}; expected one of {SCENE_KINDS}")
    relation = None
    if kind == "single":
        specs = [(str(rng.choice(SHAPES)), _random_colour(rng))]
    elif kind in ("two", "position"):
        first = (str(rng.choice(SHAPES)), _random_colour(rng))
        while True:
            second = (str(rng.choice(SHAPES)), _random_colour(rng))
            if second != first:
                break
        specs = [first, second]
        if kind == "position":
            relation = str(rng.choice(RELATIONS))
    elif kind == "counting":
        n = int(rng.integers(2, MAX_OBJECTS + 1))
        shape = str(rng.choice(SHAPES))
        if rng.random() < 0.5:
            specs = [(shape, _random_colour(rng))] * n
        else:
            specs = [(shape, _random_colour(rng)) for _ in range(n)]
    else:
        n = int(rng.integers(3, MAX_OBJECTS + 1))
        specs = [(str(rng.choice(SHAPES)), _random_colour(rng)) for _ in range(n)]
    objs = _place(rng, specs, image_size, relation=relation)
    return Scene(width=image_size, height=image_size, objects=objs, kind=kind,
                 relation=None if relation is None else (1, relation, 0))


def scene_for_metadata(metadata: dict, rng: np.random.Generator, image_size: int = 64) -> Scene:
    """A scene that satisfies a GenEval metadata record over shape classes exactly:
    ``count`` objects per include clause (in its colour when given), placed so that
    each ``position`` clause holds, and nothing else. A reference image for a prompt."""
    _check_size(image_size)
    include = metadata.get("include")
    if not include:
        raise InputError(f"GenEval metadata has no 'include': {metadata!r}")
    specs: list[tuple[str, str]] = []
    relation = None
    for i, req in enumerate(include):
        cls = req.get("class")
        if cls not in SHAPES:
            raise InputError(f"metadata class {cls!r} is not a shape {SHAPES}: {metadata!r}")
        colour = req.get("color")
        for _ in range(int(req.get("count", 1))):
            specs.append((cls, colour if colour is not None else _random_colour(rng)))
        if "position" in req:
            rel, target = req["position"]
            if i != 1 or target != 0 or len(include) != 2 or int(req.get("count", 1)) != 1 \
                    or int(include[0].get("count", 1)) != 1:
                raise InputError("only GenEval's position layout (include[1] rel include[0], "
                                 f"count 1 each) is supported: {metadata!r}")
            relation = rel
    if len(specs) > MAX_OBJECTS:
        raise InputError(f"metadata asks for {len(specs)} objects, at most {MAX_OBJECTS}")
    objs = _place(rng, specs, image_size, relation=relation)
    return Scene(width=image_size, height=image_size, objects=objs, kind="geneval",
                 relation=None if relation is None else (1, relation, 0))


# ---------------------------------------------------------------------------
# text


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


def format_mmbench_prompt(question: str, options: list[str], hint: str | None = None,
                          style: str = "llava") -> str:
    """The MMBench prompt text (no image tag).

    ``style="llava"``: ``{hint}\\n{question}\\nA. ..\\nAnswer with the option's letter from
    the given choices directly.`` (DESIGN.md s.6); ``style="vlmevalkit"``: VLMEvalKit's
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
