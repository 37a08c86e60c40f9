"""Request parsing: OpenAI-style JSON (or an edit's form fields) -> checked, typed requests.

Everything a request can get wrong is found here, before it is queued, so a bad request never
reaches the model or a batch that other requests share. Each error names the field at fault
(OpenAI's ``param``, e.g. ``messages[0].content[1].image_url.url``).
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import math
import secrets
from dataclasses import dataclass, field

import torch
from PIL import Image, UnidentifiedImageError

from cheers.config import EDIT_STRENGTH
from cheers.errors import InputError
from cheers.images import square_tensor
from cheers.sequence import UND_PLACEHOLDER
from cheers.serve.config import ServeConfig
from cheers.serve.errors import APIError, bad_request
from cheers.text_tokenizer import DEFAULT_SYSTEM

SEED_MIN, SEED_MAX = -(2**63), 2**62  # torch generators take any 64-bit seed; room for seed + i of n images
JSON_DEPTH = 32  # OpenAI's bodies nest a few levels; deeper is an attack on the parser
# the formats an upload may be, by the magic bytes that open them: Pillow runs no other plugin
IMAGE_FORMATS = {"PNG": ("image/png",), "JPEG": ("image/jpeg", "image/jpg"), "WEBP": ("image/webp",),
                 "GIF": ("image/gif",)}

# parameters of OpenAI's chat API the server does not honour, with the value that means "off"
CHAT_NEUTRAL = {"presence_penalty": 0, "frequency_penalty": 0, "logit_bias": {}, "logprobs": False,
                "top_logprobs": 0, "tools": [], "functions": [], "tool_choice": "none", "audio": None,
                "modalities": ["text"], "parallel_tool_calls": None, "top_k": -1, "store": False}
CHAT_KEYS = {"model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "stop", "stream",
             "stream_options", "seed", "n", "user", "response_format", "metadata", "service_tier", *CHAT_NEUTRAL}
IMAGE_NEUTRAL = {"quality": "auto", "background": "auto", "moderation": "auto"}
IMAGE_KEYS = {"model", "prompt", "n", "size", "response_format", "output_format", "seed", "steps",
              "guidance_scale", "shift", "user", "strength", "mask", *IMAGE_NEUTRAL}


@dataclass
class ChatRequest:
    """A chat completion: the prompt's token ids (-200 where an image goes) and its images."""

    ids: list[int]
    images: list[torch.Tensor]  # each [3, S, S] in [0, 1]
    prompt_tokens: int  # with every image expanded into its tokens
    max_tokens: int
    temperature: float
    top_p: float
    seed: int
    stop: list[str] = field(default_factory=list)
    stream: bool = False
    include_usage: bool = False


@dataclass
class ImageRequest:
    """``n`` images of one prompt; image ``i`` uses seed ``seed + i`` (as ``Pipeline.generate``)."""

    prompt: str
    n: int
    seed: int
    steps: int
    cfg_scale: float
    shift: float
    source: torch.Tensor | None = None  # [3, S, S] in [0, 1]: the image an edit starts from
    strength: float | None = None

    @property
    def seeds(self) -> list[int]:
        return [self.seed + i for i in range(self.n)]

    @property
    def batch_key(self) -> tuple:
        """Requests with equal keys can share one sampler batch."""
        return (self.steps, self.cfg_scale, self.shift, self.strength)


# --------------------------------------------------------------------------- fields


def _integer(body: dict, key: str, default: int | None, lo: int, hi: int, *,
             limit_code: str | None = None) -> int | None:
    v = body.get(key)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, int):
        raise bad_request(f"'{key}' must be an integer, got {v!r}", key)
    if v < lo:
        raise bad_request(f"'{key}' must be >= {lo}, got {v}", key)
    if v > hi:
        raise bad_request(f"'{key}' is {v}, over this server's limit of {hi}", key, code=limit_code)
    return v


def _number(body: dict, key: str, default: float | None, lo: float, hi: float, *,
            lo_open: bool = False) -> float | None:
    v = body.get(key)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise bad_request(f"'{key}' must be a finite number, got {v!r}", key)
    if v < lo or (lo_open and v == lo) or v > hi:
        interval = f"{'(' if lo_open else '['}{lo}, {hi}]"
        raise bad_request(f"'{key}' must be in {interval}, got {v}", key)
    return float(v)


