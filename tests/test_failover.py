"""Replicas that leave a fleet mid-answer, behind a real HAProxy (real processes, loopback only).

Two tiny-target replicas A and B and a slot for a third, C, behind HAProxy; 8 concurrent greedy
sessions through the balancer. Mid-answer A gets SIGTERM (it drains); a little later C starts and B
is SIGKILLed while C is still booting. Every answer equals its solo run, no committed token is lost
or repeated, the edges resumed (a migration from the drain, a reconnect from the kill), A never answered healthy after
its SIGTERM (tests/test_drain.py shows the 503 and its refusal of new sessions), and A finished its
passes in flight (nothing cut at its deadline) before it exited cleanly.

Needs the `haproxy` binary (Debian: apt-get install haproxy; .ci/run installs it).
"""
from __future__ import annotations

import asyncio
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import pytest

from edge_app.pipeline import GenerateOptions
from picospec.api import generate_async
from tests.conftest import ROOT
from tests.tiny import TinyDrafter, perturbed, tiny_model
from tests.tiny_edge import NO_STOP, reference, tiny_client

HAPROXY = shutil.which("haproxy") or ("/usr/sbin/haproxy" if os.access("/usr/sbin/haproxy", os.X_OK) else None)
pytestmark = [
    pytest.mark.skipif(HAPROXY is None, reason="haproxy is not installed (apt-get install haproxy; .ci/run installs it)"),
    pytest.mark.timeout(600),
]

PROMPTS = [[1, 2, 3], [5, 9, 11, 40, 2], [7], [60, 61, 3, 3, 3, 8, 21]] * 2
N = 48

CONFIG = """
global
    maxconn 1024
defaults
    mode http
    timeout connect 2s
    timeout client 30s
    timeout server 30s
    timeout tunnel 1h
    retries 3
    option redispatch 1
frontend picospec
    bind 127.0.0.1:{port}
    default_backend verifiers
backend verifiers
    balance leastconn
    option httpchk GET /healthz
    http-check expect status 200
    default-server check inter 300ms fall 1 rise 1
    server a 127.0.0.1:{a}
    server b 127.0.0.1:{b}
    server c 127.0.0.1:{c}
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_replica(port: int, log) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-m", "tests.tiny_serve", "--port", str(port), "--delay-ms", "25",
                             "--drain-timeout", "30", "--log-level", "INFO"],
                            cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.PIPE,
                            stderr=log, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if line.startswith("{") and '"ready"' in line:
            threading.Thread(target=proc.stdout.read, daemon=True).start()  # keep the pipe drained
            return proc
        if proc.poll() is not None:
            break
    proc.kill()
    raise RuntimeError("a tiny replica did not start")


def healthz(port: int) -> int:
    try:
        return urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5).status
    except urllib.error.HTTPError as err:
        return err.code
    except OSError:
        return 0


def test_drain_and_kill_mid_answer_lose_no_token(tmp_path):
    target = tiny_model(0)
    expected = [reference(target, p, N) for p in PROMPTS]
    ports = {"port": free_port(), "a": free_port(), "b": free_port(), "c": free_port()}
    cfg = tmp_path / "haproxy.cfg"
    cfg.write_text(CONFIG.format(**ports))
    logs = {name: open(tmp_path / f"{name}.log", "w") for name in ("a", "b", "c", "haproxy")}
    procs = {"a": start_replica(ports["a"], logs["a"]), "b": start_replica(ports["b"], logs["b"])}
    procs["haproxy"] = subprocess.Popen([HAPROXY, "-f", str(cfg), "-db"], stdout=logs["haproxy"], stderr=logs["haproxy"])
    url = f"ws://127.0.0.1:{ports['port']}/ws"
    seen: dict = {}
    try:
        time.sleep(1.5)  # health checks see A and B up
        commits = [[] for _ in PROMPTS]
        streamed = {"total": 0}

        def on_commit(i):
            def record(new, speculative):
                commits[i].extend(new)
                streamed["total"] += len(new)
            return record

        def faults():
            while streamed["total"] < 60:  # mid-answer, every session under way
                time.sleep(0.01)
            procs["a"].send_signal(signal.SIGTERM)
            statuses = []  # A's health from the SIGTERM until it is gone (it drains in milliseconds)
            while procs["a"].poll() is None and len(statuses) < 2000:
                statuses.append(healthz(ports["a"]))
            seen["a_healthz"] = statuses
            starting = threading.Thread(target=lambda: procs.__setitem__("c", start_replica(ports["c"], logs["c"])))
            starting.start()  # C boots while B dies: the edges wait for it, retrying with backoff
            time.sleep(0.3)
            seen["streamed_at_kill"] = streamed["total"]
            procs["b"].kill()
            starting.join(120)

        async def one(i, prompt):
            client = tiny_client(url, TinyDrafter(perturbed(target, 1.0)), reply_timeout_s=30, connect_timeout_s=5,
                                 reconnect_s=60, edge_fallback=False)
            client.rng = random.Random(i)
            try:
                return await generate_async(client, prompt, on_commit=on_commit(i), options=GenerateOptions(
                    max_new_tokens=N, stop_ids=NO_STOP, block=3, mode="pipeline"))
            finally:
                client.drafter = None
                await client.close()

        async def all_sessions():
            return await asyncio.gather(*(one(i, p) for i, p in enumerate(PROMPTS)))

        fault_thread = threading.Thread(target=faults, daemon=True)
        fault_thread.start()
        outs = asyncio.run(all_sessions())
        fault_thread.join(60)
        a_exit = procs["a"].wait(timeout=60)
    finally:
        for name, p in procs.items():
            if p.poll() is None:
                p.kill()
            p.wait(timeout=10)
        for f in logs.values():
            f.close()
    a_log = (tmp_path / "a.log").read_text()
    completions = [o["completions"][0] for o in outs]
    for i, c in enumerate(completions):
        assert c["token_ids"] == expected[i], i  # the target's answer, as solo
        assert commits[i] == c["token_ids"], i  # streamed once each: nothing lost or repeated
        assert c["target_quality"] and c["edge_only_spans"] == []
    migrations = sum(c["stats"]["migrations"] for c in completions)
    reconnects = sum(c["stats"]["reconnects"] for c in completions)
    assert migrations >= 1 and reconnects >= 1, (migrations, reconnects)  # both faults hit live sessions
    # once A handled the SIGTERM it never answered healthy again (503 while draining, then gone)
    after_signal = seen["a_healthz"][next((i for i, x in enumerate(seen["a_healthz"]) if x != 200),
                                          len(seen["a_healthz"])):]
    assert 200 not in after_signal
    assert seen["streamed_at_kill"] < len(PROMPTS) * N  # B died mid-answer
    assert a_exit == 0  # A drained and exited on its own
    drained = json.loads(a_log.split("picospec verifier: drained ", 1)[1].splitlines()[0].replace("'", '"'))
    assert drained["closed"] >= 1 and drained["cut_at_deadline"] == 0  # passes in flight completed
