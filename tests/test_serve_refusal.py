"""Hostile or careless input is refused cheaply and safely: before the model, before parsing
what need not be parsed, off the event loop, without leaking internals, without running an
image decoder the server does not accept, and only from the browser pages it should serve."""

from __future__ import annotations

import base64
import io
import json
import logging
import statistics
import threading
import time

import httpx
import pytest
from PIL import EpsImagePlugin, Image, TiffImagePlugin
from serve_helpers import LiveServer, data_uri, png, talkative_checkpoint, wait_until

from cheers.pipeline import Pipeline
from cheers.serve import ServeConfig, create_app


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    return Pipeline.from_pretrained(talkative_checkpoint(tmp_path_factory.mktemp("refusal-ckpt")))


@pytest.fixture(scope="module")
def server(pipe):
    cfg = ServeConfig(model_name="r", max_tokens=16, max_image_pixels=128 * 128, max_prompt_chars=2000,
                      allowed_hosts=("127.0.0.1", "api.example"))
    with LiveServer(create_app(pipe, cfg)) as live:
        yield live


def chat(text: str = "hi", image: str | None = None) -> dict:
    content = [{"type": "text", "text": text}]
    if image is not None:
        content.append({"type": "image_url", "image_url": {"url": image}})
    return {"messages": [{"role": "user", "content": content}], "max_tokens": 2, "temperature": 0}


def health_latencies(url: str, stop: threading.Event) -> list[float]:
    """Seconds each /health took on its own connection, polled until ``stop``."""
    out = []
    with httpx.Client(timeout=30) as client:
        while not stop.is_set():
            t0 = time.perf_counter()
            assert client.get(url + "/health").status_code == 200
            out.append(time.perf_counter() - t0)
            time.sleep(0.005)
    return out


def while_polling_health(url: str, send) -> tuple[httpx.Response, list[float]]:
    """``send()`` while another connection polls /health -> (its response, each /health's seconds)."""
    stop, got = threading.Event(), {}
    poller = threading.Thread(target=lambda: got.setdefault("lat", health_latencies(url, stop)))
    poller.start()
    time.sleep(0.1)
    try:
        response = send()
    finally:
        time.sleep(0.05)
        stop.set()
        poller.join()
    return response, got["lat"]


def assert_loop_free(latencies: list[float]) -> None:
    """/health stayed quick: typically under 50 ms, none over 0.5 s. A parse on the event loop
    stalls one poll for the whole parse (0.85-1.5 s for 30 MB here); the machine's other load
    can add tens of ms to any one poll, hence the two bounds."""
    assert statistics.median(latencies) < 0.05, f"/health typically took {statistics.median(latencies) * 1000:.0f} ms"
    assert max(latencies) < 0.5, f"/health took {max(latencies) * 1000:.0f} ms once"


# --------------------------------------------------------------------------- JSON


@pytest.mark.parametrize("depth", [40, 50_000])
def test_deeply_nested_json_is_a_400_that_leaks_nothing(server, depth):
    body = '{"messages": ' + "[" * depth + "]" * depth + "}"
    r, latencies = while_polling_health(server.url, lambda: httpx.post(
        server.url + "/v1/chat/completions", content=body, headers={"Content-Type": "application/json"}, timeout=30))
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["code"] == "json_too_deep" and "Recursion" not in r.text and "Traceback" not in r.text
    assert_loop_free(latencies)


def test_30_mb_body_is_refused_off_the_event_loop(server):
    body = b'{"messages": [' + b"1," * 15_000_000 + b"1]}"
    r, latencies = while_polling_health(server.url, lambda: httpx.post(
        server.url + "/v1/chat/completions", content=body, headers={"Content-Type": "application/json"}, timeout=60))
    assert r.status_code == 400 and r.json()["error"]["code"] == "json_too_complex"
    assert_loop_free(latencies)


def test_huge_prompt_is_refused_before_tokenizing(server, pipe, monkeypatch):
    calls = []
    encode = pipe.text_tokenizer.encode
    monkeypatch.setattr(pipe.text_tokenizer, "encode", lambda text: calls.append(len(text)) or encode(text))
    for route, body, param in (("chat/completions", chat("a red circle " * 400_000), "messages"),
                               ("images/generations", {"prompt": "a red circle " * 400_000}, "prompt")):
        r = httpx.post(f"{server.url}/v1/{route}", json=body, timeout=30)
        assert r.status_code == 400 and r.json()["error"]["param"] == param
        assert "2000" in r.json()["error"]["message"]
    assert not any(n > 2000 for n in calls), "a prompt over the character limit was tokenized"