def _choice(body: dict, key: str, allowed: tuple, reason: str) -> None:
    v = body.get(key)
    if v is not None and v not in allowed:
        raise bad_request(f"'{key}'={v!r} is not supported: {reason}", key)


def check_model(body: dict, model_name: str) -> None:
    """An absent model means the one served; another name is a 404, as OpenAI answers it."""
    model = body.get("model")
    if model is None:
        return
    if not isinstance(model, str):
        raise bad_request(f"'model' must be a string, got {model!r}", "model")
    if model != model_name:
        raise APIError(404, f"the model {model!r} does not exist; this server serves {model_name!r}",
                       param="model", code="model_not_found")


def _seed(body: dict) -> int:
    seed = _integer(body, "seed", None, SEED_MIN, SEED_MAX)
    return secrets.randbelow(2**31) if seed is None else seed


def _known(body: dict, keys: set[str], neutral: dict, route: str) -> None:
    """Refuse a parameter the server would otherwise ignore: unknown, or set to anything but off."""
    for key, value in body.items():
        if key not in keys:
            raise bad_request(f"unrecognized request argument {key!r} for {route}", key, code="unsupported_parameter")
        if key in neutral and value is not None and value != neutral[key] and not (key == "top_k" and value == 0):
            raise bad_request(f"{key!r}={value!r} is not supported by this server; leave it out", key,
                              code="unsupported_parameter")


def separators(chunk: bytes) -> int:
    """JSON's separators in ``chunk`` (``,`` ``[`` ``{``, strings' included): a cheap upper bound
    on the values a body holds, counted as it arrives."""
    return chunk.count(b",") + chunk.count(b"[") + chunk.count(b"{")


def too_complex(count: int, limit: int) -> APIError:
    return bad_request(f"the request body holds {count} JSON separators (',', '[', '{{'), over this server's "
                       f"limit of {limit}", code="json_too_complex")


def parse_json(raw: bytes) -> dict:
    """A request body -> its JSON object; nesting deeper than ``JSON_DEPTH`` is refused."""
    if not raw:
        raise bad_request("the request body is empty; expected a JSON object", code="invalid_json")
    try:
        body = json.loads(raw)
    except RecursionError as e:
        raise bad_request(f"the request body nests JSON deeper than this server's limit of {JSON_DEPTH}",
                          code="json_too_deep") from e
    except (ValueError, UnicodeDecodeError) as e:
        raise bad_request(f"the request body is not valid JSON: {e}", code="invalid_json") from e
    if not isinstance(body, dict):
        raise bad_request(f"expected a JSON object, got a JSON {type(body).__name__}", code="invalid_json")
    level = [body]
    for _ in range(JSON_DEPTH):
        level = [c for v in level for c in (v.values() if isinstance(v, dict) else v) if isinstance(c, (dict, list))]
        if not level:
            return body
    raise bad_request(f"the request body nests JSON deeper than this server's limit of {JSON_DEPTH}",
                      code="json_too_deep")


# --------------------------------------------------------------------------- images


def sniff_format(raw: bytes) -> str | None:
    """The allowed format (a key of ``IMAGE_FORMATS``) whose magic bytes open ``raw``, or None."""
    if raw.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if raw.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if raw[:4] == b"RIFF" and raw[8:12] == b"WEBP":
        return "WEBP"
    if raw[:6] in (b"GIF87a", b"GIF89a"):
        return "GIF"
    return None


def open_image(raw: bytes, param: str, max_pixels: int, declared: str | None = None) -> Image.Image:
    """Bytes -> a loaded PIL image, refusing what is not a PNG, JPEG, WebP or GIF (by its magic
    bytes, before Pillow looks at it, and by Pillow's plugins of those four alone), what is not
    the ``declared`` media type, or has too many pixels (the size is read from the header,
    before any pixel is decoded)."""
    kind = sniff_format(raw)
    if kind is None:
        raise bad_request(f"{param}: the data is not a PNG, JPEG, WebP or GIF image, the formats this server "
                          "reads", param, code="invalid_image")
    if declared is not None and declared not in IMAGE_FORMATS[kind]:
        raise bad_request(f"{param}: the data URI says {declared} but the data is a {kind} image", param,
                          code="invalid_image_format")
    try:
        img = Image.open(io.BytesIO(raw), formats=[kind])
    except Image.DecompressionBombError as e:
        raise bad_request(f"{param}: {e}", param, code="image_too_large") from e
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise bad_request(f"{param}: the data is not an image in a format the server reads ({e})",
                          param, code="invalid_image") from e
    w, h = img.size
    if w * h > max_pixels:
        raise bad_request(f"{param}: the image is {w}x{h} = {w * h} pixels, over this server's limit of "
                          f"{max_pixels}", param, code="image_too_large")
    try:
        img.load()
    except (OSError, ValueError, SyntaxError) as e:
        raise bad_request(f"{param}: the image data is corrupt ({e})", param, code="invalid_image") from e
    return img


