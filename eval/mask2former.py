"""GenEval's object detector: Mask2Former Swin-S (COCO) through mmdetection 2.x.

The official scorer calls ``mmdet.apis.inference_detector`` and reads, per class index,
an ``[N, 5]`` array of ``x0, y0, x1, y1, score`` and (instance segmentation) N masks; the
class names come from GenEval's ``evaluation/object_names.txt`` (COCO's 80 classes in
GenEval's spelling: "computer mouse", "tv remote", ...), which the user passes as a file.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from cheers.errors import InputError
from cheers.eval.external import require_file, require_module

OFFICIAL_CONFIG = "configs/mask2former/mask2former_swin-s-p4-w7-224_lsj_8x2_50e_coco.py"


def detections_from_mmdet(result, class_names: list[str]) -> list[dict]:
    """mmdet 2.x output (``bbox`` per class, or ``(bbox, segm)``) -> detections of the
    ``cheers.eval.geneval_rules`` interface, in the detector's order per class."""
    bbox = result[0] if isinstance(result, tuple) else result
    segm = result[1] if isinstance(result, tuple) and len(result) > 1 else None
    if len(bbox) != len(class_names):
        raise InputError(
            f"the detector returns {len(bbox)} classes but the class-names file "
            f"has {len(class_names)}"
        )
    dets = []
    for index, name in enumerate(class_names):
        boxes = np.asarray(bbox[index]).reshape(-1, 5)
        for j, row in enumerate(boxes):
            mask = None if segm is None else np.asarray(segm[index][j], dtype=bool)
            dets.append(
                {
                    "class": name,
                    "box": [float(v) for v in row[:4]],
                    "score": float(row[4]),
                    "mask": mask,
                }
            )
    return dets


def load_mask2former(
    config: str | None, ckpt: str | None, class_names: str | None, *, device: str = "cpu"
) -> Callable:
    """``detector(PIL image) -> detections`` over local files; MissingModelError naming the
    missing package or file otherwise."""
    require_module(
        "mmdet",
        "GenEval's Mask2Former detector",
        "mmdetection 2.x with mmcv-full, as in GenEval's environment.yml",
    )
    apis = require_module(
        "mmdet.apis", "GenEval's Mask2Former detector", "mmdetection 2.x with mmcv-full"
    )
    cfg = require_file(
        config,
        "--detector-config",
        f"the Mask2Former config ({OFFICIAL_CONFIG} of mmdetection 2.x)",
    )
    weights = require_file(
        ckpt,
        "--detector-ckpt",
        "the Mask2Former Swin-S COCO checkpoint "
        "(mask2former_swin-s-p4-w7-224_lsj_8x2_50e_coco.pth)",
    )
    names_file = require_file(class_names, "--class-names", "GenEval's evaluation/object_names.txt")
    names = [ln.strip() for ln in Path(names_file).read_text().splitlines() if ln.strip()]
    model = apis.init_detector(str(cfg), str(weights), device=device)

    def detect(image) -> list[dict]:
        bgr = np.ascontiguousarray(np.asarray(image.convert("RGB"))[:, :, ::-1])  # mmcv reads BGR
        return detections_from_mmdet(apis.inference_detector(model, bgr), names)

    return detect


__all__ = ["OFFICIAL_CONFIG", "detections_from_mmdet", "load_mask2former"]