def test_full_queue_refuses_before_parsing_or_decoding(pipe, monkeypatch):
    """Queue size 1, held by an image: a chat with an image gets its 429 without its JSON
    parsed or its image opened."""
    app = create_app(pipe, ServeConfig(model_name="q", queue_size=1, batch_window_ms=0))
    scheduler = app.state.scheduler
    release, sample = threading.Event(), scheduler._sample
    scheduler._sample = lambda jobs: release.wait(30) and sample(jobs)
    opened, loads = [], []
    real_open, real_loads = Image.open, json.loads
    monkeypatch.setattr(Image, "open", lambda *a, **kw: opened.append(1) or real_open(*a, **kw))
    monkeypatch.setattr(json, "loads", lambda *a, **kw: loads.append(1) or real_loads(*a, **kw))
    with LiveServer(app) as live:
        first = threading.Thread(target=httpx.post, args=(live.url + "/v1/images/generations",),
                                 kwargs={"json": {"prompt": "a", "steps": 2}, "timeout": 60})
        first.start()
        wait_until(lambda: scheduler.load()["sampling"] == 1, 10, "the first request reached the sampler")
        opened.clear(), loads.clear()
        r = httpx.post(live.url + "/v1/chat/completions", json=chat("hi", data_uri(png((9, 9, 9)))), timeout=30)
        assert r.status_code == 429
        assert opened == [] and loads == [], "a request refused for a full queue was parsed first"
        release.set()
        first.join()


# --------------------------------------------------------------------------- 500s


def test_500_says_internal_error_and_the_request_id_only(pipe, caplog):
    app = create_app(pipe, ServeConfig(model_name="e", batch_window_ms=0))

    def broken(jobs):
        raise RuntimeError("secret detail at /home/op/model.py")

    app.state.scheduler._sample = broken
    with LiveServer(app) as live, caplog.at_level(logging.ERROR, logger="cheers.serve"):
        r = httpx.post(live.url + "/v1/images/generations", json={"prompt": "a", "steps": 2}, timeout=60,
                       headers={"X-Request-Id": "client-42"})
    assert r.status_code == 500 and r.headers["x-request-id"] == "client-42"
    assert r.json()["error"] == {"message": "internal error (request id client-42)", "type": "server_error",
                                 "param": None, "code": "internal_error"}
    assert "secret" not in r.text
    assert "secret detail" in caplog.text and "Traceback" in caplog.text and "client-42" in caplog.text


def test_500_outside_the_scheduler_leaks_nothing(server, monkeypatch, caplog):
    import cheers.serve.app as app_module

    def broken(*_a, **_kw):
        raise ValueError("secret parser state")

    monkeypatch.setattr(app_module, "parse_image_request", broken)
    with caplog.at_level(logging.ERROR, logger="cheers.serve"):
        r = httpx.post(server.url + "/v1/images/generations", json={"prompt": "a"}, timeout=30)
    assert r.status_code == 500 and "secret" not in r.text
    rid = r.headers["x-request-id"]
    assert r.json()["error"]["message"] == f"internal error (request id {rid})"
    assert "secret parser state" in caplog.text and "Traceback" in caplog.text


# --------------------------------------------------------------------------- images

EPS = (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\n%%EndComments\n"
       b"/x { 1 } def showpage\n%%EOF\n")
SVG = b'<svg xmlns="http://www.w3.org/2000/svg" width="8" height="8"><rect width="8" height="8"/></svg>'


def tiff() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, format="TIFF")
    return buf.getvalue()


@pytest.mark.parametrize("mime, raw", [
    ("image/x-eps", EPS), ("application/postscript", EPS), ("image/png", EPS),  # declared as PNG, is EPS
    ("image/tiff", None), ("image/png", None), ("image/svg+xml", SVG), ("image/png", SVG)])
