"""GenEval's colour classifier: zero-shot CLIP on the masked object crop.

As the official ``evaluate_images.py`` does it: the object's pixels (its mask) over a
``#999`` grey canvas, cropped to its box, go through CLIP's image preprocessing; the
class is the argmax over the ten colours of ``100 * image_feature @ text_classifier``,
where each colour's text embedding is the renormalised mean of the normalised
embeddings of three templates ("a photo of a {c} {classname}", "a photo of a
{c}-colored {classname}", "a photo of a {c} object"; clip_benchmark's
``zero_shot_classifier``). The official model is open_clip ``ViT-L-14`` with OpenAI's
weights, loaded here from a local file.
"""

from __future__ import annotations

from collections.abc import Callable

from cheers.eval.external import require_file, require_module
from cheers.eval.geneval_rules import CLIP_COLOR_TEMPLATES, COLORS, masked_crop


class ClipColourClassifier:
    """``(image, detections, classname) -> colour names``: GenEval's colour rule.

    ``model`` has ``encode_text(tokens)`` and ``encode_image(pixels)``; ``preprocess`` maps
    a PIL image to a [3, H, W] tensor; ``tokenizer`` maps a list of strings to tokens.
    """

    def __init__(
        self,
        model,
        preprocess: Callable,
        tokenizer: Callable,
        *,
        device: str = "cpu",
        bgcolor: str = "#999",
    ):
        self.model, self.preprocess, self.tokenizer = model, preprocess, tokenizer
        self.device, self.bgcolor = device, bgcolor
        self._classifiers: dict = {}

    def text_classifier(self, classname: str):
        """[D, 10] text embeddings of the ten colours for this class name."""
        import torch
        import torch.nn.functional as F

        if classname not in self._classifiers:
            columns = []
            with torch.no_grad():
                for colour in COLORS:
                    texts = [
                        t.format(classname=classname).format(c=colour) for t in CLIP_COLOR_TEMPLATES
                    ]
                    emb = self.model.encode_text(self.tokenizer(texts).to(self.device)).float()
                    emb = F.normalize(emb, dim=-1).mean(dim=0)
                    columns.append(emb / emb.norm())
            self._classifiers[classname] = torch.stack(columns, dim=1)
        return self._classifiers[classname]

    def __call__(self, image, objects: list, classname: str) -> list[str]:
        import torch
        import torch.nn.functional as F

        if not objects:
            return []
        crops = [masked_crop(image, d["box"], d.get("mask"), bgcolor=self.bgcolor) for d in objects]
        pixels = torch.stack([self.preprocess(c) for c in crops]).to(self.device)
        with torch.no_grad():
            feats = F.normalize(self.model.encode_image(pixels).float(), dim=-1)  # [N, D]
            logits = 100.0 * feats @ self.text_classifier(classname)  # [N, 10]
        return [COLORS[int(i)] for i in logits.argmax(dim=1)]


def load_clip_colour_classifier(
    ckpt: str | None, *, arch: str = "ViT-L-14", device: str = "cpu"
) -> ClipColourClassifier:
    """The official colour classifier from a local open_clip checkpoint file (OpenAI's
    ViT-L-14 weights, e.g. ``open_clip_pytorch_model.bin`` / ``ViT-L-14.pt``)."""
    open_clip = require_module(
        "open_clip", "GenEval's CLIP colour classifier", "pip install open_clip_torch"
    )
    path = require_file(ckpt, "--clip-ckpt", f"the CLIP {arch} weights (OpenAI)")
    model, _, preprocess = open_clip.create_model_and_transforms(
        arch, pretrained=str(path), device=device
    )
    model.eval()
    return ClipColourClassifier(model, preprocess, open_clip.get_tokenizer(arch), device=device)


__all__ = ["ClipColourClassifier", "load_clip_colour_classifier"]
