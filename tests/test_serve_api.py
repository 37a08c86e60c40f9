"""The chat API follows OpenAI's and vLLM's documented behaviour: image-only user messages,
``max_completion_tokens`` over ``max_tokens``, ``usage`` in a stream only when asked for,
unsupported parameters refused by name, any 64-bit seed."""

from __future__ import annotations

import io
import json

import httpx
import openai
import pytest
from PIL import Image
from serve_helpers import LiveServer, data_uri, png, talkative_checkpoint

from cheers.pipeline import Pipeline
from cheers.serve import ServeConfig, create_app
from cheers.serve.validation import chat_prompt
from cheers.text_tokenizer import DEFAULT_SYSTEM

RED = png((220, 30, 30))


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    return Pipeline.from_pretrained(talkative_checkpoint(tmp_path_factory.mktemp("api-ckpt")))


@pytest.fixture(scope="module")
def server(pipe):
    with LiveServer(create_app(pipe, ServeConfig(model_name="a", max_tokens=32))) as live:
        yield live


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="-", max_retries=0, timeout=60)


def user(text: str | None, image: bytes | None = None) -> list[dict]:
    content = [] if text is None else [{"type": "text", "text": text}]
    if image is not None:
        content.append({"type": "image_url", "image_url": {"url": data_uri(image)}})
    return [{"role": "user", "content": content}]


def test_image_only_user_message(client, pipe):
    out = client.chat.completions.create(model="a", messages=user(None, RED), max_tokens=6, temperature=0)
    tok = pipe.text_tokenizer
    ids = chat_prompt(tok, DEFAULT_SYSTEM, [], "", 1)
    image = pipe.engine.prefill([ids], [[pipe_image(pipe)]])
    solo = [int(t[0]) for t in pipe.engine.decode_text([ids], [[pipe_image(pipe)]], max_new_tokens=6,
                                                         stop_ids={-1})]
    assert out.choices[0].message.content == tok.decode(solo).strip()
    assert out.usage.prompt_tokens == image.length


def pipe_image(pipe):
    from cheers.pipeline import load_image

    return load_image(Image.open(io.BytesIO(RED)), pipe.image_size)


def test_chat_prompt_lays_out_as_the_tokenizer(pipe):
    """With text in every turn, the server's layout is the tokenizer's own; without text, the
    user turn holds the image block alone."""
    tok = pipe.text_tokenizer
    history = [("What is it?", "A circle.")]
    assert chat_prompt(tok, "Be brief.", history, "Which colour?", 1) == tok.i2t_prompt(
        "Which colour?", 1, system="Be brief.", history=history)
    with_text = tok.i2t_prompt("x", 1)
    x = tok.encode("x")
    k = len(with_text) - len(tok.assistant_open()) - len(tok.newline) - 1 - len(x)
    assert chat_prompt(tok, DEFAULT_SYSTEM, [], "", 1) == with_text[:k] + with_text[k + len(x):]


def test_empty_message_without_image_is_refused(server):
    r = httpx.post(server.url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": ""}]},
                   timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"


def test_max_completion_tokens_wins_over_max_tokens(client):
    out = client.chat.completions.create(model="a", messages=user("hi"), max_tokens=10, max_completion_tokens=3,
                                         temperature=0)
    assert out.usage.completion_tokens == 3
    out = client.chat.completions.create(model="a", messages=user("hi"), max_tokens=4, temperature=0)
    assert out.usage.completion_tokens == 4


def sse(server, body: dict) -> list[dict]:
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=60) as r:
        assert r.status_code == 200
        lines = [line[len("data: "):] for line in r.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(x) for x in lines[:-1]]


def test_stream_usage_only_when_asked(server):
    body = {"messages": user("hi"), "max_tokens": 5, "temperature": 0, "stream": True}
    chunks = sse(server, body)
    assert all("usage" not in c for c in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    chunks = sse(server, {**body, "stream_options": {"include_usage": True}})
    assert all(c["usage"] is None for c in chunks[:-1])
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 5


@pytest.mark.parametrize("key, value", [("presence_penalty", 0.5), ("frequency_penalty", -1), ("logit_bias", {"5": 3}),
                                        ("top_k", "5"), ("top_k", 5), ("n", 2), ("logprobs", True),
                                        ("tools", [{"type": "function"}]), ("best_of", 2), ("foo", 1),
                                        ("stream_options", {"include_usage": True})])
def test_unsupported_parameters_are_refused_by_name(server, key, value):
    r = httpx.post(server.url + "/v1/chat/completions", json={"messages": user("hi"), "max_tokens": 2, key: value},
                   timeout=30)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == key and key in r.json()["error"]["message"]


@pytest.mark.parametrize("key, value", [("presence_penalty", 0), ("logit_bias", {}), ("logprobs", False),
                                        ("top_k", -1), ("user", "someone"), ("n", 1)])
def test_parameters_at_their_off_value_are_accepted(server, key, value):
    r = httpx.post(server.url + "/v1/chat/completions", json={"messages": user("hi"), "max_tokens": 2, key: value},
                   timeout=30)
    assert r.status_code == 200, r.text


def test_image_routes_refuse_unknown_parameters(server):
    for body, param in (({"prompt": "a", "style": "vivid"}, "style"), ({"prompt": "a", "strength": 0.5}, "strength"),
                        ({"prompt": "a", "quality": "hd"}, "quality")):
        r = httpx.post(server.url + "/v1/images/generations", json=body, timeout=30)
        assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text


def test_negative_seed_is_accepted_and_reproducible(client, pipe):
    kw = {"max_new_tokens": 8, "temperature": 0.9, "top_p": 0.8}
    want = pipe.understand([], "Describe it", seed=-5, **kw)
    out = client.chat.completions.create(model="a", messages=user("Describe it"), max_tokens=8, temperature=0.9,
                                         top_p=0.8, seed=-5)
    assert out.choices[0].message.content == want
    r = httpx.post(client.base_url.join("images/generations").__str__(), timeout=60,
                   json={"prompt": "a red circle", "seed": -(2**63), "n": 2, "steps": 2})
    assert r.status_code == 200 and [d["seed"] for d in r.json()["data"]] == [-(2**63), -(2**63) + 1]
