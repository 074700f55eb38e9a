"""`picospec edge-serve`: OpenAI's shapes, checked with OpenAI's own Python client.

Fast tests run the aiohttp app over a fake client (one token per character); the slow ones start
the real command with the default models once and talk to it over HTTP.
"""
from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from aiohttp.test_utils import TestClient, TestServer

from edge_app.openai_protocol import RequestError, parse_request
from edge_app.openai_server import EdgeServer
from edge_app.pipeline import GenerateOptions
from edge_app.textstream import find_stop, holdback
from tests.fake_edge import FakeClient

openai = pytest.importorskip("openai")
ROOT = Path(__file__).resolve().parents[1]
ANSWER = "Hello world, this is a test. 1, 2, 3."


# -- pure ------------------------------------------------------------------------------------
def test_stop_strings():
    assert find_stop("abc. def", (".",)) == 3
    assert find_stop("abc", ("x", "bc")) == 1
    assert find_stop("abc", ()) is None
    assert holdback("Hello wor", ("world",)) == 3
    assert holdback("Hello", ("world",)) == 0
    assert holdback("ab\n", ("\n\n", "b\nx")) == 2


@pytest.mark.parametrize("body, param", [
    ({}, "messages"),
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, "messages[0].role"),
    ({"messages": [{"role": "user", "content": 3}]}, "messages[0].content"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}, "max_tokens"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": "8"}, "max_tokens"),
    ({"messages": [{"role": "user", "content": "hi"}], "temperature": 3}, "temperature"),
    ({"messages": [{"role": "user", "content": "hi"}], "top_p": 0}, "top_p"),
    ({"messages": [{"role": "user", "content": "hi"}], "n": 2, "stream": True}, "n"),
    ({"messages": [{"role": "user", "content": "hi"}], "stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"messages": [{"role": "user", "content": "hi"}], "seed": True}, "seed"),
    ({"messages": [{"role": "user", "content": "hi"}], "picospec": {"mode": "fast"}}, "picospec.mode"),
])
def test_bad_requests_name_the_parameter(body, param):
    with pytest.raises(RequestError) as err:
        parse_request(body, True, GenerateOptions())
    assert err.value.status == 400 and err.value.param == param


def test_request_defaults_and_aliases():
    req = parse_request({"messages": [{"role": "developer", "content": [{"type": "text", "text": "a"}]}],
                         "max_completion_tokens": 7, "stop": "x"}, True, GenerateOptions(max_new_tokens=99, mode="sync"))
    assert req.messages == [{"role": "system", "content": "a"}]
    # the server's defaults fill what the request leaves out
    assert (req.max_tokens, req.stop, req.temperature, req.n, req.mode) == (7, ("x",), 0.0, 1, "sync")
    assert parse_request({"prompt": ["abc"]}, False, GenerateOptions()).prompt == "abc"


# -- the app over a fake client --------------------------------------------------------------
def with_app(client: FakeClient, check, defaults: GenerateOptions = GenerateOptions(max_new_tokens=64, mode="pipeline")):
    """Run `await check(http, api)` against the app: an aiohttp test client and an AsyncOpenAI."""
    async def main():
        server = EdgeServer(client, defaults)
        async with TestClient(TestServer(server.app)) as http:
            api = openai.AsyncOpenAI(base_url=str(http.make_url("/v1")), api_key="x", max_retries=0)
            await check(http, api)
    asyncio.run(main())


def test_chat_whole_and_streamed_agree():
    async def check(http, api):
        whole = await api.chat.completions.create(model="any", messages=[{"role": "user", "content": "hi"}])
        assert whole.choices[0].message.content == ANSWER
        assert whole.choices[0].finish_reason == "stop"
        assert whole.usage.completion_tokens == len(ANSWER)
        assert whole.usage.total_tokens == whole.usage.prompt_tokens + whole.usage.completion_tokens
        extra = whole.model_extra["picospec"]
        assert extra["mode"] == "pipeline" and extra["target_quality"] is True and extra["acceptance_rate"] > 0
        stream = await api.chat.completions.create(model="any", messages=[{"role": "user", "content": "hi"}],
                                                   stream=True, stream_options={"include_usage": True})
        chunks = [c async for c in stream]
        assert chunks[0].choices[0].delta.role == "assistant"
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == ANSWER
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
        assert chunks[-1].usage.completion_tokens == len(ANSWER)
    with_app(FakeClient(), check)


def test_completions_length_n_and_stop():
    async def check(http, api):
        out = await api.completions.create(model="any", prompt="count:", max_tokens=5, n=2)
        assert [c.text for c in out.choices] == [ANSWER[:5]] * 2
        assert out.choices[0].finish_reason == "length" and out.usage.completion_tokens == 10
        cut = await api.completions.create(model="any", prompt="count:", stop=[", 2"])
        assert cut.choices[0].text == "Hello world, this is a test. 1" and cut.choices[0].finish_reason == "stop"
        assert cut.model_extra["picospec"]["partial"] is True and cut.usage.completion_tokens == len(ANSWER[:33])
        stream = await api.completions.create(model="any", prompt="x", stop="world", stream=True)
        assert "".join([c.choices[0].text async for c in stream if c.choices]) == "Hello "
    with_app(FakeClient(), check)


def test_errors_are_openai_shaped():
    async def check(http, api):
        bad = await http.post("/v1/chat/completions", data=b"{not json", headers={"Content-Type": "application/json"})
        body = await bad.json()
        assert bad.status == 400 and body["error"]["type"] == "invalid_request_error"
        assert set(body["error"]) == {"message", "type", "param", "code"}
        missing = await http.post("/v1/chat/completions", json={"model": "x"})
        assert missing.status == 400 and (await missing.json())["error"]["param"] == "messages"
        nowhere = await http.get("/v1/nowhere")
        assert nowhere.status == 404 and (await nowhere.json())["error"]["type"] == "not_found_error"
        with pytest.raises(openai.BadRequestError):
            await api.chat.completions.create(model="x", messages=[{"role": "user", "content": "hi"}], max_tokens=-1)
        models = await api.models.list()
        assert [m.id for m in models.data] == ["picospec"]
    with_app(FakeClient(), check)


def test_cloud_down_is_503_unless_edge_is_asked_for():
    async def check(http, api):
        for stream in (False, True):
            resp = await http.post("/v1/chat/completions", json={
                "messages": [{"role": "user", "content": "hi"}], "stream": stream})
            assert resp.status == 503 and (await resp.json())["error"]["code"] == "cloud_unreachable"
        edge = await api.chat.completions.create(model="x", messages=[{"role": "user", "content": "hi"}],
                                                 extra_body={"picospec": {"mode": "edge"}})
        assert edge.choices[0].message.content == ANSWER
        assert edge.model_extra["picospec"]["target_quality"] is False
    with_app(FakeClient(refuse="unreachable"), check)


def test_one_generation_at_a_time():
    client = FakeClient(delay_s=0.01)

    async def check(http, api):
        asks = [api.chat.completions.create(model="x", messages=[{"role": "user", "content": str(i)}])
                for i in range(3)]
        outs = await asyncio.gather(*asks)
        assert all(o.choices[0].message.content == ANSWER for o in outs)
    with_app(client, check)
    assert client.max_running == 1


# -- the real command ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def edge_server():
    """`picospec edge-serve --port 0` with the default models (local verifier), started once."""
    proc = subprocess.Popen([sys.executable, "-m", "picospec.cli", "edge-serve", "--port", "0", "--dtype", "float32"], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    deadline, lines = time.monotonic() + 600, []
    url = None
    while time.monotonic() < deadline and url is None:
        line = proc.stdout.readline()
        if not line and proc.poll() is not None:
            break
        lines.append(line)
        m = re.search(r"listening on (http://\S+/v1)", line)
        url = m.group(1) if m else None
    if url is None:
        proc.kill()
        pytest.fail("edge-serve did not start:\n" + "".join(lines[-30:]))
    yield url
    proc.terminate()
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()


@pytest.fixture(scope="module")
def api(edge_server):
    return openai.OpenAI(base_url=edge_server, api_key="x", timeout=300, max_retries=0)


QUESTION = [{"role": "user", "content": "Write a Python function that adds two numbers."}]


@pytest.mark.slow
def test_real_chat_streamed_equals_whole(api):
    whole = api.chat.completions.create(model="picospec", messages=QUESTION, max_tokens=24, temperature=0)
    text = whole.choices[0].message.content
    assert text and whole.usage.completion_tokens <= 24
    assert whole.usage.total_tokens == whole.usage.prompt_tokens + whole.usage.completion_tokens
    assert whole.model_extra["picospec"]["target_quality"] is True
    chunks = list(api.chat.completions.create(model="picospec", messages=QUESTION, max_tokens=24, temperature=0,
                                              stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason


@pytest.mark.slow
def test_real_completions_usage(api):
    out = api.completions.create(model="picospec", prompt="def fibonacci(n):", max_tokens=16, temperature=0)
    assert out.choices[0].finish_reason in ("length", "stop") and out.choices[0].text
    assert 0 < out.usage.completion_tokens <= 16 and out.usage.prompt_tokens >= 4
    assert out.model_extra["picospec"]["tokens_per_s"] > 0


@pytest.mark.slow
def test_real_malformed_request_is_400(edge_server):
    req = urllib.request.Request(edge_server + "/chat/completions", data=b'{"messages": ', method="POST",
                                 headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(req, timeout=30)
    assert err.value.code == 400
    assert json.loads(err.value.read())["error"]["type"] == "invalid_request_error"
