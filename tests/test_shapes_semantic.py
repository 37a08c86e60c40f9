"""The shapes world's semantic-encoder pretraining: dense patch labels and a short run."""

from __future__ import annotations

import numpy as np
import pytest

from cheers.config import flavour
from cheers.errors import InputError
from cheers.shapes.scenes import COLOURS, SHAPES, Scene, make_object
from cheers.shapes.semantic import patch_labels, train_semantic_encoder


def test_patch_labels_name_the_object_covering_each_patch():
    # a 16 px blue square filling the patches (1..2, 1..2) of a 64 px image (8 px patches),
    # and a red circle of 10 px centred in patch (5, 5)
    square = make_object("square", "blue", (16.0, 16.0), 16.0, 64, 64)
    circle = make_object("circle", "red", (44.0, 44.0), 10.0, 64, 64)
    colour, shape = patch_labels(Scene(64, 64, (square, circle), "two"), 8)
    assert colour.shape == shape.shape == (8, 8)
    want = np.zeros((8, 8), dtype=bool)
    want[1:3, 1:3] = True
    assert (colour[want] == 1 + COLOURS.index("blue")).all()
    assert (shape[want] == 1 + SHAPES.index("square")).all()
    assert colour[5, 5] == 1 + COLOURS.index("red") and shape[5, 5] == 1 + SHAPES.index("circle")
    assert colour[0, 0] == 0 and shape[7, 0] == 0  # background
    # the patch right of it, which the circle's edge barely enters (x 48-49), stays background
    assert colour[5, 6] == 0
    with pytest.raises(InputError, match="multiple of the 8 px patch"):
        patch_labels(Scene(60, 60, (square,), "single"), 8)


@pytest.mark.slow
def test_semantic_pretraining_learns_colours():
    cfg = flavour("shapes").tokenizer.siglip
    encoder, losses, acc = train_semantic_encoder(cfg, None, 64, steps=120, batch=16,
                                                  pool_size=128, seed=0)
    assert len(losses) == 120
    assert np.mean(losses[-10:]) < 0.6 * np.mean(losses[:10])
    # 11 colour classes per object patch: chance is ~0.1
    assert acc["colour"] > 0.5 and acc["background"] > 0.9
    assert not encoder.training
