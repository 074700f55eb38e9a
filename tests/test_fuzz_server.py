"""Fuzzing the server's message handling (hypothesis; bounded for CI, 300 examples a test).

Random and mutated frames, valid messages in hostile orders, and an interactive hostile edge
(tests/fuzz_support.py) go to a real server with the tiny model. Throughout: the server never
crashes and never fails inside (an "internal" Error), every reply decodes, every refusal is one
Error with a known code and is the last message, a well-behaved edge is never refused, a second
healthy session keeps answering correctly, and memory stays bounded.

`pytest -s` prints how many inputs of each kind were tried and what came back;
PICOSPEC_FUZZ_RANDOM=1 draws new inputs on every run instead of the same derandomized ones.
"""
from __future__ import annotations

import asyncio
import time

import aiohttp
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import codec
from cloud.engine import TargetEngine
from cloud.metrics import process_memory
from cloud.server import ServerConfig
from tests.fuzz_support import (
    FUZZ,
    KNOWN_CODES,
    MAX_CONTEXT,
    TRIED,
    WINDOW_S,
    HostileEdge,
    count,
    edge_script,
    exchange,
    frames,
    session,
)
from tests.tiny import fingerprint, tiny_model
from tests.tiny_edge import HealthySession, Verifier, hello_frame

RSS_AT_START = [0.0]


def rss() -> float:
    return process_memory().get("picospec_process_resident_bytes", 0.0)


@pytest.fixture(scope="module")
def target():
    # a tiny model's passes take microseconds of arithmetic: a second torch thread only adds
    # hand-off overhead, and CPU time is what bounds this module
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield tiny_model(0)
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def verifier(target):
    config = ServerConfig(port=0, hello_timeout_s=3, idle_timeout_s=30, max_context=MAX_CONTEXT)
    with Verifier(TargetEngine(target), config) as v:
        yield v


@pytest.fixture(scope="module")
def healthy(verifier, target):
    with HealthySession(verifier.url, target, n=8, pause_s=0.5) as h:  # answering all along, not hogging
        yield h
    h.check(min_answers=1)


@pytest.fixture(scope="module", autouse=True)
def report(verifier, healthy):
    t0 = time.monotonic()
    RSS_AT_START[0] = rss()
    yield
    total = sum(v for k, v in TRIED.items() if k.startswith("input:"))
    print(f"\nfuzz: {total} inputs in {time.monotonic() - t0:.1f} s: "
          + ", ".join(f"{k} {v}" for k, v in sorted(TRIED.items())))


def check(verifier, healthy, replies: list, kind: str, refusal_allowed: bool = True) -> None:
    codes = count(replies, kind)
    assert set(codes) <= KNOWN_CODES, codes  # "internal" would be a server bug
    assert len(codes) <= 1 and (not codes or isinstance(replies[-1], codec.Error)), replies
    assert refusal_allowed or not codes, f"a well-behaved edge was refused: {replies[-1]}"
    assert verifier.thread.thread.is_alive()
    assert healthy.error is None and not healthy.wrong


@FUZZ
@given(frames=frames, with_hello=st.booleans())
def test_random_and_mutated_frames(verifier, healthy, frames, with_hello):
    replies = asyncio.run(exchange(verifier.url, frames, hello_frame() if with_hello else None))
    check(verifier, healthy, replies, "frames" + ("" if with_hello else " as hello"))


@FUZZ
@given(spec=session())
def test_hostile_message_sequences(verifier, healthy, spec):
    sampling, variant, msgs = spec
    hello = codec.encode(codec.Hello(fingerprint=fingerprint(), sampling=sampling, variant=variant))
    t0 = time.monotonic()
    replies = asyncio.run(exchange(verifier.url, [codec.encode(m) for m in msgs], hello))
    assert time.monotonic() - t0 < WINDOW_S, "the server did not get through a short session"
    check(verifier, healthy, replies, "sequence")
    for m in msgs:
        TRIED[f"msg:{type(m).__name__}"] += 1


@FUZZ
@given(script=edge_script)
def test_interactive_hostile_edge(verifier, healthy, target, script):
    sampling, variant, actions = script

    async def play() -> HostileEdge:
        async with aiohttp.ClientSession() as http:
            async with http.ws_connect(verifier.url) as ws:
                edge = HostileEdge(ws, target, sampling, variant)
                await edge.send(codec.Hello(fingerprint=fingerprint(), sampling=sampling, variant=variant))
                assert isinstance(await edge.reply(), codec.Welcome)
                await edge.run(actions)
                return edge

    edge = asyncio.run(play())
    check(verifier, healthy, edge.replies, "edge", refusal_allowed=edge.faulted)
    TRIED["edge:committed tokens"] += len(edge.committed)


def test_after_the_fuzz_the_server_holds_nothing_and_memory_is_bounded(verifier, healthy):
    deadline = time.monotonic() + 5
    while len(verifier.server.sessions) > 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(verifier.server.sessions) == 1  # the healthy one: every fuzz session was freed
    healthy.check(min_answers=3)
    grown = rss() - RSS_AT_START[0]
    assert grown < 256 << 20, f"resident memory grew {grown / 2**20:.0f} MiB over {dict(TRIED)}"
