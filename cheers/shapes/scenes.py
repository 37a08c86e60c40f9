"""The shapes world's scenes: sampling and rendering flat coloured shapes.

A scene holds 1-4 non-overlapping shapes (``SHAPES``) in the ten GenEval colour
names (``COLOURS``, fixed RGB in ``PALETTE``) on a mid-grey background; a scene can
also be built to satisfy a GenEval metadata record (``scene_for_metadata``). The
texts about a scene (captions, questions, prompts) are in ``cheers.shapes.texts``.

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
SCENE_KINDS: tuple[str, ...] = ("single", "two", "position", "counting", "multi")
MIN_IMAGE_SIZE, MAX_IMAGE_SIZE = 64, 256
MAX_OBJECTS = 4

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


# Object sides as fractions of the image side, by object count. "standard": one object 16 px up
# to 0.45 of a 64 px side, so it spans one or two 16 px LLM tokens; "large": one object 28-44 px
# at 64 px (at least two tokens a side), two objects 22-29 px. 3-4 objects are the same in both.
OBJECT_SIZES: dict[str, dict[int, tuple[float, float]]] = {
    "standard": {1: (0.25, 0.45), 2: (0.25, 0.38), 3: (0.25, 0.32), 4: (0.25, 0.29)},
    "large": {1: (0.44, 0.69), 2: (0.34, 0.45), 3: (0.28, 0.34), 4: (0.25, 0.29)},
}


def check_object_size(object_size: str) -> None:
    if object_size not in OBJECT_SIZES:
        raise InputError(f"object_size={object_size!r}; expected one of {tuple(OBJECT_SIZES)}")


def _size_range(n: int, image_size: int, object_size: str = "standard") -> tuple[float, float]:
    check_object_size(object_size)
    lo, hi = OBJECT_SIZES[object_size][n]
    lo = max(lo, 16.0 / image_size)
    return lo * image_size, max(hi * image_size, lo * image_size)


def _place(rng: np.random.Generator, specs: list[tuple[str, str]], image_size: int,
           relation: str | None = None, tries: int = 200, object_size: str = "standard") -> tuple[ShapeObject, ...]:
    """Place shapes of ``specs`` without overlap (>= 2 px gap between their squares).

    With ``relation``, two specs and ``objects[1] relation objects[0]`` must be the
    only relation GenEval's rule finds between them.
    """
    n = len(specs)
    gap = max(2.0, 0.04 * image_size)
    lo, hi = _size_range(n, image_size, object_size)
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


def sample_scene(rng: np.random.Generator, image_size: int = 64, kind: str | None = None,
                 object_size: str = "standard") -> Scene:
    """A random scene of 1-4 shapes; ``kind`` (one of ``SCENE_KINDS``) picks its layout:

    single (1 shape), two (2 distinct shapes), position (2 distinct shapes with one
    unambiguous relation), counting (2-4 shapes of one class), multi (3-4 shapes).
    ``object_size`` (a key of ``OBJECT_SIZES``) sets the objects' size range.
    """
    _check_size(image_size)
    check_object_size(object_size)
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
    objs = _place(rng, specs, image_size, relation=relation, object_size=object_size)
    return Scene(width=image_size, height=image_size, objects=objs, kind=kind,
                 relation=None if relation is None else (1, relation, 0))


def scene_for_metadata(metadata: dict, rng: np.random.Generator, image_size: int = 64,
                       object_size: str = "standard") -> Scene:
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
    objs = _place(rng, specs, image_size, relation=relation, object_size=object_size)
    return Scene(width=image_size, height=image_size, objects=objs, kind="geneval",
                 relation=None if relation is None else (1, relation, 0))
