"""``cheers serve`` against a real server on loopback, with the official ``openai`` client.

The answers and images equal ``Pipeline.understand`` / ``generate`` / ``edit``; concurrent
requests are batched (sampler calls counted; continuous chat batching gives every row its solo
greedy tokens); every bad input gets its status and OpenAI's error JSON, and the server goes on.
"""

from __future__ import annotations

import base64
import io
import json
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import openai
import pytest
from PIL import Image
from serve_helpers import LiveServer, data_uri, png, talkative_checkpoint

from cheers.decode_batch import DecodeBatch, RowSampling
from cheers.pipeline import Pipeline, load_image
from cheers.serve import ServeConfig, create_app

KEY = "test-key-123"
STEPS = 3  # sampler steps of the tests' images: enough to exercise the sampler, and fast


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return talkative_checkpoint(tmp_path_factory.mktemp("serve-ckpt"))


@pytest.fixture(scope="module")
def pipe(ckpt):
    return Pipeline.from_pretrained(ckpt)


@pytest.fixture(scope="module")
def server(pipe):
    cfg = ServeConfig(api_key=KEY, model_name="cheers-test", max_image_pixels=128 * 128, max_n=4,
                      max_tokens=64, max_prompt_tokens=200, max_body_bytes=2**20, batch_window_ms=200, max_batch=16)
    with LiveServer(create_app(pipe, cfg)) as live:
        yield live


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)


@pytest.fixture
def stats(server):
    return server.app.state.scheduler.stats


def question(text: str, image: bytes | None = None) -> list[dict]:
    content = [{"type": "text", "text": text}]
    if image is not None:
        content.append({"type": "image_url", "image_url": {"url": data_uri(image)}})
    return [{"role": "user", "content": content}]


