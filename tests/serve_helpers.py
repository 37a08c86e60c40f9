"""What the ``cheers serve`` tests share: a talkative debug checkpoint and a live server thread."""

from __future__ import annotations

import base64
import io
import threading
import time
from pathlib import Path

import torch
from PIL import Image

from cheers.checkpoint import save_pretrained
from cheers.debug_checkpoint import make_debug_checkpoint


def talkative_checkpoint(path: Path) -> Path:
    """``cheers debug-checkpoint`` with larger random LLM weights, so greedy answers differ from
    prompt to prompt (the initialised model answers every question with the same token), and
    the zero-initialised layers filled, so images depend on their prompt."""
    model, _ = make_debug_checkpoint(path)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for w in model.llm.parameters():
            if w.dim() == 2:
                w.normal_(0, 0.3, generator=g)
        for w in model.parameters():
            if not w.any():
                w.normal_(0, 0.05, generator=g)
    save_pretrained(model, path)
    return path


def png(color: tuple[int, int, int], size: int = 64) -> bytes:
    """A PNG of a coloured disc on grey (``size`` px)."""
    img = Image.new("RGB", (size, size), (128, 128, 128))
    from PIL import ImageDraw

    ImageDraw.Draw(img).ellipse((size // 4, size // 4, 3 * size // 4, 3 * size // 4), fill=color)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def data_uri(raw: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(raw).decode()}"


class LiveServer:
    """uvicorn serving ``app`` on a free loopback port in a thread (``with LiveServer(app) as s``)."""

    def __init__(self, app, **uvicorn_settings):
        import uvicorn

        from cheers.serve.app import Server

        self.app = app
        self.server = Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", **uvicorn_settings))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.url = ""

    def __enter__(self) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


def wait_until(condition, seconds: float, what: str) -> float:
    """Poll ``condition()`` until it holds; fails naming ``what`` after ``seconds``. -> the wait (s)."""
    start = time.monotonic()
    while not condition():
        if time.monotonic() - start > seconds:
            raise AssertionError(f"{what}: not within {seconds} s")
        time.sleep(0.01)
    return time.monotonic() - start
