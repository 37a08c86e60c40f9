"""The FastAPI app of ``cheers serve``: OpenAI's chat, image and model routes, and a web page.

Routes: ``POST /v1/chat/completions`` (text and ``image_url`` data-URI parts, streaming as
server-sent events), ``POST /v1/images/generations``, ``POST /v1/images/edits`` (multipart),
``GET /v1/models``, ``GET /health``, ``GET /metrics`` (Prometheus) and the page at ``/``. Every
request goes through the :class:`Scheduler`, which batches them; every refusal is OpenAI's
error JSON.

A request is refused as cheaply as possible: its Host, API key, content type and the queue's
room are checked before its body is read; its size before it is parsed; its JSON, tokens and
images are parsed off the event loop. A request whose client goes away is cancelled in the
scheduler. Every response carries an ``X-Request-Id``, and each request is one JSON log line.
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import json
import logging
import re
import secrets
import time
from contextlib import asynccontextmanager
from pathlib import Path

import uvicorn
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from cheers.cli_args import image_meta, png_bytes_with_meta
from cheers.errors import CheersError
from cheers.pipeline import Pipeline
from cheers.serve.config import ServeConfig
from cheers.serve.errors import HTTP_TYPES, APIError, bad_request, error_body
from cheers.serve.metrics import ServeMetrics
from cheers.serve.scheduler import ImageJob, Job, QueueFull, Scheduler
from cheers.serve.validation import (
    ImageRequest,
    form_fields,
    open_image,
    parse_chat,
    parse_image_request,
    parse_json,
    separators,
    too_complex,
)

STATIC = Path(__file__).parent / "static"
# the page loads nothing from elsewhere; images come back as data: URIs
PAGE_POLICY = ("default-src 'self'; img-src 'self' data: blob:; script-src 'self'; style-src 'self'; "
               "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'none'")
REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")  # a client's id is echoed only if it is this tame
ROUTES = ("/v1/chat/completions", "/v1/images/generations", "/v1/images/edits", "/v1/models", "/health",
          "/metrics", "/")
CLIENT_GONE = 499  # nginx's status for a client that closed the connection before the answer
log = logging.getLogger("cheers.serve")
access_log = logging.getLogger("cheers.serve.access")


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


def route_label(path: str) -> str:
    """A bounded set of names for the metrics' ``route`` label."""
    if path in ROUTES:
        return path
    if path.startswith("/v1/models/"):
        return "/v1/models/{model}"
    return "/static" if path.startswith("/static/") else "other"


