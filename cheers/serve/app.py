"""The FastAPI app of ``cheers serve``: OpenAI's chat, image and model routes, and a web page.

Routes: ``POST /v1/chat/completions`` (text and ``image_url`` data-URI parts, streaming as
server-sent events), ``POST /v1/images/generations``, ``POST /v1/images/edits`` (multipart),
``GET /v1/models``, ``GET /health`` and the page at ``/``. Every request goes through the
:class:`Scheduler`, which batches them; every refusal is OpenAI's error JSON.
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import io
import json
import logging
import secrets
import time
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from PIL.PngImagePlugin import PngInfo
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from cheers.errors import CheersError
from cheers.pipeline import Pipeline
from cheers.serve.config import ServeConfig
from cheers.serve.errors import HTTP_TYPES, APIError, bad_request, error_body
from cheers.serve.scheduler import ChatJob, ImageJob, Job, QueueFull, Scheduler
from cheers.serve.validation import (
    ImageRequest,
    form_fields,
    open_image,
    parse_chat,
    parse_image_request,
)

STATIC = Path(__file__).parent / "static"
# the page loads nothing from elsewhere; images come back as data: URIs
PAGE_POLICY = ("default-src 'self'; img-src 'self' data: blob:; script-src 'self'; style-src 'self'; "
               "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'none'")
log = logging.getLogger("cheers.serve")


class BodyLimit:
    """Refuses a request body over ``limit`` bytes with a 413, by its Content-Length or as it
    arrives (a chunked body has none)."""

    def __init__(self, app, limit: int):
        self.app = app
        self.limit = limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        too_large = APIError(413, f"the request body is over this server's limit of {self.limit} bytes",
                             code="request_too_large")
        length = dict(scope.get("headers", [])).get(b"content-length")
        if length is not None:
            if not length.isdigit():
                return await _send_error(send, bad_request(f"Content-Length {length.decode(errors='replace')!r} "
                                                           "is not a number"))
            if int(length) > self.limit:
                return await _send_error(send, too_large)
        seen = 0

        async def counted():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise too_large
            return message

        await self.app(scope, counted, send)


async def _send_error(send, error: APIError) -> None:
    body = json.dumps(error.body()).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": error.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def _as_api_error(e: Exception) -> APIError:
    if isinstance(e, APIError):
        return e
    if isinstance(e, CheersError):
        return bad_request(str(e))
    return APIError(500, f"internal error: {type(e).__name__}: {e}", type="server_error")


def png_bytes(image, meta: dict) -> bytes:
    """PNG bytes carrying ``meta`` as JSON in a ``cheers`` text chunk, as the CLI writes them."""
    info = PngInfo()
    info.add_text("cheers", json.dumps(meta))
    buf = io.BytesIO()
    image.save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()


def create_app(pipe: Pipeline, cfg: ServeConfig) -> FastAPI:
    """The app serving ``pipe`` under the name ``cfg.model_name``; its scheduler thread runs
    while the app does (``app.state.scheduler``)."""
    scheduler = Scheduler(pipe, cfg)
    size = pipe.image_size
    steps, cfg_scale, shift = pipe.sampling_settings()
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        scheduler.start()
        try:
            yield
        finally:
            scheduler.stop()

    # no /docs: its page loads scripts from a CDN
    app = FastAPI(title="cheers", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.scheduler = scheduler
    app.state.pipe = pipe
    app.state.cfg = cfg
    app.add_middleware(BodyLimit, limit=cfg.max_body_bytes)

    @app.exception_handler(APIError)
    async def api_error(_request, e: APIError):
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(HTTPException)
    async def http_error(_request, e: HTTPException):
        kind = HTTP_TYPES.get(e.status_code, "invalid_request_error")
        return JSONResponse(error_body(str(e.detail), kind), status_code=e.status_code, headers=e.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_request, e: RequestValidationError):
        first = e.errors()[0] if e.errors() else {}
        param = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
        return JSONResponse(error_body(first.get("msg", "invalid request"), "invalid_request_error", param),
                            status_code=400)

    @app.exception_handler(Exception)
    async def server_error(_request, e: Exception):
        log.exception("unexpected error")
        return JSONResponse(_as_api_error(e).body(), status_code=500)

    def require_key(request: Request) -> None:
        if cfg.api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), cfg.api_key.encode()):
            raise APIError(401, "missing or wrong API key: send the header 'Authorization: Bearer <key>'",
                           code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(require_key)])

    async def json_body(request: Request) -> dict:
        raw = await request.body()
        if not raw:
            raise bad_request("the request body is empty; expected a JSON object", code="invalid_json")
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as e:
            raise bad_request(f"the request body is not valid JSON: {e}", code="invalid_json") from e
        if not isinstance(body, dict):
            raise bad_request(f"expected a JSON object, got a JSON {type(body).__name__}", code="invalid_json")
        return body

    def submit(job: Job) -> None:
        try:
            scheduler.submit(job)
        except QueueFull as e:
            raise APIError(429, str(e), code="queue_full", headers={"Retry-After": str(e.retry_after)}) from e

    def model_card() -> dict:
        return {"id": cfg.model_name, "object": "model", "created": created, "owned_by": "cheers"}

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": cfg.model_name, "image_size": size,
                "sampling": {"steps": steps, "guidance_scale": cfg_scale, "shift": shift},
                "api_key_required": cfg.api_key is not None, "queue": scheduler.load(), "stats": scheduler.stats}

    @v1.get("/models")
    async def models():
        return {"object": "list", "data": [model_card()]}

    @v1.get("/models/{model_id}")
    async def model(model_id: str):
        if model_id != cfg.model_name:
            raise APIError(404, f"the model {model_id!r} does not exist; this server serves {cfg.model_name!r}",
                           param="model", code="model_not_found")
        return model_card()

    @v1.post("/chat/completions")
    async def chat(request: Request):
        body = await json_body(request)
        req = await run_in_threadpool(parse_chat, body, pipe, cfg)
        job = scheduler.chat_job(asyncio.get_running_loop(), req)
        submit(job)
        cid, now = f"chatcmpl-{secrets.token_hex(12)}", int(time.time())
        if req.stream:
            return StreamingResponse(_sse(job, cid, now, req.include_usage), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        pieces = []
        try:
            while True:
                event = await job.events.get()
                if event[0] == "text":
                    pieces.append(event[1])
                elif event[0] == "done":
                    break
                else:
                    raise _as_api_error(event[1])
        finally:
            job.cancelled = True  # a no-op once done; stops decoding for a client that went away
        return {"id": cid, "object": "chat.completion", "created": now, "model": cfg.model_name,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "".join(pieces)},
                             "logprobs": None, "finish_reason": event[1]}],
                "usage": event[2]}

    async def _sse(job: ChatJob, cid: str, now: int, include_usage: bool):
        def chunk(choices: list, **extra) -> str:
            obj = {"id": cid, "object": "chat.completion.chunk", "created": now, "model": cfg.model_name,
                   "choices": choices, **extra}
            return f"data: {json.dumps(obj)}\n\n"

        def delta(d: dict, finish: str | None = None) -> list:
            return [{"index": 0, "delta": d, "logprobs": None, "finish_reason": finish}]

        try:
            yield chunk(delta({"role": "assistant", "content": ""}))
            while True:
                event = await job.events.get()
                if event[0] == "text":
                    yield chunk(delta({"content": event[1]}))
                elif event[0] == "done":
                    # the usage rides on the last chunk: its own (OpenAI's include_usage), else the finish
                    if include_usage:
                        yield chunk(delta({}, event[1]))
                        yield chunk([], usage=event[2])
                    else:
                        yield chunk(delta({}, event[1]), usage=event[2])
                    break
                else:
                    yield f"data: {json.dumps(_as_api_error(event[1]).body())}\n\n"
                    break
            yield "data: [DONE]\n\n"
        finally:
            job.cancelled = True

    async def images_response(req: ImageRequest, meta: dict) -> dict:
        job = ImageJob(asyncio.get_running_loop(), req)
        submit(job)
        try:
            event = await job.events.get()
        finally:
            job.cancelled = True
        if event[0] == "error":
            raise _as_api_error(event[1])

        def encode() -> list[dict]:
            return [{"b64_json": base64.b64encode(png_bytes(img, {**meta, "seed": s})).decode(),
                     "revised_prompt": None, "seed": s} for img, s in zip(event[1], req.seeds, strict=True)]

        return {"created": int(time.time()), "data": await run_in_threadpool(encode),
                "output_format": "png", "size": f"{size}x{size}"}

    def settings(req: ImageRequest) -> dict:
        return {"prompt": req.prompt, "steps": req.steps, "cfg": req.cfg_scale, "shift": req.shift,
                "sampler": "euler", "ckpt": cfg.model_name}

    @v1.post("/images/generations")
    async def generations(request: Request):
        body = await json_body(request)
        req = await run_in_threadpool(parse_image_request, body, pipe, cfg)
        return await images_response(req, settings(req))

    @v1.post("/images/edits")
    async def edits(request: Request):
        if not request.headers.get("content-type", "").startswith("multipart/form-data"):
            raise bad_request("an edit is a multipart/form-data request with OpenAI's fields (image, prompt, ...)")
        async with request.form(max_files=4, max_fields=64) as form:
            if form.get("mask") is not None:
                raise bad_request("masks are not supported: an edit regenerates the whole image", "mask")
            files = [v for k, v in form.multi_items() if k in ("image", "image[]") and not isinstance(v, str)]
            if len(files) != 1:
                raise bad_request(f"an edit takes one image file in the field 'image', got {len(files)}", "image")
            raw = await files[0].read()
            body = form_fields(form)
        source = await run_in_threadpool(open_image, raw, "image", cfg.max_image_pixels)
        req = await run_in_threadpool(parse_image_request, body, pipe, cfg, source)
        return await images_response(req, {**settings(req), "source": "upload", "strength": req.strength})

    app.include_router(v1)

    @app.get("/", include_in_schema=False)
    async def page():
        return FileResponse(STATIC / "index.html", headers={"Content-Security-Policy": PAGE_POLICY})

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app
