"""Faults with the real default pair and real processes: the verifier is `python -m cloud.cli` in
its own process, killed with SIGKILL in the middle of an answer and started again on the same
port. The edge (llama.cpp draft, PicoSpec API) reconnects, re-sends the committed prefix, and
writes exactly the text of an undisturbed run; a verifier that stays away for longer than the
reconnect window gets edge-only, labelled tokens until it is back.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.slow

PROMPT = "Write a Python function is_prime(n) with a docstring."
N = 48


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class VerifierProcess:
    """`python -m cloud.cli --port PORT` (fp32: batched and one-token passes agree), restartable."""

    def __init__(self, target: str, port: int):
        self.args = [sys.executable, "-m", "cloud.cli", "--port", str(port), "--target", target,
                     "--dtype", "float32", "--log-level", "WARNING"]
        self.port = port
        self.proc: subprocess.Popen | None = None
        self.starts = 0
        self.start_s: list[float] = []

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    def start(self) -> "VerifierProcess":
        t0 = time.monotonic()
        self.proc = subprocess.Popen(self.args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                     text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        for line in self.proc.stdout:
            if line.startswith("{") and json.loads(line).get("event") == "ready":
                break
        else:
            raise RuntimeError(f"the verifier exited with {self.proc.wait()}")
        self.starts += 1
        self.start_s.append(time.monotonic() - t0)
        return self

    def kill(self) -> None:
        """SIGKILL: no goodbye, no close frames; the sockets die with the process."""
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    def restart_after(self, down_s: float = 0.0) -> None:
        self.kill()
        time.sleep(down_s)
        self.start()


@pytest.fixture(scope="module")
def verifier(default_models):
    v = VerifierProcess(str(default_models[1]), free_port()).start()
    yield v
    v.kill()


@pytest.fixture(scope="module")
def edge(verifier, default_models):
    from picospec.api import PicoSpec

    ps = PicoSpec(draft=str(default_models[0]), cloud=verifier.url, pin_cores=False,
                  reconnect_s=600, reply_timeout_s=600)
    ps.client.notices = []
    ps.client.on_notice = ps.client.notices.append
    yield ps
    ps.close()


@pytest.fixture(scope="module")
def undisturbed(edge):
    return edge.generate(PROMPT, max_new_tokens=N)["completions"][0]


class Streamed:
    """on_commit: the ids as they streamed; starts fault() on its own thread at the k-th one."""

    def __init__(self, at: int, fault):
        self.ids: list[int] = []
        self.at, self.fault, self.thread = at, fault, None

    def __call__(self, new, speculative) -> None:
        self.ids += new
        if self.thread is None and len(self.ids) >= self.at:
            self.thread = threading.Thread(target=self.fault, daemon=True)
            self.thread.start()


def test_sigkilled_verifier_restarted_on_the_same_port_the_answer_is_the_same(edge, verifier, undisturbed):
    streamed = Streamed(at=12, fault=verifier.restart_after)
    out = edge.generate(PROMPT, max_new_tokens=N, on_commit=streamed)
    streamed.thread.join(600)
    c = out["completions"][0]
    assert verifier.starts >= 2
    assert c["token_ids"] == undisturbed["token_ids"] and c["text"] == undisturbed["text"]
    assert streamed.ids == c["token_ids"]  # nothing committed was lost or streamed twice
    assert c["stats"]["reconnects"] >= 1
    assert c["edge_only_spans"] == [] and c["target_quality"] is True
    assert not edge.client.notices


def test_verifier_away_past_the_reconnect_window_edge_only_then_back(edge, verifier, undisturbed):
    """A short reconnect window: the edge goes on alone (labelled) while the verifier restarts,
    says so once, and is back on the verifier, saying so, once it is up again."""
    from dataclasses import replace

    client = edge.client
    client.config = replace(client.config, reconnect_s=1.0, retry_interval_s=1.0, connect_timeout_s=5.0)
    try:
        streamed = Streamed(at=8, fault=verifier.restart_after)
        first = edge.generate(PROMPT, max_new_tokens=N, on_commit=streamed)["completions"][0]
        streamed.thread.join(600)  # the verifier is up again
        second = edge.generate(PROMPT, max_new_tokens=N)["completions"][0]
    finally:
        client.config = replace(client.config, reconnect_s=600)
    spans = first["edge_only_spans"]
    assert spans and first["target_quality"] is False
    start = spans[0][0]
    assert start >= 8 and first["token_ids"][:start] == undisturbed["token_ids"][:start]
    assert streamed.ids == first["token_ids"]
    assert first["stats"]["edge_only_tokens"] == sum(b - a for a, b in spans)
    # the second answer found the verifier back (at once, or after one retry interval edge-only)
    later = second["edge_only_spans"]
    assert not later or (later[0][0] == 0 and later[-1][1] < len(second["token_ids"])), later
    assert [n.split(":")[0] for n in client.notices] == ["the verifier is unreachable", "the verifier is back"], \
        (client.notices, spans, later, verifier.start_s)
