"""Image preprocessing shared by training and inference, so both see images the same way."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image


def square_tensor(img: Image.Image, size: int) -> torch.Tensor:
    """RGB image -> ``[3, size, size]`` float32 in [0, 1]: short side resized to ``size``
    (bicubic), then centre-cropped."""
    img = img.convert("RGB")
    w, h = img.size
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    if (nw, nh) != (w, h):
        img = img.resize((nw, nh), Image.Resampling.BICUBIC)
    left, top = (nw - size) // 2, (nh - size) // 2
    img = img.crop((left, top, left + size, top + size))
    arr = np.asarray(img, dtype=np.uint8)  # [H, W, 3]
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(255.0)
