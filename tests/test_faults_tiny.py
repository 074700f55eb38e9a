"""Faults in the middle of an answer, with the tiny real models over real sockets.

The invariant: whatever breaks, every committed token streams once (on_commit concatenates to the
answer), and an answer the verifier saw through (no edge-only span) is token for token the
target's greedy output. While the verifier is away the edge says so once, carries on with the
draft alone, labels those tokens, and returns to the verifier when it is back.
"""
from __future__ import annotations

import asyncio
import threading
import time

import pytest

from bench.linkproxy import LinkConfig, ThreadedLinkProxy
from cloud.engine import TargetEngine
from cloud.server import ServerConfig
from edge_app.link import CloudError
from edge_app.pipeline import GenerateOptions
from picospec.api import generate_async
from tests.tiny import SlowEngine, TinyDrafter, perturbed, tiny_model
from tests.tiny_edge import NO_STOP, Commits, Verifier, reference, tiny_client

PROMPT = [5, 9, 11, 40, 2]
N = 48


@pytest.fixture(scope="module")
def target():
    return tiny_model(0)


@pytest.fixture(scope="module")
def expected(target):
    return reference(target, PROMPT, N)


def answer(client, commits: Commits, mode: str = "pipeline", n: int = N, **opts):
    """One answer through the client (closing it after), as the API's dict."""
    async def go():
        try:
            return await generate_async(client, PROMPT, on_commit=commits, options=GenerateOptions(
                max_new_tokens=n, mode=mode, stop_ids=NO_STOP, **opts))
        finally:
            client.drafter = None  # the test owns it
            await client.close()
    return asyncio.run(go())


def only(out: dict) -> dict:
    assert len(out["completions"]) == 1
    return out["completions"][0]


def assert_streamed_once(out: dict, commits: Commits) -> None:
    """No committed token lost or duplicated: what streamed is the answer, in order."""
    assert commits.ids == only(out)["token_ids"]


@pytest.mark.parametrize("mode", ["pipeline", "sync", "cloud"])
def test_link_drop_mid_answer_resumes_with_the_same_output(target, expected, mode):
    with Verifier(TargetEngine(target)) as v, ThreadedLinkProxy("127.0.0.1", v.port, LinkConfig(delay_ms=3)) as proxy:
        client = tiny_client(f"ws://127.0.0.1:{proxy.port}/ws", TinyDrafter(perturbed(target, 1.0)),
                             reconnect_s=5, reply_timeout_s=5)
        # two drops: one early, one after the first resume
        drops = Commits(at=12, fault=proxy.drop_connections)
        commits = Commits(at=30, fault=proxy.drop_connections)
        both = lambda new, spec: (drops(new, spec), commits(new, spec))
        out = answer(client, both, mode, block=3)
    c = only(out)
    assert c["token_ids"] == expected
    assert_streamed_once(out, commits)
    assert c["stats"]["reconnects"] == 2 and proxy.connections >= 3
    assert c["edge_only_spans"] == [] and c["target_quality"] is True
    assert client.notices == []  # a resumed link is not news


def test_verifier_restart_on_the_same_port_mid_answer(target, expected):
    v = Verifier(TargetEngine(target)).start()
    commits = Commits(at=15, fault=lambda: v.restart(0.6))
    try:
        client = tiny_client(v.url, TinyDrafter(perturbed(target, 1.0)), reconnect_s=10, reply_timeout_s=5)
        t0 = time.monotonic()
        out = answer(client, commits, block=4)
        elapsed = time.monotonic() - t0
    finally:
        commits.thread.join(10)
        v.stop()
    c = only(out)
    assert v.starts == 2 and elapsed >= 0.6  # it really waited for the new verifier
    assert c["token_ids"] == expected
    assert_streamed_once(out, commits)
    assert c["stats"]["reconnects"] >= 1 and c["edge_only_spans"] == [] and c["target_quality"]


def check_edge_only_answer(out: dict, commits: Commits, target, draft, n: int = N) -> list[tuple[int, int]]:
    """The labelled spans are exactly the draft's greedy tokens; everything else the target's."""
    c = only(out)
    tokens = c["token_ids"]
    spans = [tuple(s) for s in c["edge_only_spans"]]
    assert spans and c["target_quality"] is False and out["target_quality"] is False
    assert c["stats"]["edge_only_tokens"] == sum(b - a for a, b in spans)
    assert_streamed_once(out, commits)
    assert len(tokens) == n
    bounds = [0] + [x for span in spans for x in span] + [n]
    for i in range(len(bounds) - 1):  # alternating target / draft segments
        a, b = bounds[i], bounds[i + 1]
        model = draft if i % 2 else target
        if b > a:
            assert tokens[a:b] == reference(model, PROMPT + tokens[:a], b - a), (i, a, b)
    return spans


