"""No orphaned verifiers: a local verifier (EmbeddedVerifier's child, here serving the tiny target)
ends when the process that started it ends, however that one ends: SIGHUP (a closed terminal),
SIGTERM, SIGKILL (no cleanup of its own runs). Real processes: a parent Python process starts the
verifier, the test signals the parent and watches the child disappear.

The parent starts the verifier from a short-lived thread, as EdgeClient does from an executor
worker: Linux's parent-death signal follows the forking *thread*, so a naive prctl in the child
would kill the verifier as soon as that thread ended. The child must survive that, and still die
with the process.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import ROOT

PARENT = r"""
import os, signal, sys, threading, time
from edge_app.embedded import EmbeddedVerifier

signal.signal(signal.SIGHUP, signal.SIG_DFL)  # a shell's nohup would pass SIGHUP on ignored

box = {}
t = threading.Thread(target=lambda: box.update(v=EmbeddedVerifier(module="tests.tiny_serve",
                                                                 startup_timeout_s=120).start()))
t.start(); t.join()          # the thread that started the child is gone now
time.sleep(1.0)
v = box["v"]
assert v.proc.poll() is None, "the verifier died with the thread that started it"
print("READY", v.pid, v.port, flush=True)
time.sleep(600)              # until the test signals it
"""


def alive(pid: int) -> bool:
    """Running (a zombie that nobody reaps counts as gone: it holds no memory and serves nothing)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
        return state not in ("Z", "X")
    except FileNotFoundError:
        return False
    except OSError:
        try:
            os.kill(pid, 0)
            return True
        except ProcessLookupError:
            return False


def start_parent(env: dict | None = None) -> tuple[subprocess.Popen, int, int]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    parent = subprocess.Popen([sys.executable, "-c", PARENT], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.monotonic() + 150
    line = ""
    while time.monotonic() < deadline:
        line = parent.stdout.readline()
        if line.startswith("READY") or not line:
            break
    if not line.startswith("READY"):
        parent.kill()
        pytest.fail(f"the parent did not start its verifier: {parent.stderr.read()[-2000:]}")
    _, child, port = line.split()
    return parent, int(child), int(port)


def check_child_ends_with_parent(sig: int, env: dict | None = None, within_s: float = 10.0) -> None:
    parent, child, port = start_parent(env)
    try:
        assert alive(child)
        with open(f"/proc/{child}/status") as f:
            assert f"PPid:\t{parent.pid}\n" in f.read()
        os.kill(parent.pid, sig)
        parent.wait(timeout=30)
        deadline = time.monotonic() + within_s
        while alive(child) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not alive(child), f"verifier {child} outlived its parent ({signal.Signals(sig).name})"
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()
        if alive(child):
            os.kill(child, signal.SIGKILL)


@pytest.mark.timeout(240)
@pytest.mark.parametrize("sig", [signal.SIGHUP, signal.SIGTERM, signal.SIGKILL], ids=lambda s: s.name)
def test_verifier_ends_with_its_parent(sig):
    check_child_ends_with_parent(sig)


@pytest.mark.timeout(240)
def test_parent_watch_alone_ends_the_verifier():
    """Without the parent-death signal (as on a system without prctl), the child's watcher of its
    parent pid ends it: within its poll interval plus the server's shutdown."""
    check_child_ends_with_parent(signal.SIGKILL, env={"PICOSPEC_PDEATHSIG": "0"})
