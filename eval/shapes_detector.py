"""An exact analytic detector for shapes-world images (no learned weights).

Pipeline: each pixel takes its nearest palette colour (the ten GenEval colours plus
the grey background); a 3x3 majority vote cleans the foreground; its 8-connected
components are the objects, except that a component holding two colours with solid
cores of their own (touching objects) is split by colour; components under
``min_area`` are dropped. Each object's coverage (its pixels projected on the
background-to-colour line) gives sub-pixel geometry: fill of the box, solidity
against the convex hull, the widths near the top and bottom, and up-down symmetry;
the nearest per-shape prototype names the shape.

Robust to what a generative model does to a picture at small scale: Gaussian pixel
noise, slight blur, ragged edges, and anti-aliased edges whose blended colours would
read as a third colour (such a blend is a 1-2 px ring with no core, so it never
becomes an object of its own and the object keeps its colour).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from cheers.errors import InputError
from cheers.shapes.scenes import BACKGROUND, COLOURS, PALETTE, SHAPES

_PALETTE = np.array([PALETTE[c] for c in COLOURS] + [BACKGROUND], dtype=np.float32)  # [11, 3]
_BG = len(COLOURS)

# Per shape, the mean and the allowed spread (1.25 x the measured standard deviation, at
# least 0.03) of each feature, measured on renders of 16 px to 0.45 x image-size shapes at
# 64-256 px, clean and blurred (sigma <= 1 px) with noise. vsym parts star from cross
# (0.47 vs 0.94), bottom parts triangle from star (1.0 vs 0.49).
_FEATURES = ("fill", "solidity", "top", "bottom", "vsym")
_PROTOTYPES: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "circle": ((0.795, 0.966, 0.714, 0.717, 0.953), (0.030, 0.030, 0.039, 0.041, 0.036)),
    "square": ((0.999, 0.990, 0.994, 0.995, 0.958), (0.030, 0.030, 0.030, 0.030, 0.032)),
    "triangle": ((0.557, 0.943, 0.202, 0.998, 0.376), (0.048, 0.035, 0.033, 0.030, 0.040)),
    "star": ((0.563, 0.647, 0.171, 0.492, 0.474), (0.072, 0.073, 0.040, 0.057, 0.037)),
    "cross": ((0.558, 0.748, 0.334, 0.334, 0.937), (0.030, 0.030, 0.030, 0.030, 0.045)),
}


@dataclass(kw_only=True)
class DetectorConfig:
    """Knobs of ``detect``; areas are fractions of the image area."""

    min_area: float = 0.004  # smallest object kept (the smallest star, 16 px on 64 px, is ~0.02)
    min_core_fraction: float = 0.15  # a second colour splits a component if its core is this big
    colour_tolerance: float = 60.0  # RGB distance within which a pixel counts as confidently coloured


def _to_rgb(image) -> np.ndarray:
    """float32 [H, W, 3] in 0..255 from a PIL image, uint8 array or float array in [0, 1]."""
    if hasattr(image, "convert"):  # PIL
        image = np.asarray(image.convert("RGB"))
    arr = np.asarray(image)
    if arr.ndim != 3 or arr.shape[2] not in (3, 4):
        raise InputError(f"image of shape {arr.shape}; expected [H, W, 3] RGB")
    arr = arr[..., :3]
    if arr.dtype == np.uint8:
        return arr.astype(np.float32)
    if np.issubdtype(arr.dtype, np.floating):
        if arr.size and (arr.min() < -1e-3 or arr.max() > 1.0 + 1e-3):
            raise InputError(f"float image with values in [{arr.min()}, {arr.max()}]; expected [0, 1]")
        return arr.astype(np.float32) * 255.0
    raise InputError(f"image dtype {arr.dtype}; expected uint8 or float in [0, 1]")


def _shift(a: np.ndarray, dy: int, dx: int, fill) -> np.ndarray:
    """``out[y, x] = a[y + dy, x + dx]``, ``fill`` outside."""
    out = np.full_like(a, fill)
    h, w = a.shape
    ys, yd = (slice(dy, h), slice(0, h - dy)) if dy >= 0 else (slice(0, h + dy), slice(-dy, h))
    xs, xd = (slice(dx, w), slice(0, w - dx)) if dx >= 0 else (slice(0, w + dx), slice(-dx, w))
    out[yd, xd] = a[ys, xs]
    return out


_NEIGHBOURS_8 = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dy, dx) != (0, 0)]


def label_components(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """8-connected components of a bool [H, W] mask: (int32 labels, 0 = outside, 1..n; n).

    Min-label propagation with pointer jumping, all in numpy; labels are numbered in
    raster order of each component's first pixel.
    """
    mask = np.asarray(mask, dtype=bool)
    h, w = mask.shape
    big = h * w
    lab = np.where(mask, np.arange(h * w, dtype=np.int64).reshape(h, w), big)
    while True:
        new = lab.copy()
        for dy, dx in _NEIGHBOURS_8:
            np.minimum(new, _shift(lab, dy, dx, big), out=new)
        new[~mask] = big
        flat = new[mask]
        for _ in range(4):  # pointer jumping: a label is a pixel index with a smaller label
            flat = np.minimum(flat, new.reshape(-1)[flat])
        new[mask] = flat
        if np.array_equal(new, lab):
            break
        lab = new
    out = np.zeros((h, w), dtype=np.int32)
    roots = np.unique(lab[mask])
    out[mask] = np.searchsorted(roots, lab[mask]) + 1
    return out, len(roots)


def _erode(mask: np.ndarray) -> np.ndarray:
    out = mask.copy()
    for dy, dx in _NEIGHBOURS_8:
        out &= _shift(mask, dy, dx, False)
    return out


def _majority(mask: np.ndarray) -> np.ndarray:
    """3x3 majority vote (>= 5 of 9): drops the lone pixels that noise flips along an edge
    half covered by a shape, and specks; costs each convex corner one pixel."""
    count = mask.astype(np.int32)
    for dy, dx in _NEIGHBOURS_8:
        count = count + _shift(mask, dy, dx, False)
    return count >= 5


def _hull_area(mask: np.ndarray) -> float:
    """Area of the convex hull of the pixel squares of a bool mask (monotone chain)."""
    ys, xs = np.nonzero(mask)
    rows = np.unique(ys)
    left = np.array([xs[ys == r].min() for r in rows], dtype=np.float64)
    right = np.array([xs[ys == r].max() for r in rows], dtype=np.float64) + 1.0
    r = rows.astype(np.float64)
    pts = np.concatenate([
        np.stack([left, r], 1), np.stack([left, r + 1], 1),
        np.stack([right, r], 1), np.stack([right, r + 1], 1),
    ])
    pts = np.unique(pts, axis=0)  # sorted by x then y
    if len(pts) < 3:
        return float(mask.sum())

    def cross(o, a, b):
        return (a[0] - o[0]) * (b[1] - o[1]) - (a[1] - o[1]) * (b[0] - o[0])

    lower: list = []
    for p in pts:
        while len(lower) >= 2 and cross(lower[-2], lower[-1], p) <= 0:
            lower.pop()
        lower.append(p)
    upper: list = []
    for p in pts[::-1]:
        while len(upper) >= 2 and cross(upper[-2], upper[-1], p) <= 0:
            upper.pop()
        upper.append(p)
    hull = np.array(lower[:-1] + upper[:-1])
    x, y = hull[:, 0], hull[:, 1]
    return float(0.5 * abs(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))))


def _dilate(mask: np.ndarray) -> np.ndarray:
    out = mask.copy()
    for dy, dx in _NEIGHBOURS_8:
        out |= _shift(mask, dy, dx, False)
    return out


def shape_features(mask: np.ndarray, alpha: np.ndarray | None = None) -> dict[str, float]:
    """Geometry of one object from its bool [H, W] mask and, when given, its float [H, W]
    coverage ``alpha`` in [0, 1] (zero away from the object), which makes areas and widths
    sub-pixel exact where the mask's edge is ragged.

    fill: coverage area / (widest row x tallest column); solidity: mask area / convex-hull
    area of the mask; top, bottom: the widest row within the top and bottom sixth of the
    mask's box (and the partly covered row beyond it), as a fraction of the widest row;
    vsym: soft IoU of the coverage and its upside-down flip (blur keeps it: ~1 for circle,
    square, cross; ~0.4 for star and triangle); aspect: the mask's box width / height.
    """
    ys, xs = np.nonzero(mask)
    x0, x1, y0, y1 = xs.min(), xs.max() + 1, ys.min(), ys.max() + 1
    if alpha is None:
        alpha = mask.astype(np.float64)
    # a one-pixel margin holds the partly covered edge pixels
    ca = np.pad(alpha.astype(np.float64), 1)[y0:y1 + 2, x0:x1 + 2]
    rows, cols = ca.sum(axis=1), ca.sum(axis=0)
    width, height = max(rows.max(), 1e-6), max(cols.max(), 1e-6)
    h = y1 - y0
    band = max(1, int(round(h / 6.0)))
    flipped = ca[::-1]
    return {
        "fill": float(ca.sum()) / float(width * height),
        "solidity": float(len(xs)) / max(_hull_area(mask[y0:y1, x0:x1]), 1.0),
        # the max, not the mean, so a lost or gained ragged edge row changes little
        "top": float(rows[: band + 1].max() / width),
        "bottom": float(rows[-band - 1:].max() / width),
        "vsym": float(np.minimum(ca, flipped).sum() / max(np.maximum(ca, flipped).sum(), 1e-6)),
        "aspect": float((x1 - x0) / h),
    }


def classify_shape(features: dict[str, float]) -> tuple[str, float]:
    """(nearest prototype shape, score in [0, 1]); the score falls with the scaled distance
    to the prototype and with a small margin over the runner-up."""
    f = np.array([features[k] for k in _FEATURES], dtype=np.float64)
    names = list(_PROTOTYPES)
    means = np.array([_PROTOTYPES[n][0] for n in names], dtype=np.float64)  # [5 shapes, 5]
    spreads = np.array([_PROTOTYPES[n][1] for n in names], dtype=np.float64)
    d = np.sqrt((((means - f) / spreads) ** 2).sum(axis=1))  # in spreads
    order = np.argsort(d)
    best, second = d[order[0]], d[order[1]]
    # full score within 4 spreads (a typical 5-feature distance is 2.2), then a Gaussian fall
    fit = float(np.exp(-0.5 * (max(best - 4.0, 0.0) / 2.0) ** 2))
    margin = float(np.clip((second - best) / 3.0, 0.0, 1.0))  # runner-up >= 3 spreads further
    aspect = features.get("aspect", 1.0)
    shape_ok = float(np.exp(-0.5 * (max(abs(np.log(aspect)) - 0.15, 0.0) / 0.1) ** 2))
    return names[order[0]], fit * margin * shape_ok


def detect(image, config: DetectorConfig | None = None) -> list[dict]:
    """Detect the shapes in an image.

    Args:
        image: PIL image, uint8 [H, W, 3] array, or float [H, W, 3] in [0, 1].
    Returns:
        Detections sorted by score (highest first), each
        ``{"class": shape, "colour": colour name, "box": [x0, y0, x1, y1] (pixels, exclusive
        ends), "mask": bool [H, W], "score": float in [0, 1], "area": int (pixels),
        "features": shape_features}``. The score is the shape fit times the share of
        confidently coloured pixels; clean renders score > 0.9.
    """
    cfg = config or DetectorConfig()
    rgb = _to_rgb(image)
    h, w, _ = rgb.shape
    dist = np.linalg.norm(rgb[:, :, None, :] - _PALETTE[None, None], axis=-1)  # [H, W, 11]
    label = dist.argmin(axis=-1)
    near = dist.min(axis=-1)
    fg = _majority(label != _BG)
    comps, n = label_components(fg)
    min_area = max(4.0, cfg.min_area * h * w)
    objects: list[tuple[np.ndarray, int]] = []  # (mask, colour index)
    for k in range(1, n + 1):
        comp = comps == k
        if comp.sum() < min_area:
            continue
        # colours with a solid, confidently coloured core inside this component
        cores = {}
        for c in np.unique(label[comp]):
            core = _erode(comp & (label == c)) & (near < cfg.colour_tolerance)
            cores[int(c)] = int(core.sum())
        total = max(sum(cores.values()), 1)
        real = [c for c, v in cores.items() if v >= max(2, cfg.min_core_fraction * total)]
        if not real:
            real = [max(cores, key=cores.get)]
        if len(real) == 1:
            objects.append((comp, real[0]))
            continue
        # touching objects of different colours: give each pixel to the nearest real colour
        sub = np.argmin(dist[..., real], axis=-1)
        for i, c in enumerate(real):
            part = comp & (sub == i)
            plab, pn = label_components(part)
            for j in range(1, pn + 1):
                piece = plab == j
                if piece.sum() >= min_area:
                    objects.append((piece, c))
    every = np.zeros((h, w), dtype=bool)
    for mask, _ in objects:
        every |= mask
    dets = []
    for mask, c in objects:
        # coverage by projecting onto the background->colour line, near this object only
        v = _PALETTE[c] - _PALETTE[_BG]
        alpha = np.clip((rgb - _PALETTE[_BG]) @ v / float(v @ v), 0.0, 1.0)
        alpha = np.where(_dilate(mask) & ~(every & ~mask), alpha, 0.0)
        feats = shape_features(mask, alpha)
        shape, score = classify_shape(feats)
        inside = near[mask] < cfg.colour_tolerance
        # the share of confidently coloured pixels; edges of a blurred shape are not
        colour_score = float(np.clip(inside.mean() / 0.5, 0.0, 1.0))
        ys, xs = np.nonzero(mask)
        dets.append({
            "class": shape,
            "colour": COLOURS[c],
            "box": [float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)],
            "mask": mask,
            "score": score * colour_score,
            "area": int(mask.sum()),
            "features": feats,
        })
    dets.sort(key=lambda d: -d["score"])
    return dets


def matches_ground_truth(detections: list[dict], objects, centre_tolerance: float = 2.0,
                         min_score: float = 0.0) -> bool:
    """Whether detections (``detect`` output) recover a scene's objects exactly: one
    detection per object with its class and colour, box centres within
    ``centre_tolerance`` pixels, and no other detection above ``min_score``.

    ``objects`` are ``cheers.shapes.scenes.ShapeObject``s or their ``to_dict()`` dicts.
    """
    dets = [d for d in detections if d["score"] > min_score]
    gts = [o.to_dict() if hasattr(o, "to_dict") else o for o in objects]
    if len(dets) != len(gts):
        return False
    free = list(range(len(dets)))
    for gt in gts:
        cx, cy = gt["centre"]
        best, best_d = None, centre_tolerance
        for i in free:
            x0, y0, x1, y1 = dets[i]["box"]
            dist = float(np.hypot((x0 + x1) / 2.0 - cx, (y0 + y1) / 2.0 - cy))
            if dist <= best_d and dets[i]["class"] == gt["class"] and dets[i]["colour"] == gt["colour"]:
                best, best_d = i, dist
        if best is None:
            return False
        free.remove(best)
    return True


__all__ = ["DetectorConfig", "SHAPES", "classify_shape", "detect", "label_components",
           "matches_ground_truth", "shape_features"]