def test_unreachable_cloud_goes_edge_only_labelled_and_switches_back(target):
    draft = perturbed(target, 1.0)
    v = Verifier(TargetEngine(target)).start()
    commits = Commits(at=10, fault=lambda: v.restart(0.9))
    try:
        # edge-only drafting must outlast the 0.9 s restart: 50 tokens at >= 40 ms each
        client = tiny_client(v.url, TinyDrafter(draft, step_delay_s=0.04), reconnect_s=0.3,
                             retry_interval_s=0.1, connect_timeout_s=1.0, reply_timeout_s=5)
        out = answer(client, commits, n=60, block=3)
    finally:
        commits.thread.join(10)
        v.stop()
    spans = check_edge_only_answer(out, commits, target, draft, n=60)
    assert len(spans) == 1 and spans[0][1] < 60, spans  # it did come back before the end
    assert client.notices[0].startswith("the verifier is unreachable")
    assert client.notices[1].startswith("the verifier is back")
    assert len(client.notices) == 2  # said once each


def test_stays_unreachable_the_notice_is_given_once_across_answers(target):
    """A second answer while the verifier is still away starts edge-only at once, unannounced."""
    draft = perturbed(target, 1.0)
    v = Verifier(TargetEngine(target)).start()
    url = v.url
    v.stop()
    client = tiny_client(url, TinyDrafter(draft), reconnect_s=0.3, retry_interval_s=0.2, connect_timeout_s=0.5)

    async def two():
        outs = []
        for _ in range(2):
            t0 = time.monotonic()
            outs.append((await generate_async(client, PROMPT, options=GenerateOptions(
                max_new_tokens=10, stop_ids=NO_STOP)), time.monotonic() - t0))
        client.drafter = None
        await client.close()
        return outs

    (first, _), (second, t2) = asyncio.run(two())
    for out in (first, second):
        c = only(out)
        assert c["edge_only_spans"] == [[0, 10]] and c["target_quality"] is False
        assert c["token_ids"] == reference(draft, PROMPT, 10)
    assert len(client.notices) == 1 and "unreachable" in client.notices[0]
    assert t2 < 0.3  # no reconnect wait for a verifier known to be away


def test_unreachable_without_fallback_raises_and_keeps_what_was_committed(target, expected):
    v = Verifier(TargetEngine(target)).start()
    try:
        client = tiny_client(v.url, TinyDrafter(perturbed(target, 1.0)), reconnect_s=0.5,
                             edge_fallback=False)
        commits = Commits(at=10, fault=v.stop)
        with pytest.raises(CloudError) as info:
            answer(client, commits, block=2)
    finally:
        v.stop()
    assert info.value.code in ("unreachable", "disconnected")
    assert len(commits.ids) >= 10 and commits.ids == expected[:len(commits.ids)]


BLACKHOLE_S = 3.0


def test_blackholed_cloud_goes_edge_only_then_comes_back(target):
    """Blackhole: TCP accepted, then silence. The reply timeout fires, connect attempts time out
    (they must not hang), the edge drafts alone, and returns when the link clears. The blackhole
    outlasts the ~1 s the edge needs to give up (reply timeout, then the reconnect window) by a
    margin that a loaded CI machine does not eat."""
    draft = perturbed(target, 1.0)
    with Verifier(TargetEngine(target)) as v, ThreadedLinkProxy("127.0.0.1", v.port) as proxy:
        def blackhole():
            proxy.set_blackhole(True)
            threading.Timer(BLACKHOLE_S, proxy.set_blackhole, (False,)).start()

        client = tiny_client(f"ws://127.0.0.1:{proxy.port}/ws", TinyDrafter(draft, step_delay_s=0.04),
                             reply_timeout_s=0.4, reconnect_s=0.5, connect_timeout_s=0.3,
                             retry_interval_s=0.2)
        commits = Commits(at=10, fault=blackhole)
        t0 = time.monotonic()
        out = answer(client, commits, n=100, block=3)
        elapsed = time.monotonic() - t0
    spans = check_edge_only_answer(out, commits, target, draft, n=100)
    assert spans[-1][1] < 100, "it never came back"
    assert [n.split(":")[0] for n in client.notices] == ["the verifier is unreachable", "the verifier is back"]
    assert elapsed < 12  # (a hang on the stalled link would leave no edge-only span at all)


