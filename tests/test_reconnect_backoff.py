"""Edges that do not stampede, and several verifier URLs.

- backoff_delay is full jitter under a cap; a seeded source repeats its delays.
- 64 simulated edges lose the same replica at the same instant (their real `_reconnect`, with only
  the socket step stubbed): their first retries are spread over the jitter window, not all in the
  same few milliseconds, and no edge ever waits longer than the cap between two attempts.
- URLs are tried in turn: over real loopback sockets, a closed port first falls through to a live
  tiny verifier second; a replica lost mid-answer is resumed on the other one with the same output.
"""
from __future__ import annotations

import asyncio
import random
import socket
from dataclasses import replace

import pytest

from cloud.engine import TargetEngine
from edge_app.args import add_edge_arguments, edge_config_kwargs
from edge_app.client import EdgeClient, EdgeConfig, backoff_delay, parse_cloud_urls
from edge_app.link import CloudError
from edge_app.pipeline import GenerateOptions
from picospec.api import generate_async
from tests.tiny import TinyDrafter, perturbed, tiny_model
from tests.tiny_edge import NO_STOP, Commits, Verifier, reference, tiny_client

PROMPT = [5, 9, 11, 40, 2]
N = 40


# -- the delay -------------------------------------------------------------------------------
def test_backoff_is_full_jitter_under_a_cap():
    rng = random.Random(7)
    for attempt in range(12):
        window = min(2.0, 0.25 * 2 ** attempt)
        draws = [backoff_delay(attempt, 0.25, 2.0, rng) for _ in range(400)]
        assert all(0.0 <= d <= window for d in draws)
        assert max(draws) > 0.8 * window and min(draws) < 0.2 * window  # the whole window is used
    assert backoff_delay(10_000, 0.25, 2.0, rng) <= 2.0  # no overflow at absurd attempt counts
    a, b = random.Random(3), random.Random(3)
    assert [backoff_delay(k, 0.25, 2.0, a) for k in range(8)] == [backoff_delay(k, 0.25, 2.0, b) for k in range(8)]


def test_cloud_urls_from_config_and_flags():
    import argparse

    assert parse_cloud_urls("ws://a:1/ws, ws://b:2/ws,,ws://a:1/ws", ("ws://c:3",)) == (
        "ws://a:1/ws", "ws://b:2/ws", "ws://c:3")
    assert EdgeConfig().cloud_urls == () and EdgeConfig(cloud="ws://x:1").cloud_urls == ("ws://x:1",)
    p = argparse.ArgumentParser()
    add_edge_arguments(p)
    args = p.parse_args(["--cloud", "ws://a:1,ws://b:2", "--cloud", "wss://c:3"])
    assert EdgeConfig(**edge_config_kwargs(args)).cloud_urls == ("ws://a:1", "ws://b:2", "wss://c:3")
    with pytest.raises(SystemExit):
        p.parse_args(["--cloud", "ws://a:1,,"])


# -- 64 edges losing one replica -----------------------------------------------------------------
class RecordingRandom(random.Random):
    """A default-seeded source (as in production: each edge its own) that remembers its draws."""

    def __init__(self):
        super().__init__()
        self.draws: list[float] = []

    def uniform(self, a, b):
        x = super().uniform(a, b)
        self.draws.append(x)
        return x


class SimulatedEdge(EdgeClient):
    """The real reconnect loop; the one-URL connect step records (time, url) and fails."""

    def __init__(self, config: EdgeConfig, t0: float, log: list):
        super().__init__(config)
        self.t0, self.log = t0, log
        self.rng = RecordingRandom()

    async def _open(self, url, options, connect_timeout_s):
        self.log.append((asyncio.get_running_loop().time() - self.t0, url))
        raise CloudError("unreachable", f"{url} is down")


def simulate(n: int, config: EdgeConfig) -> list[list[tuple[float, str]]]:
    async def go():
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        logs = [[] for _ in range(n)]
        edges = [SimulatedEdge(config, t0, logs[i]) for i in range(n)]
        lost = CloudError("disconnected", "the replica went away")
        results = await asyncio.gather(*(e._reconnect(GenerateOptions(), lost) for e in edges))
        assert results == [None] * n  # gave up into edge-only, as configured
        assert not any(e.cloud_available for e in edges)
        return logs, [e.rng.draws for e in edges]
    return asyncio.run(go())


