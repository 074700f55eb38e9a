"""Observability: /metrics in Prometheus text after real sessions, and JSON-lines logs that carry
each session's id."""
from __future__ import annotations

import asyncio
import io
import json
import logging
import re

import aiohttp
import pytest

import codec
from cloud.engine import TargetEngine
from cloud.logs import setup_logging
from cloud.server import ServerConfig
from edge_app.pipeline import GenerateOptions, Pipeline
from tests.tiny import TinyDrafter, perturbed, tiny_model
from tests.tiny_edge import NO_STOP, Verifier, hello_frame, open_link, raw_session

SAMPLE = re.compile(r'^([a-z_]+)(\{[a-z_]+="[^"]*"(,[a-z_]+="[^"]*")*\})? (-?[0-9.e+-]+|NaN)$')


def scrape(url: str) -> dict[str, float]:
    """GET /metrics, checked line by line against the exposition format; {sample: value}."""
    async def get():
        async with aiohttp.ClientSession() as http:
            async with http.get(url) as r:
                assert r.status == 200 and r.content_type == "text/plain"
                return await r.text()
    out, typed = {}, set()
    for line in asyncio.run(get()).splitlines():
        if line.startswith("# TYPE "):
            name, kind = line.split()[2:4]
            assert kind in ("counter", "gauge", "summary") and name not in typed, line
            typed.add(name)
            continue
        m = SAMPLE.match(line)
        assert m, f"not a Prometheus sample line: {line!r}"
        base = re.sub(r"_(count|sum)$", "", m.group(1))
        assert m.group(1) in typed or base in typed, f"sample before its TYPE line: {line}"
        out[m.group(1) + (m.group(2) or "")] = float(m.group(4))
    return out


@pytest.fixture(scope="module")
def target():
    return tiny_model(0)


def test_metrics_after_sessions(target):
    config = ServerConfig(port=0, idle_timeout_s=0.3, msgs_per_s=5, msg_burst=15)
    with Verifier(TargetEngine(target), config) as v:
        before = scrape(f"http://127.0.0.1:{v.port}/metrics")

        async def sessions():
            link = await open_link(v.url)
            ans = await Pipeline(TinyDrafter(perturbed(target, 1.0)), link, GenerateOptions(
                max_new_tokens=10, mode="sync", block=4, stop_ids=NO_STOP)).run([1, 2, 3])
            await asyncio.sleep(0.6)  # idle: evicted
            await link.close()
            flood = [codec.encode(codec.Draft(epoch=5, pos=0, ids=[1]))] * 40
            await raw_session(v.url, flood, hello=hello_frame())  # rate limited
            await raw_session(v.url, [b"\x07junk"], hello=hello_frame())  # bad frame
            return ans

        ans = asyncio.run(sessions())
        m = scrape(f"http://127.0.0.1:{v.port}/metrics")
    assert before["picospec_sessions_total"] == 0 and before["picospec_evictions_total"] == 0
    assert m["picospec_sessions_total"] == 3 and m["picospec_sessions"] == 0
    assert m["picospec_verify_passes_total"] >= ans.stats.rounds > 0
    assert m["picospec_drafted_tokens_total"] >= m["picospec_accepted_tokens_total"] == ans.stats.accepted
    assert m["picospec_bytes_up_total"] > 0 and m["picospec_bytes_down_total"] > 0
    assert m["picospec_messages_up_total"] > 0 and m["picospec_messages_down_total"] > 0
    assert m["picospec_evictions_total"] == 1 and m['picospec_errors_total{kind="idle_timeout"}'] == 1
    assert m["picospec_rate_limited_total"] == 1 and m['picospec_errors_total{kind="rate_limited"}'] == 1
    assert m['picospec_errors_total{kind="bad_frame"}'] == 1
    for summary in ("picospec_verify_seconds", "picospec_prefill_seconds", "picospec_verify_wait_seconds",
                    "picospec_session_seconds"):
        assert m[f"{summary}_count"] >= 1 and f'{summary}{{quantile="0.99"}}' in m
    assert m["picospec_prefill_tokens_total"] >= 3
    assert m["picospec_kv_cache_tokens"] == 0  # every session's cache freed
    assert m["picospec_process_resident_bytes"] > 10 << 20
    assert m["picospec_process_peak_resident_bytes"] >= m["picospec_process_resident_bytes"]


def test_json_logs_carry_session_ids(target):
    stream = io.StringIO()
    setup_logging("INFO", json_lines=True, stream=stream)
    try:
        with Verifier(TargetEngine(target)) as v:
            async def one():
                link = await open_link(v.url)
                sid = link.welcome.session_id
                await Pipeline(TinyDrafter(target), link, GenerateOptions(
                    max_new_tokens=4, mode="sync", stop_ids=NO_STOP)).run([1, 2])
                await link.close()
                await raw_session(v.url, [b"\x07junk"], hello=hello_frame())
                return sid
            sid = asyncio.run(one())
    finally:
        logging.getLogger().handlers.clear()
    lines = [json.loads(line) for line in stream.getvalue().splitlines() if line.strip()]
    mine = [r for r in lines if r.get("session") == sid]
    assert [r["event"] for r in mine] == ["opened", "closed"]
    assert mine[1]["passes"] >= 1 and mine[1]["drafted"] >= 1
    refused = [r for r in lines if r.get("event") == "refused"]
    assert len(refused) == 1 and refused[0]["code"] == "bad_frame" and refused[0]["session"] != sid
    assert all({"time", "level", "logger", "msg"} <= set(r) for r in lines)