def test_only_png_jpeg_webp_gif_reach_pillow(server, monkeypatch, mime, raw):
    raw = tiff() if raw is None else raw
    ran = []

    def plugin_ran(name):
        def record(*_a, **_kw):
            ran.append(name)
            raise AssertionError(f"the {name} plugin ran")
        return record

    monkeypatch.setattr(EpsImagePlugin.EpsImageFile, "_open", plugin_ran("EPS"))
    monkeypatch.setattr(TiffImagePlugin.TiffImageFile, "_open", plugin_ran("TIFF"))
    r = httpx.post(server.url + "/v1/chat/completions", json=chat("hi", data_uri(raw, mime)), timeout=30)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["code"] in ("invalid_image", "invalid_image_format")
    assert ran == []
    # an edit's upload goes through the same check
    r = httpx.post(server.url + "/v1/images/edits", files={"image": ("x", raw, mime)}, data={"prompt": "a"}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "image" and ran == []


def test_declared_type_must_match_the_bytes(server):
    jpeg = io.BytesIO()
    Image.new("RGB", (16, 16), (200, 0, 0)).save(jpeg, format="JPEG")
    for mime, raw, ok in (("image/jpeg", jpeg.getvalue(), True), ("image/png", jpeg.getvalue(), False),
                          ("image/gif", png((1, 2, 3)), False), ("image/png", png((1, 2, 3)), True)):
        r = httpx.post(server.url + "/v1/chat/completions", json=chat("hi", data_uri(raw, mime)), timeout=60)
        assert (r.status_code == 200) == ok, r.text
        if not ok:
            assert r.json()["error"]["code"] == "invalid_image_format" and mime in r.json()["error"]["message"]


def test_gif_and_webp_are_read(server):
    for fmt in ("GIF", "WEBP"):
        buf = io.BytesIO()
        Image.new("RGB", (16, 16), (0, 200, 0)).save(buf, format=fmt)
        uri = data_uri(buf.getvalue(), f"image/{fmt.lower()}")
        r = httpx.post(server.url + "/v1/chat/completions", json=chat("hi", uri), timeout=60)
        assert r.status_code == 200, r.text


# --------------------------------------------------------------------------- browsers


def test_json_routes_require_application_json(server):
    body = json.dumps(chat()).encode()
    for ctype in ("text/plain", "application/x-www-form-urlencoded", None):
        headers = {} if ctype is None else {"Content-Type": ctype}
        for route in ("chat/completions", "images/generations"):
            r = httpx.post(f"{server.url}/v1/{route}", content=body, headers=headers, timeout=30)
            assert r.status_code == 415 and r.json()["error"]["code"] == "unsupported_media_type"
    r = httpx.post(server.url + "/v1/chat/completions", content=body,
                   headers={"Content-Type": "application/json; charset=utf-8"}, timeout=30)
    assert r.status_code == 200


def test_host_header_is_checked_against_dns_rebinding(server, pipe):
    for host, status in (("evil.example", 400), ("evil.example:8000", 400), ("127.0.0.1.evil.example", 400),
                         ("api.example", 200), ("API.example:443", 200)):
        r = httpx.get(server.url + "/v1/models", headers={"Host": host}, timeout=30)
        assert r.status_code == status, host
        if status == 400:
            assert r.json()["error"]["code"] == "host_not_allowed"
    default = create_app(pipe, ServeConfig(model_name="h"))
    with LiveServer(default) as live:
        port = live.url.rsplit(":", 1)[1]
        for host, status in ((f"localhost:{port}", 200), (f"127.0.0.1:{port}", 200), (f"[::1]:{port}", 200),
                             (f"rebind.attacker.example:{port}", 400)):
            assert httpx.get(live.url + "/health", headers={"Host": host}, timeout=30).status_code == status, host


def test_cors_is_off_unless_an_origin_is_given(server, pipe):
    preflight = {"Origin": "https://page.example", "Access-Control-Request-Method": "POST"}
    r = httpx.options(server.url + "/v1/chat/completions", headers=preflight, timeout=30)
    assert "access-control-allow-origin" not in r.headers
    with LiveServer(create_app(pipe, ServeConfig(model_name="c", cors_origins=("https://page.example",)))) as live:
        r = httpx.options(live.url + "/v1/chat/completions", headers=preflight, timeout=30)
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "https://page.example"
        other = {**preflight, "Origin": "https://other.example"}
        r = httpx.options(live.url + "/v1/chat/completions", headers=other, timeout=30)
        assert r.headers.get("access-control-allow-origin") != "https://other.example"


def test_base64_data_is_decoded_once_checked(server):
    """A data URI that is not base64 is refused with its field named (not a 500)."""
    r = httpx.post(server.url + "/v1/chat/completions", timeout=30,
                   json=chat("hi", "data:image/png;base64," + base64.b64encode(b"\x89PNG").decode() + "@@"))
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_base64"