def test_sixty_four_edges_do_not_retry_in_the_same_millisecond():
    config = EdgeConfig(cloud="ws://127.0.0.1:9/ws", reconnect_s=2.0, backoff_base_s=0.25, backoff_cap_s=0.5)
    logs, draws = simulate(64, config)
    # the delays the edges chose before their first retry: spread over [0, base], no two alike
    chosen = sorted(d[0] for d in draws)
    assert all(0 <= d <= 0.25 for d in chosen) and len(set(chosen)) == 64
    assert chosen[-1] - chosen[0] >= 0.15
    assert max(sum(1 for t in chosen if s <= t < s + 0.005) for s in chosen) <= 8
    # and the attempts really happened spread out (looser: a loaded machine delays timers)
    first = sorted(log[0][0] for log in logs)
    assert first[-1] <= 0.25 + 0.3 and first[-1] - first[0] >= 0.1, first
    busiest = max(sum(1 for t in first if s <= t < s + 0.005) for s in first)
    assert busiest <= 32, f"{busiest} of 64 first retries within 5 ms: {first}"
    # capped: no delay past the cap, and they keep trying until the deadline
    for log, d in zip(logs, draws):
        assert max(d) <= 0.5 and d[2:] and max(d[2:]) > 0  # windows 0.25, 0.5, then capped at 0.5
        times = [t for t, _ in log]
        gaps = [b - a for a, b in zip(times, times[1:])]
        assert all(g <= 0.5 + 0.3 for g in gaps), gaps
        assert len(times) >= 4 and times[-1] <= 2.0 + 0.3


def test_urls_are_tried_in_turn_starting_after_the_lost_one():
    urls = ("ws://127.0.0.1:1/ws", "ws://127.0.0.1:2/ws", "ws://127.0.0.1:3/ws")
    config = EdgeConfig(cloud=",".join(urls[:2]), clouds=urls[2:], reconnect_s=0.6, backoff_base_s=0.05,
                        backoff_cap_s=0.1)
    (log,), _ = simulate(1, config)
    tried = [u for _, u in log]
    assert tried[:6] == [urls[1], urls[2], urls[0], urls[1], urls[2], urls[0]]  # the lost one (first) last
    assert len(tried) % 3 == 0  # every attempt went through the whole list


# -- real sockets ----------------------------------------------------------------------------
def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again on leaving: nobody listens there


@pytest.fixture(scope="module")
def target():
    return tiny_model(0)


@pytest.fixture(scope="module")
def expected(target):
    return reference(target, PROMPT, N)


def answer(client, commits=None, **opts):
    async def go():
        try:
            out = await generate_async(client, PROMPT, on_commit=commits, options=GenerateOptions(
                max_new_tokens=N, stop_ids=NO_STOP, **opts))
            return out, client.cloud_url
        finally:
            client.drafter = None
            await client.close()
    return asyncio.run(go())


def test_a_dead_first_url_falls_through_to_a_live_second(target, expected):
    dead = f"ws://127.0.0.1:{closed_port()}/ws"
    with Verifier(TargetEngine(target)) as live:
        client = tiny_client(f"{dead},{live.url}", TinyDrafter(perturbed(target, 1.0)), connect_timeout_s=2)
        out, used = answer(client, block=3)
        assert "picospec_sessions_total 1\n" in live.server.metrics.render()  # one session, on it
    c = out["completions"][0]
    assert used == live.url and out["cloud"] == live.url
    assert c["token_ids"] == expected and c["target_quality"] and c["edge_only_spans"] == []
    assert client.notices == []


def test_a_replica_lost_mid_answer_resumes_on_the_next_url(target, expected):
    with Verifier(TargetEngine(target)) as a, Verifier(TargetEngine(target)) as b:
        client = tiny_client(f"{a.url},{b.url}", TinyDrafter(perturbed(target, 1.0)), reconnect_s=5,
                             reply_timeout_s=5, connect_timeout_s=2)
        client.rng = random.Random(1)
        commits = Commits(at=12, fault=a.stop)
        out, used = answer(client, commits, block=3)
        commits.thread.join(10)
    c = out["completions"][0]
    assert used == b.url
    assert c["token_ids"] == expected and commits.ids == c["token_ids"]  # nothing lost or repeated
    assert c["stats"]["reconnects"] >= 1 and c["edge_only_spans"] == [] and c["target_quality"]
