"""A request whose client goes away leaves the model within one decode or sampler step, frees
its rows and queue slot, and counts as cancelled. The model is slowed down so that no request
here can finish on its own before the assertions: each would take many seconds."""

from __future__ import annotations

import threading
import time

import httpx
import pytest
from serve_helpers import LiveServer, talkative_checkpoint, wait_until

from cheers.decode_batch import DecodeBatch
from cheers.pipeline import Pipeline
from cheers.serve import ServeConfig, create_app

TOKENS = 300  # at >= 20 ms a decode step: >= 6 s per answer
STEPS = 200  # at >= 20 ms a sampler step: >= 4 s per image
SLOW = 0.02


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    return Pipeline.from_pretrained(talkative_checkpoint(tmp_path_factory.mktemp("cancel-ckpt")))


@pytest.fixture
def slow(pipe, monkeypatch) -> dict:
    """The model slowed to >= 20 ms a decode step and a sampler step; counts both."""
    advance, velocity = DecodeBatch.advance, pipe.engine.image_velocity
    calls = {"advance": 0, "velocity": 0}

    def slow_advance(self, tokens):
        calls["advance"] += 1
        time.sleep(SLOW)
        return advance(self, tokens)

    def slow_velocity(*a, **kw):
        calls["velocity"] += 1
        time.sleep(SLOW)
        return velocity(*a, **kw)

    monkeypatch.setattr(DecodeBatch, "advance", slow_advance)
    monkeypatch.setattr(pipe.engine, "image_velocity", slow_velocity)
    return calls


def serve(pipe, calls: dict, **settings) -> LiveServer:
    cfg = ServeConfig(model_name="c", max_tokens=TOKENS, batch_window_ms=0, max_steps=STEPS, **settings)
    server = LiveServer(create_app(pipe, cfg))
    server.calls = calls
    return server


@pytest.fixture
def live(pipe, slow):
    with serve(pipe, slow) as server:
        yield server


def chat_body(stream: bool = False) -> dict:
    return {"messages": [{"role": "user", "content": "Tell me a long story"}], "max_tokens": TOKENS,
            "temperature": 0, "stream": stream}


def leave_after(url: str, body: dict, seconds: float) -> None:
    """POST ``body`` and hang up after ``seconds`` without reading the answer."""
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(url, json=body, timeout=httpx.Timeout(30, read=seconds))


def assert_stopped(server, what: str, counter: str, before: dict, stats_before: dict, cancelled: int) -> None:
    scheduler = server.app.state.scheduler
    key = "decoding" if what == "chat" else "sampling"
    # generous for a busy machine: what shows the work stopped early is the count of model steps below
    wait_until(lambda: scheduler.load()[key] == 0 and scheduler.stats["cancelled"] == stats_before["cancelled"]
               + cancelled, 10.0, f"the abandoned {what} requests left the {key} batch")
    time.sleep(0.5)  # the step running when the client left ends
    done = server.calls[counter]
    time.sleep(0.5)
    assert server.calls[counter] == done, f"the model kept working for the abandoned {what}"
    assert done - before[counter] < (TOKENS if what == "chat" else STEPS) // 3
    assert scheduler.stats["completed"] == stats_before["completed"]
    assert scheduler.load() == {"waiting": 0, "decoding": 0, "sampling": 0, "capacity": scheduler.cfg.queue_size}


def test_abandoned_chats_stop_decoding(live):
    """Four non-streaming chats whose clients leave after 0.3 s (the issue's case)."""
    before, stats = dict(live.calls), dict(live.app.state.scheduler.stats)
    threads = [threading.Thread(target=leave_after, args=(live.url + "/v1/chat/completions", chat_body(), 0.3))
               for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert_stopped(live, "chat", "advance", before, stats, cancelled=4)


def test_abandoned_stream_stops_decoding(live):
    before, stats = dict(live.calls), dict(live.app.state.scheduler.stats)
    with httpx.stream("POST", live.url + "/v1/chat/completions", json=chat_body(stream=True), timeout=30) as r:
        assert r.status_code == 200
        next(r.iter_lines())
        wait_until(lambda: live.calls["advance"] > before["advance"], 5, "the stream started decoding")
    assert_stopped(live, "chat", "advance", before, stats, cancelled=1)


def test_abandoned_image_stops_sampling(live):
    before, stats = dict(live.calls), dict(live.app.state.scheduler.stats)
    body = {"prompt": "a red circle", "steps": STEPS, "seed": 0}
    leave_after(live.url + "/v1/images/generations", body, 0.5)
    assert_stopped(live, "image", "velocity", before, stats, cancelled=1)


def test_waiting_request_leaves_the_queue_at_once(pipe, slow):
    """One request at a time: a chat queued behind an image frees its slot the moment its client
    leaves, before it reaches the model; it is never prefilled."""
    with serve(pipe, slow, max_batch=1) as live:
        scheduler = live.app.state.scheduler
        image = threading.Thread(target=leave_after, args=(live.url + "/v1/images/generations",
                                                           {"prompt": "a", "steps": STEPS, "seed": 0}, 1.5))
        image.start()
        wait_until(lambda: scheduler.load()["sampling"] == 1, 5, "the image batch started")
        leave_after(live.url + "/v1/chat/completions", chat_body(), 0.3)
        wait_until(lambda: scheduler.stats["cancelled"] == 1, 0.5, "the waiting chat was cancelled")
        assert scheduler.load()["waiting"] == 0 and scheduler.load()["sampling"] == 1
        image.join()
        wait_until(lambda: scheduler.stats["cancelled"] == 2, 2, "the image was cancelled")
        assert scheduler.stats["prefills"] == 0 and scheduler.stats["completed"] == 0
