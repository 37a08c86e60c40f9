"""What an operator of ``cheers serve`` relies on: /metrics, request ids and one log line per
request, /health that tells the truth, deadlines, and a shutdown that drains."""

from __future__ import annotations

import json
import logging
import threading
import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from serve_helpers import LiveServer, talkative_checkpoint, wait_until

from cheers.decode_batch import DecodeBatch
from cheers.pipeline import Pipeline
from cheers.serve import ServeConfig, create_app


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return talkative_checkpoint(tmp_path_factory.mktemp("ops-ckpt"))


@pytest.fixture(scope="module")
def pipe(ckpt):
    return Pipeline.from_pretrained(ckpt)


@pytest.fixture(scope="module")
def server(pipe):
    with LiveServer(create_app(pipe, ServeConfig(model_name="o", api_key="k", batch_window_ms=0))) as live:
        yield live


AUTH = {"Authorization": "Bearer k"}


def chat(n: int = 3, **extra) -> dict:
    return {"messages": [{"role": "user", "content": "hi"}], "max_tokens": n, "temperature": 0, **extra}


@pytest.fixture
def slow_decoding(monkeypatch):
    """>= 20 ms a decode step, so a long answer takes seconds."""
    advance = DecodeBatch.advance

    def slow(self, tokens):
        time.sleep(0.02)
        return advance(self, tokens)

    monkeypatch.setattr(DecodeBatch, "advance", slow)


def scrape(url: str) -> dict:
    """/metrics parsed -> {(sample name, sorted labels): value}."""
    r = httpx.get(url + "/metrics", timeout=30)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(r.text) for s in family.samples}


def test_metrics_count_exactly_the_requests_made(server):
    before = scrape(server.url)
    for body in (chat(3), chat(4, stream=True)):
        assert httpx.post(server.url + "/v1/chat/completions", json=body, headers=AUTH, timeout=60).status_code == 200
    r = httpx.post(server.url + "/v1/images/generations", json={"prompt": "a", "steps": 2, "n": 2}, headers=AUTH,
                   timeout=60)
    assert r.status_code == 200
    assert httpx.post(server.url + "/v1/chat/completions", json={}, headers=AUTH, timeout=30).status_code == 400
    assert httpx.get(server.url + "/v1/models", timeout=30).status_code == 401
    after = scrape(server.url)

    def moved(name: str, **labels) -> float:
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0.0) - before.get(key, 0.0)

    chat_route = "/v1/chat/completions"
    assert moved("cheers_requests_total", route=chat_route, status="200") == 2
    assert moved("cheers_requests_total", route=chat_route, status="400") == 1
    assert moved("cheers_requests_total", route="/v1/images/generations", status="200") == 1
    assert moved("cheers_requests_total", route="/v1/models", status="401") == 1
    assert moved("cheers_request_duration_seconds_count", route=chat_route) == 3
    assert moved("cheers_generated_tokens_total") == 7
    assert moved("cheers_generated_images_total") == 2
    assert moved("cheers_time_to_first_token_seconds_count") == 2
    assert moved("cheers_inter_token_latency_seconds_count") == 7 - 2
    assert moved("cheers_sampler_batch_size_count") == 1 and moved("cheers_sampler_batch_size_sum") == 2
    assert moved("cheers_requests_cancelled_total") == 0
    assert after[("cheers_queue_depth", ())] == 0 and after[("cheers_requests_running", ())] == 0


def test_metrics_count_a_cancelled_request(server, slow_decoding):
    before = scrape(server.url)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + "/v1/chat/completions", json=chat(400), headers=AUTH,
                   timeout=httpx.Timeout(30, read=0.3))
    wait_until(lambda: scrape(server.url)[("cheers_requests_cancelled_total", ())]
               == before[("cheers_requests_cancelled_total", ())] + 1, 3, "the cancelled request was counted")


def test_every_response_has_a_request_id(server, caplog):
    ids = set()
    with caplog.at_level(logging.INFO, logger="cheers.serve.access"):
        for method, path, kw, status in (
                ("GET", "/health", {}, 200), ("GET", "/v1/models", {}, 401), ("GET", "/nothing", {}, 404),
                ("POST", "/v1/chat/completions", {"content": b"x", "headers": {**AUTH, "Content-Type": "text/plain"}},
                 415),
                ("GET", "/health", {"headers": {"Host": "evil.example"}}, 400),
                ("POST", "/v1/chat/completions", {"json": chat(2), "headers": AUTH}, 200)):
            r = httpx.request(method, server.url + path, timeout=60, **kw)
            assert r.status_code == status
            rid = r.headers["x-request-id"]
            assert rid.startswith("req-") and rid not in ids
            ids.add(rid)
    lines = [json.loads(rec.getMessage()) for rec in caplog.records if rec.name == "cheers.serve.access"]
    assert [line["request_id"] for line in lines] == [*ids] or {line["request_id"] for line in lines} == ids
    assert len(lines) == 6
    last = lines[-1]
    assert last["route"] == "/v1/chat/completions" and last["status"] == 200 and last["tokens"] == 2
    assert last["method"] == "POST" and last["latency_ms"] > 0