class Gate:
    """The outermost layer: the request id, the Host check (against DNS rebinding), and per
    request one structured log line and the request metrics."""

    def __init__(self, app, cfg: ServeConfig, metrics: ServeMetrics):
        self.app = app
        self.hosts = cfg.host_names()
        self.metrics = metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers", []))
        rid = headers.get(b"x-request-id", b"").decode("latin-1")
        if not REQUEST_ID.fullmatch(rid):
            rid = f"req-{secrets.token_hex(8)}"
        state = scope.setdefault("state", {})
        state["request_id"] = rid
        started, status = time.monotonic(), [500]

        async def send_with_id(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
                state["answered"] = True
                message = {**message, "headers": [*message.get("headers", []), (b"x-request-id", rid.encode())]}
            await send(message)

        host = headers.get(b"host", b"").decode("latin-1")
        try:
            if self.hosts is not None and host_name(host) not in self.hosts:
                await _send_error(send_with_id, APIError(
                    400, f"the Host header {host!r} is not a name this server answers to; start it with "
                         "--allowed-hosts NAME to add one", code="host_not_allowed"))
            else:
                await self.app(scope, receive, send_with_id)
        except Exception:
            # the traceback goes to the log, the client learns only the request id
            log.exception("request %s: unexpected error", rid)
            if not state.get("answered"):
                await _send_error(send_with_id, internal_error(rid))
        finally:
            seconds = time.monotonic() - started
            route = route_label(scope["path"])
            self.metrics.requests.labels(route, str(status[0])).inc()
            self.metrics.request_latency.labels(route).observe(seconds)
            line = {"request_id": rid, "method": scope["method"], "route": route, "status": status[0],
                    "latency_ms": round(seconds * 1000, 1)}
            line.update({k: state[k] for k in ("tokens", "images", "outcome") if k in state})
            access_log.info(json.dumps(line))


def host_name(host: str) -> str:
    """``Host`` header -> the name without its port (``[::1]:8000`` -> ``::1``), lower case."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1:host.find("]")] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


async def _send_error(send, error: APIError) -> None:
    body = json.dumps(error.body()).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": error.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def internal_error(request_id: str) -> APIError:
    """What a client learns of an unexpected failure: that it happened, and the id to look up in
    the log; never the exception's text."""
    return APIError(500, f"internal error (request id {request_id})", type="server_error", code="internal_error")


class ClientGone(Exception):
    """The client closed its connection before the answer."""


class Waiter:
    """A job's events as its request sees them: ``await next()`` raises :class:`ClientGone` when
    the client disconnects and a 504 past the request's deadline; ``close()`` cancels the job in
    the scheduler unless it finished."""

    def __init__(self, scheduler: Scheduler, job: Job, request: Request, timeout: float | None):
        self.scheduler = scheduler
        self.job = job
        self.timeout = timeout
        self.deadline = None if timeout is None else job.submitted + timeout
        self.watcher = asyncio.ensure_future(self._disconnected(request.receive))

    @staticmethod
    async def _disconnected(receive) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass

    async def next(self) -> tuple:
        get = asyncio.ensure_future(self.job.events.get())
        left = None if self.deadline is None else max(0.0, self.deadline - time.monotonic())
        done, _ = await asyncio.wait({get, self.watcher}, timeout=left, return_when=asyncio.FIRST_COMPLETED)
        if get in done:
            return get.result()
        get.cancel()
        if self.watcher in done:
            raise ClientGone
        raise APIError(504, f"the request took longer than this server's limit of {self.timeout:g} s",
                       code="request_timeout", type="server_error")

    def close(self) -> None:
        self.watcher.cancel()
        self.scheduler.cancel(self.job)


def create_app(pipe: Pipeline, cfg: ServeConfig) -> FastAPI:
    """The app serving ``pipe`` under the name ``cfg.model_name``; its scheduler thread runs
    while the app does (``app.state.scheduler``)."""
    metrics = ServeMetrics()
    scheduler = Scheduler(pipe, cfg, metrics)
    metrics.watch(scheduler.load)
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
    app.state.metrics = metrics
    app.add_middleware(BodyLimit, limit=cfg.max_body_bytes)
    if cfg.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(cfg.cors_origins), allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type", "X-Request-Id"],
                           expose_headers=["X-Request-Id"])
    app.add_middleware(Gate, cfg=cfg, metrics=metrics)

    def rid(request: Request) -> str:
        return request.state.request_id

    def as_api_error(e: Exception, request: Request) -> APIError:
        if isinstance(e, APIError):
            return e
        if isinstance(e, CheersError):
            return bad_request(str(e))
        log.error("request %s failed: %s (the scheduler logged the traceback)", rid(request), type(e).__name__)
        return internal_error(rid(request))

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

    def require_key(request: Request) -> None:
        if cfg.api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), cfg.api_key.encode()):
            raise APIError(401, "missing or wrong API key: send the header 'Authorization: Bearer <key>'",
                           code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(require_key)])

    def queued(put) -> None:
        """``put()`` (the scheduler's room check or submit), a full queue answered with a 429."""
        try:
            put()
        except QueueFull as e:
            raise APIError(429, str(e), code="queue_full", headers={"Retry-After": str(e.retry_after)}) from e

    def admit(request: Request, media_type: str) -> None:
        """Refusals that cost nothing, before the body is read: its media type, the queue's room."""
        got = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if got != media_type:
            raise APIError(415, f"this route takes Content-Type {media_type}, got {got or 'none'!r}",
                           code="unsupported_media_type")
        queued(scheduler.room)

    async def json_body(request: Request) -> bytes:
        """The body, its separators counted chunk by chunk as it arrives: one with too many is
        refused without being joined or parsed (and read to its end, so the client hears why)."""
        chunks, count = [], 0
        async for chunk in request.stream():
            count += separators(chunk)
            if count <= cfg.max_json_values:
                chunks.append(chunk)
        if count > cfg.max_json_values:
            raise too_complex(count, cfg.max_json_values)
        return b"".join(chunks)

    def submit(job: Job) -> None:
        queued(lambda: scheduler.submit(job))

    def model_card() -> dict:
        return {"id": cfg.model_name, "object": "model", "created": created, "owned_by": "cheers"}

    @app.get("/health")
    async def health():
        refused = scheduler.unavailable()
        body = {"status": "ok" if refused is None else "unavailable", "model": cfg.model_name, "image_size": size,
                "sampling": {"steps": steps, "guidance_scale": cfg_scale, "shift": shift},
                "api_key_required": cfg.api_key is not None, "queue": scheduler.load(), "stats": scheduler.stats}
        if refused is not None:
            body["reason"] = refused.message
        return JSONResponse(body, status_code=200 if refused is None else 503)

    @app.get("/metrics", include_in_schema=False)
    async def prometheus():
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)

    @v1.get("/models")
    async def models():
        return {"object": "list", "data": [model_card()]}

    @v1.get("/models/{model_id}")
    async def model(model_id: str):
        if model_id != cfg.model_name:
            raise APIError(404, f"the model {model_id!r} does not exist; this server serves {cfg.model_name!r}",
                           param="model", code="model_not_found")
        return model_card()

    def gone(request: Request) -> Response:
        request.state.outcome = "cancelled"
        return Response(status_code=CLIENT_GONE)

    @v1.post("/chat/completions")
    async def chat(request: Request):
        admit(request, "application/json")
        raw = await json_body(request)
        req = await run_in_threadpool(lambda: parse_chat(parse_json(raw), pipe, cfg))
        job = scheduler.chat_job(asyncio.get_running_loop(), req)
        submit(job)
        cid, now = f"chatcmpl-{secrets.token_hex(12)}", int(time.time())
        waiter = Waiter(scheduler, job, request, cfg.request_timeout)
        if req.stream:
            return StreamingResponse(_sse(waiter, request, cid, now, req.include_usage),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        pieces = []
        try:
            while (event := await waiter.next())[0] == "text":
                pieces.append(event[1])
        except ClientGone:
            return gone(request)
        finally:
            waiter.close()
        if event[0] == "error":
            raise as_api_error(event[1], request)
        request.state.tokens = event[2]["completion_tokens"]
        return {"id": cid, "object": "chat.completion", "created": now, "model": cfg.model_name,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "".join(pieces)},
                             "logprobs": None, "finish_reason": event[1]}],
                "usage": event[2]}

    async def _sse(waiter: Waiter, request: Request, cid: str, now: int, include_usage: bool):
        # with include_usage every chunk has a usage key, null but on the last (OpenAI's stream_options)
        extra = {"usage": None} if include_usage else {}

        def chunk(choices: list, **fields) -> str:
            obj = {"id": cid, "object": "chat.completion.chunk", "created": now, "model": cfg.model_name,
                   "choices": choices, **extra, **fields}
            return f"data: {json.dumps(obj)}\n\n"

        def delta(d: dict, finish: str | None = None) -> list:
            return [{"index": 0, "delta": d, "logprobs": None, "finish_reason": finish}]

        try:
            yield chunk(delta({"role": "assistant", "content": ""}))
            while True:
                try:
                    event = await waiter.next()
                except APIError as e:
                    yield f"data: {json.dumps(e.body())}\n\n"
                    break
                if event[0] == "text":
                    yield chunk(delta({"content": event[1]}))
                elif event[0] == "done":
                    request.state.tokens = event[2]["completion_tokens"]
                    yield chunk(delta({}, event[1]))
                    if include_usage:
                        yield chunk([], usage=event[2])
                    break
                else:
                    yield f"data: {json.dumps(as_api_error(event[1], request).body())}\n\n"
                    break
            yield "data: [DONE]\n\n"
        except ClientGone:
            request.state.outcome = "cancelled"
        finally:
            waiter.close()

    async def images_response(request: Request, req: ImageRequest, **meta_extra):
        job = ImageJob(asyncio.get_running_loop(), req)
        submit(job)
        waiter = Waiter(scheduler, job, request, cfg.request_timeout)
        try:
            event = await waiter.next()
        except ClientGone:
            return gone(request)
        finally:
            waiter.close()
        if event[0] == "error":
            raise as_api_error(event[1], request)

        def encode() -> list[dict]:
            def meta(seed: int) -> dict:
                return image_meta(prompt=req.prompt, seed=seed, steps=req.steps, cfg_scale=req.cfg_scale,
                                  shift=req.shift, sampler="euler", ckpt=cfg.model_name, **meta_extra)

            return [{"b64_json": base64.b64encode(png_bytes_with_meta(img, meta(s))).decode(),
                     "revised_prompt": None, "seed": s} for img, s in zip(event[1], req.seeds, strict=True)]

        request.state.images = len(event[1])
        return {"created": int(time.time()), "data": await run_in_threadpool(encode),
                "output_format": "png", "size": f"{size}x{size}"}

    @v1.post("/images/generations")
    async def generations(request: Request):
        admit(request, "application/json")
        raw = await json_body(request)
        req = await run_in_threadpool(lambda: parse_image_request(parse_json(raw), pipe, cfg))
        return await images_response(request, req)

    @v1.post("/images/edits")
    async def edits(request: Request):
        admit(request, "multipart/form-data")
        async with request.form(max_files=4, max_fields=64) as form:
            if form.get("mask") is not None:
                raise bad_request("masks are not supported: an edit regenerates the whole image", "mask")
            files = [v for k, v in form.multi_items() if k in ("image", "image[]") and not isinstance(v, str)]
            if len(files) != 1:
                raise bad_request(f"an edit takes one image file in the field 'image', got {len(files)}", "image")
            raw = await files[0].read()
            body = form_fields(form)

        def parse() -> ImageRequest:
            return parse_image_request(body, pipe, cfg, open_image(raw, "image", cfg.max_image_pixels))

        req = await run_in_threadpool(parse)
        return await images_response(request, req, source="upload", strength=req.strength)

    app.include_router(v1)

    @app.get("/", include_in_schema=False)
    async def page():
        return FileResponse(STATIC / "index.html", headers={"Content-Security-Policy": PAGE_POLICY})

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app


class Server(uvicorn.Server):
    """uvicorn's server that, when asked to stop (SIGTERM, SIGINT), first tells the scheduler to
    take no new request (503) while the running ones finish within the graceful-shutdown timeout."""

    async def shutdown(self, sockets=None) -> None:
        scheduler = getattr(getattr(self.config.app, "state", None), "scheduler", None)
        if scheduler is not None:
            scheduler.draining = True
        await super().shutdown(sockets)
