"""Graceful drain: a replica that leaves the fleet loses no committed token.

- In process: replica A drains mid-answer; the answer moves to replica B, equals the target's, no
  token lost or repeated, counted as a migration (not a reconnect); meanwhile A's /healthz says 503
  "draining" and A refuses a new session with the retryable code.
- As a process: SIGTERM starts the drain (A answers 503, closes its session with `draining`, then
  exits); a second SIGTERM during a drain ends it at once.
"""
from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

import codec
from cloud.drain import drain
from edge_app.link import CloudError, CloudLink
from edge_app.pipeline import GenerateOptions
from picospec.api import generate_async
from tests.tiny import SlowEngine, TinyDrafter, fingerprint, perturbed, tiny_model
from tests.tiny_edge import NO_STOP, Commits, Verifier, reference, tiny_client

PROMPT = [5, 9, 11, 40, 2]
N = 40
ROOT = Path(__file__).resolve().parents[1]


def healthz(url: str) -> tuple[int, dict]:
    http = url.replace("ws://", "http://").replace("/ws", "/healthz")
    try:
        with urllib.request.urlopen(http, timeout=5) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


async def hello(url: str) -> codec.Welcome:
    link = CloudLink(url, connect_timeout_s=5)
    try:
        return await link.connect(codec.Hello(fingerprint=fingerprint(), sampling={
            "temperature": 0.0, "top_p": 1.0, "top_k": 0, "seed": None}))
    finally:
        await link.close()


def slow_engine(target, delay_s=0.02):
    engine = SlowEngine(target)
    engine.delay_s = delay_s
    return engine


def test_a_draining_replica_hands_the_answer_to_another_without_losing_a_token():
    target = tiny_model(0)
    expected = reference(target, PROMPT, N)
    seen = {}
    with Verifier(slow_engine(target)) as a, Verifier(slow_engine(target)) as b:
        def start_drain():
            loop = a.thread.loop
            future = asyncio.run_coroutine_threadsafe(drain(a.server, deadline_s=10), loop)
            time.sleep(0.05)
            seen["healthz"] = healthz(a.url)
            try:
                asyncio.run(hello(a.url))
                seen["hello"] = "accepted"
            except CloudError as err:
                seen["hello"] = err.code
            seen["drained"] = future.result(15)

        client = tiny_client(f"{a.url},{b.url}", TinyDrafter(perturbed(target, 1.0)), reconnect_s=5,
                             reply_timeout_s=5, connect_timeout_s=2)
        client.rng = random.Random(1)
        commits = Commits(at=12, fault=start_drain)

        async def go():
            try:
                return await generate_async(client, PROMPT, on_commit=commits, options=GenerateOptions(
                    max_new_tokens=N, stop_ids=NO_STOP, block=3, mode="pipeline"))
            finally:
                client.drafter = None
                await client.close()

        out = asyncio.run(go())
        commits.thread.join(15)
        b_sessions = b.server.metrics.render()
    c = out["completions"][0]
    assert c["token_ids"] == expected and commits.ids == c["token_ids"]  # nothing lost or repeated
    assert c["stats"]["migrations"] == 1 and c["stats"]["reconnects"] == 0 and c["edge_only_spans"] == []
    assert seen["healthz"][0] == 503 and seen["healthz"][1]["status"] == "draining"
    assert seen["hello"] == "draining"
    assert seen["drained"]["closed"] == 1 and seen["drained"]["cut_at_deadline"] == 0
    assert "picospec_sessions_total 1\n" in b_sessions


def _serve(*extra: str) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, "-m", "tests.tiny_serve", "--port", "0", *extra], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if line.startswith("{") and '"ready"' in line:
            return proc, f"ws://127.0.0.1:{json.loads(line)['port']}/ws"
    proc.kill()
    raise RuntimeError("the tiny verifier did not start")


def test_sigterm_drains_the_process_and_a_second_sigterm_ends_it_at_once():
    proc, url = _serve("--drain-timeout", "30")
    try:
        async def hold_a_session_through_sigterm():
            link = CloudLink(url, connect_timeout_s=5, reply_timeout_s=10)
            await link.connect(codec.Hello(fingerprint=fingerprint(), sampling={
                "temperature": 0.0, "top_p": 1.0, "top_k": 0, "seed": None}))
            await link.send(codec.Prompt(ids=PROMPT, max_new_tokens=4))
            assert isinstance(await link.recv(), codec.Prefilled)
            proc.send_signal(signal.SIGTERM)
            try:
                await link.recv()
                return "no close"
            except CloudError as err:
                return err.code
            finally:
                await link.close()

        assert asyncio.run(hold_a_session_through_sigterm()) == "draining"
        assert proc.wait(timeout=20) == 0  # drained, then exited
    finally:
        if proc.poll() is None:
            proc.kill()

    # a second SIGTERM while a drain waits on a pass in flight ends it at once
    proc, url = _serve("--drain-timeout", "30", "--delay-ms", "3000")
    try:
        async def start_a_slow_pass():
            link = CloudLink(url, connect_timeout_s=5, reply_timeout_s=10)
            await link.connect(codec.Hello(fingerprint=fingerprint(), sampling={
                "temperature": 0.0, "top_p": 1.0, "top_k": 0, "seed": None}))
            await link.send(codec.Prompt(ids=PROMPT, max_new_tokens=4))  # a 3 s prefill pass
            await asyncio.sleep(0.5)
            return link

        async def run():
            link = await start_a_slow_pass()
            t0 = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            await asyncio.sleep(0.3)
            status = healthz(url)[0]
            proc.send_signal(signal.SIGTERM)
            code = await asyncio.get_running_loop().run_in_executor(None, proc.wait, 20)
            await link.close()
            return status, code, time.monotonic() - t0

        status, code, seconds = asyncio.run(run())
        assert status == 503 and code == 0
        assert seconds < 10  # not the 30 s drain deadline
    finally:
        if proc.poll() is None:
            proc.kill()


@pytest.mark.parametrize("deadline_s", [0.5])
def test_the_deadline_cuts_a_pass_that_runs_too_long(deadline_s):
    target = tiny_model(0)
    with Verifier(slow_engine(target, delay_s=3.0)) as a:
        async def run():
            link = CloudLink(a.url, connect_timeout_s=5, reply_timeout_s=10)
            await link.connect(codec.Hello(fingerprint=fingerprint(), sampling={
                "temperature": 0.0, "top_p": 1.0, "top_k": 0, "seed": None}))
            await link.send(codec.Prompt(ids=PROMPT, max_new_tokens=4))
            await asyncio.sleep(0.3)
            result = asyncio.run_coroutine_threadsafe(drain(a.server, deadline_s=deadline_s), a.thread.loop)
            out = await asyncio.get_running_loop().run_in_executor(None, result.result, 10)
            await link.close()
            return out

        out = asyncio.run(run())
    assert out["closed"] == 1 and out["cut_at_deadline"] == 1 and out["seconds"] < 2.5