def test_client_request_id_is_echoed_when_tame(server):
    r = httpx.get(server.url + "/health", headers={"X-Request-Id": "trace-1.2_3"}, timeout=30)
    assert r.headers["x-request-id"] == "trace-1.2_3"
    r = httpx.get(server.url + "/health", headers={"X-Request-Id": "bad id\twith spaces"}, timeout=30)
    assert r.headers["x-request-id"].startswith("req-")


def test_image_log_line_counts_images(server, caplog):
    with caplog.at_level(logging.INFO, logger="cheers.serve.access"):
        r = httpx.post(server.url + "/v1/images/generations", json={"prompt": "a", "steps": 2, "n": 3}, headers=AUTH,
                       timeout=60)
    line = [json.loads(rec.getMessage()) for rec in caplog.records if rec.name == "cheers.serve.access"][-1]
    assert line["images"] == 3 and line["request_id"] == r.headers["x-request-id"]


def test_dead_scheduler_fails_requests_at_once(pipe):
    """The model thread dies while a request waits: it gets a 503 at once, /health says 503, and
    a new request is refused instead of waiting forever."""
    app = create_app(pipe, ServeConfig(model_name="d"))
    scheduler = app.state.scheduler
    take = scheduler._take_images

    def dying():  # called with a request in the queue
        if scheduler._pending:
            raise RuntimeError("the model thread broke")
        return take()

    scheduler._take_images = dying
    with LiveServer(app) as live:
        assert httpx.get(live.url + "/health", timeout=30).status_code == 200
        result = {}
        waiting = threading.Thread(target=lambda: result.setdefault(
            "r", httpx.post(live.url + "/v1/chat/completions", json=chat(2), timeout=10)))
        waiting.start()
        waiting.join()
        assert result["r"].status_code == 503 and result["r"].json()["error"]["code"] == "scheduler_dead"
        health = httpx.get(live.url + "/health", timeout=30)
        assert health.status_code == 503 and health.json()["status"] == "unavailable"
        t0 = time.monotonic()
        r = httpx.post(live.url + "/v1/chat/completions", json=chat(2), timeout=10)
        assert r.status_code == 503 and time.monotonic() - t0 < 2
    assert scheduler.stats["failed"] == 1


def test_request_timeout_answers_504_and_frees_the_row(pipe, slow_decoding):
    app = create_app(pipe, ServeConfig(model_name="t", request_timeout=0.5, max_tokens=400))
    scheduler = app.state.scheduler
    with LiveServer(app) as live:
        t0 = time.monotonic()
        r = httpx.post(live.url + "/v1/chat/completions", json=chat(400), timeout=30)
        took = time.monotonic() - t0
        assert r.status_code == 504 and r.json()["error"]["code"] == "request_timeout"
        assert 0.5 <= took < 3  # 400 tokens at >= 20 ms would take >= 8 s
        wait_until(lambda: scheduler.load()["decoding"] == 0, 2, "the timed-out row left")
        assert scheduler.stats["cancelled"] == 1
        with httpx.stream("POST", live.url + "/v1/chat/completions", json=chat(400, stream=True), timeout=30) as s:
            events = [line for line in s.iter_lines() if line.startswith("data: ")]
        assert "request_timeout" in events[-2] and events[-1] == "data: [DONE]"


def test_shutdown_drains_running_requests(pipe, slow_decoding):
    """Asked to stop (as by SIGTERM), the server finishes the running request (60 tokens, > 1 s)
    while it refuses new work with 503."""
    app = create_app(pipe, ServeConfig(model_name="s", max_tokens=60))
    scheduler = app.state.scheduler
    live = LiveServer(app, timeout_graceful_shutdown=20).__enter__()
    result = {}
    running = threading.Thread(target=lambda: result.setdefault(
        "r", httpx.post(live.url + "/v1/chat/completions", json=chat(60), timeout=30)))
    running.start()
    wait_until(lambda: scheduler.load()["decoding"] == 1, 5, "the request started decoding")
    live.server.handle_exit(15, None)  # SIGTERM's handler
    wait_until(lambda: scheduler.draining, 2, "the scheduler was told to drain")
    assert scheduler.unavailable().status == 503 and scheduler.load()["decoding"] == 1
    running.join()
    live.thread.join(timeout=30)
    assert result["r"].status_code == 200 and result["r"].json()["usage"]["completion_tokens"] == 60
    assert scheduler.stats["completed"] == 1 and scheduler.stats["cancelled"] == 0


def test_serve_flags_reach_uvicorn(ckpt, monkeypatch):
    from cheers.serve import app as app_module
    from cheers.serve.cli import main

    seen = {}
    monkeypatch.setattr(app_module.Server, "run", lambda self: seen.setdefault("config", self.config))
    main(["--ckpt", str(ckpt), "--limit-concurrency", "7", "--graceful-shutdown-timeout", "4.5",
          "--request-timeout", "12", "--allowed-hosts", "api.example", "--cors-origin", "https://a.example",
          "--log-level", "warning"])
    config = seen["config"]
    assert config.limit_concurrency == 7 and config.timeout_graceful_shutdown == 4.5
    cfg = config.app.state.cfg
    assert cfg.request_timeout == 12 and cfg.allowed_hosts == ("api.example",)
    assert cfg.cors_origins == ("https://a.example",) and cfg.host_names() == {"api.example"}
