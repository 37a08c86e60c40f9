"""The Python API the CLIs are thin shells over.

    pipe = Pipeline.from_pretrained("ckpt/")
    images = pipe.generate(["a red circle"], steps=80, cfg_scale=9.5, seed=0)
    answer = pipe.understand(Image.open("x.png"), "What colour is the circle?")
"""

from __future__ import annotations

import math
import numbers
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from cheers.checkpoint import load_pretrained
from cheers.config import ANSWER_TOKENS, EDIT_STRENGTH, SAMPLERS
from cheers.detokenizer import Detokenizer
from cheers.engine import Engine
from cheers.errors import CheckpointError, InputError
from cheers.images import square_tensor
from cheers.sequence import null_prompt
from cheers.text_tokenizer import TextTokenizer


def default_checkpoint() -> Path:
    """Where ``cheers demo`` caches the shapes-world checkpoint (``$CHEERS_HOME``, default ~/.cache/cheers)."""
    home = Path(os.environ.get("CHEERS_HOME", Path.home() / ".cache" / "cheers"))
    return home / "shapes-demo"


def load_image(src: str | Path | Image.Image | torch.Tensor, size: int) -> torch.Tensor:
    """An RGB image resized and centre-cropped to ``size`` -> [3, size, size] in [0, 1]; a tensor
    must already be [3, size, size] in [0, 1]."""
    if torch.is_tensor(src):
        if tuple(src.shape) != (3, size, size):
            raise InputError(f"an image tensor must be [3, {size}, {size}], got {list(src.shape)}")
        return src
    if isinstance(src, Image.Image):
        img = src
    else:
        path = Path(src)
        if not path.is_file():
            raise InputError(f"image not found: {path}")
        try:
            img = Image.open(path)
            img.load()
        except (UnidentifiedImageError, OSError) as e:
            raise InputError(f"cannot read image {path}: {e}") from e
    return square_tensor(img, size)


def to_pil(pixels: torch.Tensor) -> Image.Image:
    """[3, H, W] (any range) -> RGB image, clamped to [0, 1]."""
    arr = (pixels.float().clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255).round().astype(np.uint8)
    return Image.fromarray(arr)