def test_stalled_cloud_reply_timeout_fires_and_the_answer_recovers_exactly(target, expected):
    """A stall shorter than the reconnect window: no edge-only tokens, the same output."""
    with Verifier(TargetEngine(target)) as v, ThreadedLinkProxy("127.0.0.1", v.port) as proxy:
        def stall():
            proxy.set_blackhole(True)
            threading.Timer(1.0, proxy.set_blackhole, (False,)).start()

        client = tiny_client(f"ws://127.0.0.1:{proxy.port}/ws", TinyDrafter(perturbed(target, 1.0)),
                             reply_timeout_s=0.3, reconnect_s=6, connect_timeout_s=0.4)
        commits = Commits(at=12, fault=stall)
        t0 = time.monotonic()
        out = answer(client, commits, block=3)
        elapsed = time.monotonic() - t0
    c = only(out)
    assert c["token_ids"] == expected and c["edge_only_spans"] == []
    assert_streamed_once(out, commits)
    assert c["stats"]["reconnects"] >= 1
    assert 1.0 <= elapsed < 6  # it waited out the stall, and no close or connect hung on it


class SleepyDrafter(TinyDrafter):
    """Stops for `nap_s` once, after `at` tokens: the edge goes quiet mid-answer."""

    def __init__(self, model, at: int, nap_s: float):
        super().__init__(model)
        self.at, self.nap_s, self.napped = at, nap_s, False

    def feed(self, ids):
        super().feed(ids)
        if not self.napped and self.length >= self.at:
            self.napped = True
            time.sleep(self.nap_s)


def test_idle_session_is_evicted_and_the_edge_resumes(target, expected):
    with Verifier(TargetEngine(target), ServerConfig(port=0, idle_timeout_s=0.3)) as v:
        client = tiny_client(v.url, SleepyDrafter(perturbed(target, 1.0), len(PROMPT) + 20, 1.0),
                             reconnect_s=5)
        commits = Commits()
        # without bubble filling: a filling cloud keeps the session busy while the edge naps
        out = answer(client, commits, block=3, fill=False)
        metrics = v.server.metrics.render()
        assert not v.server.sessions  # evicted and then closed: nothing held
    c = only(out)
    assert c["token_ids"] == expected and c["edge_only_spans"] == []
    assert_streamed_once(out, commits)
    assert c["stats"]["reconnects"] >= 1
    assert "picospec_evictions_total 1" in metrics.splitlines()


def test_a_session_waiting_on_slow_passes_is_not_idle(target, expected):
    """Passes slower than the idle timeout: the edge waits in silence, and that is not idleness."""
    engine = SlowEngine(target)
    engine.delay_s = 0.6
    with Verifier(engine, ServerConfig(port=0, idle_timeout_s=0.4)) as v:
        client = tiny_client(v.url, TinyDrafter(perturbed(target, 1.0)), reconnect_s=5)
        commits = Commits()
        out = answer(client, commits, mode="sync", n=8, block=4)
        metrics = v.server.metrics.render()
    c = only(out)
    assert c["token_ids"] == expected[:8] and c["stats"]["reconnects"] == 0
    assert "picospec_evictions_total 0" in metrics.splitlines()


def test_eviction_frees_the_sessions_kv_cache(target):
    """The evicted session's cache is emptied at once, not when its objects are collected."""
    import codec
    from tests.tiny_edge import errors, hello_frame, raw_session

    with Verifier(TargetEngine(target), ServerConfig(port=0, idle_timeout_s=0.4)) as v:
        held = []

        async def session():
            task = asyncio.ensure_future(raw_session(v.url, [codec.encode(codec.Prompt(
                ids=list(range(1, 40)), max_new_tokens=8))], hello=hello_frame(), wait_s=3))
            while not v.server.sessions or not next(iter(v.server.sessions.values())).engine.cache_len:
                await asyncio.sleep(0.01)
            held.append(next(iter(v.server.sessions.values())))
            return await task

        got = asyncio.run(session())
        assert errors(got) == ["idle_timeout"]
        # the server's cleanup runs right after it sends the error: give it a moment
        deadline = time.monotonic() + 3
        while (held[0].engine.cache_len or v.server.sessions) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert held[0].engine.cache_len == 0 and not v.server.sessions
