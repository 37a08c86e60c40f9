"""The shapes world: a procedural image-text world that needs no downloads, so every command runs on a CPU."""

from cheers.shapes.scenes import (
    BACKGROUND,
    COLOURS,
    PALETTE,
    RELATIONS,
    SHAPES,
    Scene,
    ShapeObject,
    make_object,
    object_masks,
    relation_set,
    render,
    sample_scene,
    scene_for_metadata,
)
from cheers.shapes.texts import (
    GENEVAL_TAGS,
    MMBENCH_L2,
    caption,
    format_mmbench_prompt,
    geneval_metadata,
    geneval_record,
    mmbench_questions,
    noun_phrase,
    text_sample,
)

__all__ = [
    "BACKGROUND", "COLOURS", "GENEVAL_TAGS", "MMBENCH_L2", "PALETTE", "RELATIONS", "SHAPES",
    "Scene", "ShapeObject", "caption", "format_mmbench_prompt", "geneval_metadata",
    "geneval_record", "make_object", "mmbench_questions", "noun_phrase", "object_masks",
    "relation_set", "render", "sample_scene", "scene_for_metadata", "text_sample",
]