def decode_image_url(url, param: str, max_pixels: int) -> Image.Image:
    """A ``data:image/...;base64,...`` URI -> a PIL image. The server fetches nothing, so
    ``http(s)`` URLs are refused."""
    if not isinstance(url, str):
        raise bad_request(f"{param} must be a string, got {type(url).__name__}", param)
    head = url[:12].lower()
    if head.startswith(("http://", "https://")):
        raise bad_request(f"{param}: the server fetches nothing, so image URLs are not supported; send "
                          "the image inline as a data URI (data:image/png;base64,...)", param,
                          code="image_url_not_supported")
    if not head.startswith("data:"):
        raise bad_request(f"{param}: expected a data URI (data:image/png;base64,...), got {url[:40]!r}",
                          param, code="invalid_image_url")
    header, comma, data = url.partition(",")
    parts = [p.strip().lower() for p in header[len("data:"):].split(";")]
    mime = parts[0] or "text/plain"
    if not comma or not mime.startswith("image/"):
        raise bad_request(f"{param}: a data URI of media type {mime!r} is not an image; expected "
                          "data:image/...;base64,...", param, code="invalid_image_format")
    allowed = {m for names in IMAGE_FORMATS.values() for m in names}
    if mime not in allowed:
        raise bad_request(f"{param}: images of type {mime} are not accepted; send image/png, image/jpeg, "
                          "image/webp or image/gif", param, code="invalid_image_format")
    if "base64" not in parts[1:]:
        raise bad_request(f"{param}: the image data must be base64-encoded (data:{mime};base64,...)",
                          param, code="invalid_image_url")
    try:
        raw = base64.b64decode(data.strip(), validate=True)
    except (binascii.Error, ValueError) as e:
        raise bad_request(f"{param}: the image data is not valid base64 ({e})", param,
                          code="invalid_base64") from e
    return open_image(raw, param, max_pixels, declared=mime)


# --------------------------------------------------------------------------- chat


def _content(content, param: str, allow_images: bool, max_pixels: int) -> tuple[str, list[Image.Image]]:
    """A message's content (a string or a list of parts) -> its text and its images."""
    if isinstance(content, str):
        return content, []
    if not isinstance(content, list):
        raise bad_request(f"{param} must be a string or a list of content parts", param)
    texts, images = [], []
    for j, part in enumerate(content):
        p = f"{param}[{j}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            if not isinstance(part.get("text"), str):
                raise bad_request(f"{p}.text must be a string", f"{p}.text")
            texts.append(part["text"])
        elif kind == "image_url":
            if not allow_images:
                raise bad_request(f"{p}: only user messages may hold images", p)
            ref = part.get("image_url")
            url = ref.get("url") if isinstance(ref, dict) else ref
            images.append(decode_image_url(url, f"{p}.image_url.url", max_pixels))
        else:
            raise bad_request(f"{p}: unsupported content part type {kind!r}; use 'text' or 'image_url'", p)
    return "\n".join(texts), images


def _turns(messages, cfg: ServeConfig) -> tuple[str | None, list[tuple[str, str]], list[Image.Image]]:
    """(system prompt, [(role, text)] with consecutive same-role messages merged, images)."""
    if not isinstance(messages, list) or not messages:
        raise bad_request("'messages' must be a non-empty list of messages", "messages")
    system: list[str] = []
    turns: list[tuple[str, str]] = []
    images: list[Image.Image] = []
    chars = 0
    for i, m in enumerate(messages):
        p = f"messages[{i}]"
        if not isinstance(m, dict):
            raise bad_request(f"{p} must be an object with 'role' and 'content'", p)
        role = m.get("role")
        if role not in ("system", "developer", "user", "assistant"):
            raise bad_request(f"{p}.role {role!r} is not supported; use system, user or assistant",
                              f"{p}.role")
        if "content" not in m or m["content"] is None:
            raise bad_request(f"{p} has no content", f"{p}.content")
        text, imgs = _content(m["content"], f"{p}.content", role == "user", cfg.max_image_pixels)
        chars += len(text)
        if chars > cfg.max_prompt_chars:  # before any tokenizing: a token is rarely over a few characters
            raise bad_request(f"the messages hold over {cfg.max_prompt_chars} characters of text, this server's "
                              "limit", "messages", code="context_length_exceeded")
        images += imgs
        if len(images) > cfg.max_images:
            raise bad_request(f"the request holds more than this server's limit of {cfg.max_images} images",
                              f"{p}.content", code="too_many_images")
        if role in ("system", "developer"):
            if turns:
                raise bad_request(f"{p}: a system message must come before the conversation", f"{p}.role")
            system.append(text)
        elif turns and turns[-1][0] == role:
            turns[-1] = (role, turns[-1][1] + "\n" + text)
        else:
            turns.append((role, text))
    if not turns or turns[0][0] != "user" or turns[-1][0] != "user":
        raise bad_request("the conversation must start and end with a user message", "messages")
    return ("\n".join(system) if system else DEFAULT_SYSTEM), turns, images