def pixels(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"))


RED = png((220, 30, 30))
BLUE = png((30, 30, 220))


# --------------------------------------------------------------------------- the openai client


def test_models_and_health(client, server):
    assert [m.id for m in client.models.list().data] == ["cheers-test"]
    assert client.models.retrieve("cheers-test").id == "cheers-test"
    health = httpx.get(server.url + "/health").json()  # no key needed
    assert health["status"] == "ok" and health["image_size"] == 64 and health["api_key_required"]


def test_chat_with_image_equals_understand(client, pipe):
    want = pipe.understand(Image.open(io.BytesIO(RED)), "What colour is the circle?", max_new_tokens=12)
    assert want  # a talkative model: an empty answer would make the comparison weak
    out = client.chat.completions.create(model="cheers-test", messages=question("What colour is the circle?", RED),
                                         max_tokens=12, temperature=0)
    assert out.choices[0].message.content == want
    assert out.choices[0].finish_reason == "length"
    ids = pipe.text_tokenizer.i2t_prompt("What colour is the circle?", 1)
    assert out.usage.prompt_tokens == pipe.engine.prefill([ids], [[load_image(Image.open(io.BytesIO(RED)), 64)]]).length
    assert out.usage.completion_tokens == 12
    assert out.usage.total_tokens == out.usage.prompt_tokens + 12


def test_chat_streamed_equals_understand(client, pipe):
    want = pipe.understand(Image.open(io.BytesIO(BLUE)), "How many squares are there?", max_new_tokens=15)
    stream = client.chat.completions.create(model="cheers-test", messages=question("How many squares are there?", BLUE),
                                            max_tokens=15, temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    pieces = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert sum(1 for p in pieces if p) > 1  # streamed piece by piece, not in one go
    assert "".join(pieces) == want
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 15


def test_sampled_chat_equals_understand_with_the_same_seed(client, pipe):
    kw = {"max_new_tokens": 10, "temperature": 0.9, "top_p": 0.8, "seed": 11}
    want = pipe.understand(Image.open(io.BytesIO(RED)), "Describe it", **kw)
    out = client.chat.completions.create(model="cheers-test", messages=question("Describe it", RED), max_tokens=10,
                                         temperature=0.9, top_p=0.8, seed=11)
    assert out.choices[0].message.content == want
    assert want != pipe.understand(Image.open(io.BytesIO(RED)), "Describe it", **{**kw, "seed": 12})


def test_chat_history_and_system(client, pipe):
    tok = pipe.text_tokenizer
    messages = [{"role": "system", "content": "Be brief."}, *question("What is it?", RED),
                {"role": "assistant", "content": "A circle."}, {"role": "user", "content": "Which colour?"}]
    ids = tok.i2t_prompt("Which colour?", 1, system="Be brief.", history=[("What is it?", "A circle.")])
    image = load_image(Image.open(io.BytesIO(RED)), 64)
    solo = [int(t[0]) for t in pipe.engine.decode_text([ids], [[image]], max_new_tokens=8, stop_ids={-1})]
    out = client.chat.completions.create(model="cheers-test", messages=messages, max_tokens=8, temperature=0)
    assert out.choices[0].message.content == tok.decode(solo).strip()


def test_stop_string_cuts_the_answer(client, pipe):
    full = pipe.understand(Image.open(io.BytesIO(RED)), "What colour is the circle?", max_new_tokens=12)
    stop = full[3:5]
    out = client.chat.completions.create(model="cheers-test", messages=question("What colour is the circle?", RED),
                                         max_tokens=12, temperature=0, stop=[stop])
    assert out.choices[0].finish_reason == "stop"
    assert out.choices[0].message.content == full[:full.index(stop)].strip()


def test_generation_equals_pipeline_generate(client, pipe):
    out = client.images.generate(model="cheers-test", prompt="a red circle", n=2, size="64x64",
                                 response_format="b64_json", extra_body={"seed": 7, "steps": STEPS})
    want = pipe.generate(["a red circle"] * 2, seed=7, steps=STEPS)
    assert [d.model_extra["seed"] for d in out.data] == [7, 8]
    for d, img in zip(out.data, want, strict=True):
        assert np.array_equal(pixels(d.b64_json), np.asarray(img))
    meta = json.loads(Image.open(io.BytesIO(base64.b64decode(out.data[1].b64_json))).text["cheers"])
    steps, cfg_scale, shift = pipe.sampling_settings()
    assert meta == {"prompt": "a red circle", "seed": 8, "steps": STEPS, "cfg": cfg_scale, "shift": shift,
                    "sampler": "euler", "ckpt": "cheers-test"}


def test_guidance_and_shift_reach_the_sampler(client, pipe):
    out = client.images.generate(prompt="a blue square", response_format="b64_json",
                                 extra_body={"seed": 1, "steps": STEPS, "guidance_scale": 2.0, "shift": 1.0})
    want = pipe.generate(["a blue square"], seed=1, steps=STEPS, cfg_scale=2.0, shift=1.0)[0]
    assert np.array_equal(pixels(out.data[0].b64_json), np.asarray(want))


def test_edit_equals_pipeline_edit(client, pipe):
    out = client.images.edit(model="cheers-test", image=("src.png", RED, "image/png"), prompt="a blue circle",
                             response_format="b64_json", extra_body={"seed": 2, "steps": STEPS, "strength": 0.6})
    want = pipe.edit(Image.open(io.BytesIO(RED)), "a blue circle", strength=0.6, seed=2, steps=STEPS)
    assert np.array_equal(pixels(out.data[0].b64_json), np.asarray(want))
    meta = json.loads(Image.open(io.BytesIO(base64.b64decode(out.data[0].b64_json))).text["cheers"])
    assert meta["strength"] == 0.6 and meta["prompt"] == "a blue circle"


# --------------------------------------------------------------------------- batching


def test_concurrent_image_requests_share_sampler_calls(server, client, pipe, stats, monkeypatch):
    calls = []
    sample = pipe.engine.sample_images
    monkeypatch.setattr(pipe.engine, "sample_images", lambda *a, **kw: calls.append(len(a[0])) or sample(*a, **kw))
    before = stats["sampler_calls"]

    def one(seed: int) -> str:
        return client.images.generate(prompt="a green triangle", response_format="b64_json",
                                      extra_body={"seed": seed, "steps": STEPS}).data[0].b64_json

    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(one, range(100, 108)))
    assert 1 <= len(calls) < 8 and sum(calls) == 8
    assert stats["sampler_calls"] - before == len(calls)
    solo = pipe.generate(["a green triangle"], seed=103, steps=STEPS)[0]
    # batched rows may differ from a solo run in float rounding only
    assert np.abs(pixels(got[3]).astype(int) - np.asarray(solo).astype(int)).max() <= 2


def test_concurrent_chats_get_their_solo_greedy_tokens(client, pipe, stats):
    asks = [("What colour is the circle?", RED, 30), ("How many squares are there?", BLUE, 4),
            ("a", RED, 18), ("two yellow stars", BLUE, 9), ("The answer is B.", None, 24)]
    want = [pipe.understand([Image.open(io.BytesIO(img))] if img else [], q, max_new_tokens=n) for q, img, n in asks]
    assert len(set(want)) == len(want)
    before = stats["decode_steps"]
    done_at = {}

    def one(i: int) -> str:
        q, img, n = asks[i]
        out = client.chat.completions.create(model="cheers-test", messages=question(q, img), max_tokens=n,
                                             temperature=0)
        done_at[i] = time.monotonic()
        return out.choices[0].message.content

    with ThreadPoolExecutor(len(asks)) as pool:
        got = list(pool.map(one, range(len(asks))))
    assert got == want
    assert stats["largest_chat_batch"] >= 2
    assert stats["decode_steps"] - before < sum(n for _, _, n in asks)  # rows shared decode steps
    assert done_at[1] < done_at[0]  # the short answer did not wait for the long one


def test_chat_decodes_while_an_image_batch_samples(server, client, pipe):
    """A chat sent while a long image batch runs is answered before the batch ends."""
    scheduler = server.app.state.scheduler
    with ThreadPoolExecutor(1) as pool:
        image = pool.submit(client.images.generate, prompt="a red circle", response_format="b64_json",
                            extra_body={"seed": 0, "steps": 60})
        deadline = time.monotonic() + 30
        while scheduler.load()["sampling"] == 0:
            assert time.monotonic() < deadline
            time.sleep(0.005)
        out = client.chat.completions.create(model="cheers-test", messages=question("a", RED), max_tokens=6,
                                             temperature=0)
        assert not image.done()
        assert image.result().data[0].b64_json
    assert out.choices[0].message.content == pipe.understand(Image.open(io.BytesIO(RED)), "a", max_new_tokens=6)


def test_decode_batch_rows_join_and_leave(pipe):
    """Without HTTP: rows joining every other step and leaving when done get their solo tokens."""
    tok = pipe.text_tokenizer
    asks = [("What colour is the circle?", RED, 12), ("How many squares are there? Tell me", BLUE, 5),
            ("a", BLUE, 20), ("two yellow stars and a blue square above", RED, 9)]
    images = [[load_image(Image.open(io.BytesIO(img)), 64)] for _, img, _ in asks]
    want = [[int(t[0]) for t in pipe.engine.decode_text([tok.i2t_prompt(q, 1)], [images[i]], max_new_tokens=n,
                                                         stop_ids={-1})] for i, (q, _, n) in enumerate(asks)]
    batch, rows, got, step = DecodeBatch(pipe.engine), [], [[] for _ in asks], 0
    while step == 0 or len(batch):
        if step % 2 == 0 and step // 2 < len(asks):
            i = step // 2
            batch.join([tok.i2t_prompt(asks[i][0], 1)], [images[i]], [RowSampling()])
            rows.append(i)
        picked = batch.pick()
        done = []
        for r, (i, t) in enumerate(zip(rows, picked, strict=True)):
            got[i].append(t)
            if len(got[i]) == asks[i][2]:
                done.append(r)
        batch.drop(done)
        rows = [i for r, i in enumerate(rows) if r not in done]
        batch.advance([t for r, t in enumerate(picked) if r not in done])
        step += 1
    assert got == want
    assert batch.width == 0


# --------------------------------------------------------------------------- bad input

def chat_with_url(url: str) -> dict:
    part = {"type": "image_url", "image_url": {"url": url}}
    return {"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}, part]}]}


BIG = data_uri(png((1, 2, 3), size=200))  # 40000 pixels, over the tests' limit of 128 x 128

BAD = [  # (route, body, status, param, code)
    ("chat/completions", b"{not json", 400, None, "invalid_json"),
    ("chat/completions", {"model": "cheers-test"}, 400, "messages", None),
    ("chat/completions", chat_with_url("data:image/png;base64,@@not base64@@"), 400,
     "messages[0].content[1].image_url.url", "invalid_base64"),
    ("chat/completions", chat_with_url("data:text/plain;base64,aGVsbG8="), 400,
     "messages[0].content[1].image_url.url", "invalid_image_format"),
    ("chat/completions", chat_with_url("data:image/png;base64,aGVsbG8="), 400,
     "messages[0].content[1].image_url.url", "invalid_image"),
    ("chat/completions", chat_with_url("https://example.com/cat.png"), 400,
     "messages[0].content[1].image_url.url", "image_url_not_supported"),
    ("chat/completions", chat_with_url(BIG), 400, "messages[0].content[1].image_url.url", "image_too_large"),
    ("chat/completions", {"model": "gpt-4o", "messages": question("hi")}, 404, "model", "model_not_found"),
    ("chat/completions", {"messages": question("hi"), "n": 2}, 400, "n", "n_too_large"),
    ("chat/completions", {"messages": question("hi"), "max_tokens": 65}, 400, "max_tokens", "max_tokens_too_large"),
    ("chat/completions", {"messages": [{"role": "assistant", "content": "hi"}]}, 400, "messages", None),
    ("chat/completions", {"messages": [{"role": "tool", "content": "hi"}]}, 400, "messages[0].role", None),
    ("chat/completions", {"messages": question("hi"), "temperature": "hot"}, 400, "temperature", None),
    ("chat/completions", {"messages": question("a red circle " * 100)}, 400, "messages", "context_length_exceeded"),
    ("chat/completions", {"messages": question("a red circle " * 20), "max_tokens": 64, "stop": ["a"] * 5}, 400,
     "stop", None),
    ("images/generations", {"prompt": "a red circle " * 100}, 400, "prompt", "context_length_exceeded"),
    ("images/generations", {"prompt": "a", "n": 5}, 400, "n", "n_too_large"),
    ("images/generations", {"prompt": "a", "size": "512x512"}, 400, "size", "invalid_size"),
    ("images/generations", {"prompt": "a", "response_format": "url"}, 400, "response_format", None),
    ("images/generations", {"prompt": "  "}, 400, "prompt", None),
    ("images/generations", {"prompt": "a", "steps": 10_000}, 400, "steps", "steps_too_large"),
    ("images/generations", {"prompt": "a", "model": "dall-e-3"}, 404, "model", "model_not_found"),
    ("images/generations", [1, 2], 400, None, "invalid_json"),
]


@pytest.mark.parametrize("route, body, status, param, code", BAD, ids=[f"{b[0]}-{i}" for i, b in enumerate(BAD)])
def test_bad_input_gets_its_status_and_error_json(server, route, body, status, param, code):
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    kw = {"content": body} if isinstance(body, bytes) else {"json": body}
    r = httpx.post(f"{server.url}/v1/{route}", headers=headers, timeout=30, **kw)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert err["type"] == ("not_found_error" if status == 404 else "invalid_request_error")
    assert (err["param"], err["code"]) == (param, code)
    assert_still_serving(server)


def assert_still_serving(server):
    r = httpx.post(server.url + "/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"}, timeout=30,
                   json={"messages": question("hi"), "max_tokens": 2, "temperature": 0})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1


def test_size_error_names_the_valid_size(server):
    r = httpx.post(server.url + "/v1/images/generations", headers={"Authorization": f"Bearer {KEY}"},
                   json={"prompt": "a", "size": "1024x1024"})
    assert "64x64" in r.json()["error"]["message"]


@pytest.mark.parametrize("auth", [None, "Bearer wrong-key", f"Basic {KEY}", f"Bearer {KEY}x"])
def test_wrong_or_missing_api_key(server, auth):
    headers = {} if auth is None else {"Authorization": auth}
    for method, route in (("GET", "models"), ("POST", "chat/completions"), ("POST", "images/generations")):
        r = httpx.request(method, f"{server.url}/v1/{route}", headers=headers, json={"prompt": "a"})
        assert r.status_code == 401
        assert r.json()["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url + "/v1", api_key="nope", max_retries=0).models.list()
    assert httpx.get(server.url + "/").status_code == 200  # the page itself needs no key


def test_body_over_the_limit_is_413(server):
    r = httpx.post(server.url + "/v1/chat/completions", content=b"x" * (2**20 + 1),
                   headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"

    def chunked():
        for _ in range(5):
            yield b"y" * 2**18

    r = httpx.post(server.url + "/v1/chat/completions", content=chunked(),
                   headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    assert r.status_code == 413
    assert_still_serving(server)


@pytest.mark.parametrize("files, data, param", [
    ({"image": ("a.png", RED, "image/png"), "mask": ("m.png", RED, "image/png")}, {"prompt": "a"}, "mask"),
    ({"prompt": (None, "a")}, {}, "image"),  # multipart without an image
    ({"image": ("a.png", b"not an image", "image/png")}, {"prompt": "a"}, "image"),
    ({"image": ("a.png", RED, "image/png")}, {"prompt": "a", "strength": "strong"}, "strength"),
    ({"image": ("a.png", RED, "image/png")}, {"prompt": "a", "strength": "1.5"}, "strength"),
    ({"image": ("a.png", RED, "image/png")}, {"prompt": ""}, "prompt"),
])
def test_bad_edits(server, files, data, param):
    r = httpx.post(server.url + "/v1/images/edits", headers={"Authorization": f"Bearer {KEY}"}, files=files, data=data)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param
    assert_still_serving(server)


def test_edit_must_be_multipart(server):
    r = httpx.post(server.url + "/v1/images/edits", headers={"Authorization": f"Bearer {KEY}"}, json={"prompt": "a"})
    assert r.status_code == 415 and "multipart/form-data" in r.json()["error"]["message"]


def test_unknown_route_is_json_404(server):
    r = httpx.get(server.url + "/v1/nothing", headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"


def test_full_queue_answers_429_with_retry_after(pipe):
    """A server of queue size 1 whose sampler is held: the second request is refused."""
    app = create_app(pipe, ServeConfig(model_name="q", queue_size=1, batch_window_ms=0))
    scheduler = app.state.scheduler
    release, sample = threading.Event(), scheduler._sample
    scheduler._sample = lambda jobs: release.wait(30) and sample(jobs)
    body = {"prompt": "a red circle", "response_format": "b64_json", "steps": STEPS, "seed": 0}
    with LiveServer(app) as live, ThreadPoolExecutor(1) as pool:
        first = pool.submit(httpx.post, live.url + "/v1/images/generations", json=body, timeout=60)
        deadline = time.monotonic() + 10
        while scheduler.load()["sampling"] == 0:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        for route, payload in (("images/generations", body),
                               ("chat/completions", {"messages": question("hi"), "max_tokens": 2})):
            r = httpx.post(f"{live.url}/v1/{route}", json=payload)
            assert r.status_code == 429
            assert int(r.headers["Retry-After"]) >= 1
            assert r.json()["error"]["code"] == "queue_full" and r.json()["error"]["type"] == "rate_limit_error"
        with pytest.raises(openai.RateLimitError):
            openai.OpenAI(base_url=live.url + "/v1", api_key="-", max_retries=0).images.generate(prompt="a")
        release.set()
        assert first.result().status_code == 200
        assert httpx.post(live.url + "/v1/images/generations", json=body, timeout=60).status_code == 200
    assert scheduler.stats["rejected"] == 3


def test_a_failing_batch_fails_only_its_bad_request(pipe):
    """If a batch fails, its requests run alone: only the one that fails alone gets the error."""
    app = create_app(pipe, ServeConfig(model_name="f", batch_window_ms=300))
    scheduler, sample = app.state.scheduler, app.state.scheduler._sample

    def fragile(jobs):
        if any(j.request.prompt == "poison" for j in jobs):
            raise RuntimeError("poisoned batch")
        return sample(jobs)

    scheduler._sample = fragile
    with LiveServer(app) as live, ThreadPoolExecutor(3) as pool:
        posts = [pool.submit(httpx.post, live.url + "/v1/images/generations", timeout=60,
                             json={"prompt": p, "steps": STEPS, "seed": 0}) for p in ("a", "poison", "b")]
        codes = [f.result().status_code for f in posts]
    assert codes == [200, 500, 200]
    assert posts[1].result().json()["error"]["type"] == "server_error"


# --------------------------------------------------------------------------- the command


def test_serve_without_checkpoint_says_how_to_make_one(tmp_path, monkeypatch, capsys):
    from cheers.cli import main

    monkeypatch.setenv("CHEERS_HOME", str(tmp_path))
    with pytest.raises(SystemExit) as e:
        main(["serve"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "cheers demo" in err and "cheers debug-checkpoint" in err


def test_serve_rejects_bad_settings_before_loading(tmp_path, capsys):
    from cheers.cli import main

    with pytest.raises(SystemExit) as e:
        main(["serve", "--ckpt", str(tmp_path), "--queue-size", "0"])
    assert e.value.code == 2 and "--queue-size" in capsys.readouterr().err


@pytest.mark.slow  # a fresh process imports torch and loads the model
def test_cheers_serve_command_answers(ckpt):
    """The real command in its own process: the openai client reaches it with the API key."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env_key = "cli-key"
    proc = subprocess.Popen([sys.executable, "-m", "cheers.cli", "serve", "--ckpt", str(ckpt), "--port", str(port),
                             "--log-level", "warning"], env={**os.environ, "CHEERS_API_KEY": env_key},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, proc.stdout.read()
            try:
                if httpx.get(url + "/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "cheers serve did not come up"
            time.sleep(0.2)
        client = openai.OpenAI(base_url=url + "/v1", api_key=env_key, max_retries=0)
        assert [m.id for m in client.models.list().data] == [ckpt.name]
        assert httpx.get(url + "/v1/models").status_code == 401
    finally:
        proc.terminate()
        proc.wait(timeout=30)