class Pipeline:
    """A loaded model + its text tokenizer, ready for generation, editing and understanding."""

    def __init__(self, model, text_tokenizer: TextTokenizer):
        self.model = model.eval()
        self.text_tokenizer = text_tokenizer
        self.engine = Engine(model)
        self.cfg = model.cfg
        if text_tokenizer.special != self.cfg.tokens:
            raise CheckpointError(
                f"the text tokenizer's special ids {text_tokenizer.special} differ from the model config's {self.cfg.tokens}")

    @classmethod
    def from_pretrained(cls, path: str | Path, *, device: str = "cpu", dtype: torch.dtype = torch.float32,
                        text_tokenizer: str | Path | None = None, lora: str | Path | None = None,
                        weights: str | None = None, offload: str | None = None) -> Pipeline:
        """Load a checkpoint folder. ``lora``: an adapter folder (``cheers export`` of a LoRA run)
        applied on top without merging; ``weights``: ``"int8"`` / ``"fp8"`` weight-only LLM and
        flow-head linears; ``offload``: ``"model"`` / ``"sequential"`` CPU offload onto the GPU
        ``device`` (``cheers.low_memory``)."""
        from cheers.low_memory import check_options

        path = Path(path)
        if not path.is_dir():
            raise CheckpointError(f"checkpoint folder not found: {path}")
        if lora is not None and not Path(lora).is_dir():
            raise CheckpointError(f"LoRA folder not found: {lora}")
        check_options(device, weights, offload)
        if weights is not None and offload is not None:
            raise InputError("weights and offload together are not supported: choose one")
        tok = TextTokenizer.from_dir(text_tokenizer or path)
        model = load_pretrained(path, device="cpu" if offload else device, dtype=dtype, tokens=tok.special)
        if lora is not None:
            from cheers.config import to_dict
            from cheers.lora import load_adapter

            load_adapter(model, lora, model_config=to_dict(model.cfg))
            model.to(device="cpu" if offload else device, dtype=dtype).eval()
        if weights is not None:
            from cheers.low_memory import quantize_weights

            quantize_weights(model, weights)
        if offload is not None:
            from cheers.low_memory import offload as offload_model

            offload_model(model, offload, device)
        pipe = cls(model, tok)
        if offload is not None:  # CUDA graphs would capture weights the hooks move
            pipe.engine = Engine(model, static=False)
        return pipe

    @property
    def image_size(self) -> int:
        return self.cfg.tokenizer.image_size

    # ------------------------------------------------------------------ generation

    def _noise(self, n: int, seed: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        c, s = self.cfg.tokenizer.vae.latent_channels, self.cfg.latent_grid
        return torch.randn(n, c, s, s, generator=g)

    def _dummy(self, seed: int) -> torch.Tensor | None:
        """The official processor's dummy image (uniform noise) before a T2I prompt."""
        if not self.cfg.dummy_image_prefix:
            return None
        g = torch.Generator().manual_seed(seed + 1)
        return torch.randint(0, 256, (3, self.image_size, self.image_size), generator=g).float() / 255

    def sampling_settings(self, steps: int | None = None, cfg_scale: float | None = None,
                          shift: float | None = None) -> tuple[int, float, float]:
        """(steps, cfg_scale, shift), each unset one the checkpoint's ``transport`` setting (the
        released model's 80 / 9.5 / 0.5), checked: ``InputError`` names a bad parameter."""
        tc = self.cfg.transport
        steps = tc.sample_steps if steps is None else steps
        cfg_scale = tc.cfg_scale if cfg_scale is None else cfg_scale
        shift = tc.sample_shift if shift is None else shift
        if isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or steps < 1:
            raise InputError(f"steps must be an integer >= 1, got {steps!r}")
        if not (math.isfinite(cfg_scale) and cfg_scale >= 0):
            raise InputError(f"cfg_scale must be a finite number >= 0, got {cfg_scale!r}")
        if not (math.isfinite(shift) and shift > 0):
            raise InputError(f"shift must be a finite number > 0, got {shift!r}")
        return steps, cfg_scale, shift

    def _settings(self, steps: int | None, cfg_scale: float | None, shift: float | None,
                  sampler: str) -> tuple[int, float, float, str]:
        if sampler not in SAMPLERS:
            raise InputError(f"sampler must be one of {', '.join(SAMPLERS)}, got {sampler!r}")
        return (*self.sampling_settings(steps, cfg_scale, shift), sampler)

    @property
    def max_tokens(self) -> int:
        """The longest sequence the model takes: its ``max_seq_len``, within the LLM's positions."""
        return min(self.cfg.max_seq_len, self.cfg.llm.max_position_embeddings)

    def t2i_rows(self, prompts: list[str]) -> list[list[int]]:
        """Token ids of text-to-image prompts, each checked to fit the model with its image
        block (and the dummy image prefix, when the model has one): an empty list or a prompt
        that is too long is refused here, before any sampling."""
        if not prompts:
            raise InputError("no prompts given")
        extra = self.cfg.tokens_per_image * (2 if self.cfg.dummy_image_prefix else 1)
        rows = []
        for i, prompt in enumerate(prompts):
            if not isinstance(prompt, str):
                raise InputError(f"prompt {i + 1} is a {type(prompt).__name__}, not a string")
            ids = self.text_tokenizer.t2i_prompt(prompt)
            if len(ids) + extra > self.max_tokens:
                raise InputError(
                    f"prompt {i + 1} is too long: {len(ids)} tokens plus the image's {extra} exceed the "
                    f"model's maximum of {self.max_tokens} tokens")
            rows.append(ids)
        return rows

    def i2t_row(self, question: str, n_images: int, history=None) -> list[int]:
        """Token ids of an understanding prompt, checked to fit the model with its images."""
        ids = self.text_tokenizer.i2t_prompt(question, n_images, history=history)
        n = len(ids) - n_images + n_images * self.cfg.tokens_per_image  # each placeholder -> its tokens
        if n >= self.max_tokens:  # at least one token must be left to answer
            raise InputError(f"the question is too long: with its {n_images} image(s) it takes {n} tokens, "
                             f"the model's maximum is {self.max_tokens}")
        return ids

    def _latents(self, rows: list[list[int]], seeds: list[int], settings: tuple[int, float, float, str],
                 start: tuple[torch.Tensor, float] | None, callback: Callable[[int], None] | None) -> torch.Tensor:
        """Latents [B, C, G, G] of checked prompt rows, seed ``seeds[i]`` for row i."""
        steps, cfg_scale, shift, sampler = settings
        nulls = [null_prompt(r, self.cfg) for r in rows]
        noise = torch.cat([self._noise(1, s) for s in seeds])
        dummies = [self._dummy(s) for s in seeds] if self.cfg.dummy_image_prefix else None
        return self.engine.sample_images(rows, nulls, noise=noise, steps=steps, cfg_scale=cfg_scale,
                                         shift=shift, sampler=sampler, prefix_images=dummies,
                                         start=start, callback=callback)

    def _images(self, rows: list[list[int]], seeds: list[int], settings: tuple[int, float, float, str],
                start: tuple[torch.Tensor, float] | None, callback: Callable[[int], None] | None
                ) -> list[Image.Image]:
        lat = self._latents(rows, seeds, settings, start, callback)
        with torch.no_grad():
            pixels = self.model.tokenizer.decode(lat)
        return [to_pil(p) for p in pixels]

    def _start(self, sources: list, strength: float) -> tuple[torch.Tensor, float]:
        """(source latents [B, C, G, G], start time 1 - strength) of an edit batch."""
        if not (isinstance(strength, (int, float)) and 0.0 < strength <= 1.0):
            raise InputError(f"strength must be in (0, 1], got {strength!r}")
        pixels = torch.stack([load_image(s, self.image_size) for s in sources]).to(self.engine.device)
        with torch.no_grad():
            return self.model.tokenizer.encode(pixels), 1.0 - strength

    @staticmethod
    def _check_seeds(seeds: list[int], rows: list) -> None:
        if len(seeds) != len(rows):
            raise InputError(f"seeds has {len(seeds)} entries for {len(rows)} prompts")

    def generate_latents(self, prompts: list[str], *, seeds: list[int], steps: int | None = None,
                         cfg_scale: float | None = None, shift: float | None = None, sampler: str = "euler",
                         start: tuple[torch.Tensor, float] | None = None,
                         callback: Callable[[int], None] | None = None) -> torch.Tensor:
        """Latents [B, C, G, G] of one sampler batch, before the pixel decoder (see ``sample``);
        ``start=(x_src, t0)`` starts from source latents at time t0."""
        rows = self.t2i_rows(prompts)
        self._check_seeds(seeds, rows)
        return self._latents(rows, seeds, self._settings(steps, cfg_scale, shift, sampler), start, callback)

    def sample(self, prompts: list[str], *, seeds: list[int], steps: int | None = None,
               cfg_scale: float | None = None, shift: float | None = None, sampler: str = "euler",
               sources: list | None = None, strength: float = EDIT_STRENGTH,
               callback: Callable[[int], None] | None = None) -> list[Image.Image]:
        """One sampler batch: image i from ``prompts[i]`` and the noise of ``seeds[i]``; with
        ``sources`` (images, paths or [3, S, S] tensors in [0, 1]) image i is an edit of
        ``sources[i]``, started at t = 1 - ``strength``. Unset ``steps`` / ``cfg_scale`` / ``shift``
        are the checkpoint's. ``callback(step)`` runs after each sampler step; an exception it
        raises stops the batch."""
        rows = self.t2i_rows(prompts)
        self._check_seeds(seeds, rows)
        if sources is not None and len(sources) != len(rows):
            raise InputError(f"sources has {len(sources)} images for {len(rows)} prompts")
        settings = self._settings(steps, cfg_scale, shift, sampler)
        start = None if sources is None else self._start(sources, strength)
        return self._images(rows, seeds, settings, start, callback)

    def generate(self, prompts: list[str] | str, *, seed: int = 0, batch_size: int = 8, steps: int | None = None,
                 cfg_scale: float | None = None, shift: float | None = None, sampler: str = "euler",
                 callback: Callable[[int], None] | None = None) -> list[Image.Image]:
        """One image per prompt, sampled ``batch_size`` at a time; prompt i uses seed ``seed + i``.
        Unset ``steps`` / ``cfg_scale`` / ``shift`` are the checkpoint's (``sampling_settings``)."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        rows = self.t2i_rows(prompts)  # every prompt checked before the first batch samples
        settings = self._settings(steps, cfg_scale, shift, sampler)
        if isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral) or batch_size < 1:
            raise InputError(f"batch_size must be an integer >= 1, got {batch_size!r}")
        out: list[Image.Image] = []
        for i in range(0, len(rows), batch_size):
            chunk = rows[i:i + batch_size]
            out += self._images(chunk, [seed + i + j for j in range(len(chunk))], settings, None, callback)
        return out

    def edit(self, image, prompt: str, *, strength: float = EDIT_STRENGTH, seed: int = 0, steps: int | None = None,
             cfg_scale: float | None = None, shift: float | None = None, sampler: str = "euler",
             callback: Callable[[int], None] | None = None) -> Image.Image:
        """Regenerate ``image`` guided by ``prompt``, starting at t = 1 - strength from its latent
        (the paper's recipe: strength 0.9, i.e. t = 0.1)."""
        return self.sample([prompt], seeds=[seed], steps=steps, cfg_scale=cfg_scale, shift=shift, sampler=sampler,
                           sources=[image], strength=strength, callback=callback)[0]

    # ------------------------------------------------------------------ understanding

    def stream(self, images: list, question: str, *, max_new_tokens: int = ANSWER_TOKENS, temperature: float = 0.0,
               top_p: float = 1.0, seed: int = 0, history=None) -> Iterator[str]:
        """Yield the answer piece by piece as tokens are decoded (streaming): greedy at
        ``temperature`` 0, else nucleus sampling over ``top_p`` of the probability."""
        ids = self.i2t_row(question, len(images), history=history)
        if not (math.isfinite(temperature) and temperature >= 0):
            raise InputError(f"temperature must be a finite number >= 0, got {temperature!r}")
        if not 0.0 < top_p <= 1.0:
            raise InputError(f"top_p must be in (0, 1], got {top_p!r}")
        pix = [load_image(im, self.image_size) for im in images]
        stop = {self.cfg.tokens.eos, self.cfg.tokens.pad}
        g = torch.Generator(device=self.engine.device).manual_seed(seed)
        detok = Detokenizer(self.text_tokenizer)
        for nxt in self.engine.decode_text([ids], [pix], max_new_tokens=max_new_tokens, stop_ids=stop,
                                           temperature=temperature, top_p=top_p, generator=g):
            tok = int(nxt[0])
            if tok in stop:
                break
            if piece := detok.push(tok):
                yield piece
        if tail := detok.flush():
            yield tail

    def understand(self, image, question: str, *, max_new_tokens: int = ANSWER_TOKENS, temperature: float = 0.0,
                   top_p: float = 1.0, seed: int = 0, history=None) -> str:
        """The answer to ``question`` about ``image`` (one image or a list), as ``stream`` decodes it."""
        images = image if isinstance(image, list) else [image]
        return "".join(self.stream(images, question, max_new_tokens=max_new_tokens, temperature=temperature,
                                   top_p=top_p, seed=seed, history=history)).strip()