def parse_chat(body: dict, pipe, cfg: ServeConfig) -> ChatRequest:
    """Check a ``/v1/chat/completions`` body. The images open the first user turn (the model's
    chat layout), resized and cropped to the model's image size. ``temperature`` defaults to 1,
    as OpenAI's does (0 is greedy, as ``cheers understand``)."""
    if "messages" not in body:
        raise bad_request("'messages' is required", "messages")
    check_model(body, cfg.model_name)
    _integer(body, "n", 1, 1, 1, limit_code="n_too_large")  # one answer per request
    _known(body, CHAT_KEYS, CHAT_NEUTRAL, "/v1/chat/completions")
    _choice(body, "response_format", (None, {"type": "text"}), "only text answers are supported")
    # max_tokens is the deprecated name: the new one wins when both are sent (as OpenAI and vLLM)
    max_tokens = _integer(body, "max_tokens", None, 1, cfg.max_tokens, limit_code="max_tokens_too_large")
    key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = _integer(body, "max_completion_tokens", max_tokens, 1, cfg.max_tokens,
                          limit_code="max_tokens_too_large")
    temperature = _number(body, "temperature", 1.0, 0.0, 2.0)
    top_p = _number(body, "top_p", 1.0, 0.0, 1.0, lo_open=True)
    stop = body.get("stop")
    stop = [stop] if isinstance(stop, str) else stop
    if stop is not None and (not isinstance(stop, list) or len(stop) > 4
                             or not all(isinstance(s, str) and s for s in stop)):
        raise bad_request("'stop' must be a non-empty string or a list of up to 4 of them", "stop")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise bad_request(f"'stream' must be true or false, got {stream!r}", "stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise bad_request("'stream_options' must be an object", "stream_options")
    if options and not stream:
        raise bad_request("'stream_options' is only allowed with 'stream': true", "stream_options")
    include_usage = options.get("include_usage", False)
    if not isinstance(include_usage, bool):
        raise bad_request(f"'stream_options.include_usage' must be true or false, got {include_usage!r}",
                          "stream_options.include_usage")

    system, turns, pil = _turns(body["messages"], cfg)
    history = [(turns[k][1], turns[k + 1][1]) for k in range(0, len(turns) - 1, 2)]
    ids = chat_prompt(pipe.text_tokenizer, system, history, turns[-1][1], len(pil))
    prompt_tokens = len(ids) + len(pil) * (pipe.cfg.tokens_per_image - 1)
    context = pipe.cfg.llm.max_position_embeddings
    if prompt_tokens > cfg.max_prompt_tokens:
        raise bad_request(f"the prompt is {prompt_tokens} tokens (images included), over this server's limit "
                          f"of {cfg.max_prompt_tokens}", "messages", code="context_length_exceeded")
    if max_tokens is None:
        max_tokens = max(1, min(cfg.default_max_tokens, cfg.max_tokens, context - prompt_tokens))
    if prompt_tokens + max_tokens > context:
        raise bad_request(f"the prompt ({prompt_tokens} tokens) plus {key} ({max_tokens}) exceed the "
                          f"model's context of {context} tokens", key, code="context_length_exceeded")
    images = [square_tensor(im, pipe.image_size) for im in pil]
    return ChatRequest(ids=ids, images=images, prompt_tokens=prompt_tokens, max_tokens=max_tokens,
                       temperature=temperature, top_p=top_p, seed=_seed(body), stop=stop or [],
                       stream=stream, include_usage=include_usage)


def chat_prompt(tok, system: str | None, history: list[tuple[str, str]], question: str, n_images: int) -> list[int]:
    """The prompt's token ids, as ``TextTokenizer.i2t_prompt`` lays them out; a user turn may be
    images alone (no text), which OpenAI's API allows and ``i2t_prompt`` refuses."""
    turns = [*history, (question, None)]
    if all(q.strip() for q, _ in turns):
        try:
            return tok.i2t_prompt(question, n_images, system=system or None, history=history)
        except InputError as e:
            raise bad_request(str(e), "messages") from e
    if not n_images:
        raise bad_request("a user message is empty: it has neither text nor an image", "messages")
    ids = tok.system(system or None)
    images = (tok.image_block(UND_PLACEHOLDER) + tok.newline) * n_images
    for q, answer in turns:
        ids += tok.turn("user", images + tok.encode(q)) + tok.assistant_open()
        images = []
        if answer is not None:
            ids += tok.encode(answer) + [tok.special.eos] + tok.newline
    return ids


# --------------------------------------------------------------------------- images


def parse_image_request(body: dict, pipe, cfg: ServeConfig, source: Image.Image | None = None) -> ImageRequest:
    """Check a generation body (or an edit's fields, with its ``source`` image). ``steps``,
    ``guidance_scale`` and ``shift`` left out take the checkpoint's settings."""
    prompt = body.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise bad_request("'prompt' must be a non-empty string", "prompt")
    check_model(body, cfg.model_name)
    route = "/v1/images/edits" if source is not None else "/v1/images/generations"
    _known({k: v for k, v in body.items() if source is not None or k != "strength"}, IMAGE_KEYS, IMAGE_NEUTRAL, route)
    if source is None and "strength" in body:
        raise bad_request("'strength' is an edit's parameter (/v1/images/edits)", "strength",
                          code="unsupported_parameter")
    if len(prompt) > cfg.max_prompt_chars:
        raise bad_request(f"the prompt is {len(prompt)} characters, over this server's limit of "
                          f"{cfg.max_prompt_chars}", "prompt", code="context_length_exceeded")
    n = _integer(body, "n", 1, 1, cfg.max_n, limit_code="n_too_large")
    size = body.get("size")
    valid = f"{pipe.image_size}x{pipe.image_size}"
    if size not in (None, "auto", valid):
        raise bad_request(f"size {size!r} is not available: this model makes {valid} images", "size",
                          code="invalid_size")
    _choice(body, "response_format", ("b64_json",), "the server keeps no files, use 'b64_json'")
    _choice(body, "output_format", ("png",), "images are PNG")
    if body.get("mask") is not None:
        raise bad_request("masks are not supported: an edit regenerates the whole image", "mask")
    ids = pipe.text_tokenizer.t2i_prompt(prompt)
    if len(ids) > cfg.max_prompt_tokens:
        raise bad_request(f"the prompt is {len(ids)} tokens, over this server's limit of {cfg.max_prompt_tokens}",
                          "prompt", code="context_length_exceeded")
    steps, cfg_scale, shift = pipe.sampling_settings()
    steps = _integer(body, "steps", steps, 1, cfg.max_steps, limit_code="steps_too_large")
    cfg_scale = _number(body, "guidance_scale", cfg_scale, 0.0, 100.0)
    shift = _number(body, "shift", shift, 0.0, 100.0, lo_open=True)
    strength = None
    pixels = None
    if source is not None:
        strength = _number(body, "strength", EDIT_STRENGTH, 0.0, 1.0, lo_open=True)
        pixels = square_tensor(source, pipe.image_size)
    return ImageRequest(prompt=prompt, n=n, seed=_seed(body), steps=steps, cfg_scale=cfg_scale, shift=shift,
                        source=pixels, strength=strength)


FORM_NUMBERS = {"n": int, "seed": int, "steps": int, "guidance_scale": float, "shift": float,
                "strength": float}


def form_fields(form) -> dict:
    """An edit's multipart text fields -> JSON-like values (its numeric fields parsed)."""
    out: dict = {}
    for key, value in form.multi_items():
        if not isinstance(value, str):
            continue
        kind = FORM_NUMBERS.get(key)
        try:
            out[key] = kind(value) if kind else value
        except ValueError as e:
            raise bad_request(f"'{key}' must be {'an integer' if kind is int else 'a number'}, got {value!r}",
                              key) from e
    return out
