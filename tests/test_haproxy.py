"""HAProxy in front of two verifier replicas (deploy/cluster.sh with deploy/haproxy/picospec.cfg),
real processes on loopback: the tiny test target in each replica (`python -m tests.tiny_serve`).

- 8 concurrent greedy sessions through the balancer, half over ws://, half over wss:// terminated
  at HAProxy (a self-signed certificate made here): each answer is token for token its solo run
  against a replica directly (and the target's own greedy output), and leastconn spread the
  sessions over both replicas.
- Bad input through the balancer still gets the verifier's Error with its code (not a proxy error).
- Only /ws and /healthz are exposed through the balancer; the script stops everything on SIGTERM.

Needs the `haproxy` binary (Debian: apt-get install haproxy); skipped, saying so, without it.
"""
from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

from edge_app.pipeline import GenerateOptions
from picospec.api import generate_async
from tests.conftest import ROOT
from tests.tiny import TinyDrafter, fingerprint, perturbed, tiny_model
from tests.tiny_edge import NO_STOP, errors, hello_frame, raw_session, reference, tiny_client

HAPROXY = shutil.which("haproxy") or ("/usr/sbin/haproxy" if os.access("/usr/sbin/haproxy", os.X_OK) else None)
pytestmark = [
    pytest.mark.skipif(HAPROXY is None, reason="haproxy is not installed (apt-get install haproxy; .ci/run installs it)"),
    pytest.mark.timeout(600),
]

PROMPTS = [[1, 2, 3], [5, 9, 11, 40, 2], [7], [60, 61, 3, 3, 3, 8, 21]]
N = 24


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def free_port_pair() -> int:
    """A port B with B and B+1 both free (the replicas' ports)."""
    for _ in range(50):
        b = free_port()
        try:
            with socket.socket() as s:
                s.bind(("127.0.0.1", b + 1))
            return b
        except OSError:
            continue
    raise RuntimeError("no two consecutive free ports")


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except FileNotFoundError:
        return False


@pytest.fixture(scope="module")
def target():
    return tiny_model(0)


@pytest.fixture(scope="module")
def cert(tmp_path_factory) -> dict:
    d = tmp_path_factory.mktemp("tls")
    key, crt, pem = d / "key.pem", d / "cert.pem", d / "haproxy.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                    "-nodes", "-keyout", str(key), "-out", str(crt), "-days", "1", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
                   check=True, capture_output=True, timeout=60)
    pem.write_text(crt.read_text() + key.read_text())  # HAProxy's crt: chain and key in one file
    return {"ca": str(crt), "pem": str(pem)}


@pytest.fixture(scope="module")
def cluster(cert, tmp_path_factory):
    port, tls_port, stats_port, base = free_port(), free_port(), free_port(), free_port_pair()
    workdir = tmp_path_factory.mktemp("cluster")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HAPROXY": HAPROXY,
           "PICOSPEC_SERVE": f"{sys.executable} -m tests.tiny_serve"}
    proc = subprocess.Popen(
        ["bash", str(ROOT / "deploy" / "cluster.sh"), "--replicas", "2", "--port", str(port), "--base-port",
         str(base), "--tls-pem", cert["pem"], "--tls-port", str(tls_port), "--stats-port", str(stats_port),
         "--workdir", str(workdir), "--startup-timeout", "240"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    info = None
    try:
        for line in proc.stdout:  # ends when the script exits
            if line.startswith("{") and '"cluster-ready"' in line:
                info = json.loads(line)
                break
        if info is None:
            proc.wait(timeout=30)
            pytest.fail(f"cluster.sh did not start (exit {proc.returncode}): {proc.stderr.read()[-3000:]}")
        info["proc"] = proc
        yield info
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)  # the script's own cleanup: replicas, then HAProxy
            try:
                proc.wait(timeout=40)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # whatever is left of its process group
        except ProcessLookupError:
            pass
        proc.wait(timeout=10)


def replica_url(replica: dict) -> str:
    return f"ws://127.0.0.1:{replica['port']}/ws"


def sessions_total(replica: dict) -> int:
    text = urllib.request.urlopen(f"http://127.0.0.1:{replica['port']}/metrics", timeout=10).read().decode()
    return int(float(re.search(r"^picospec_sessions_total (\S+)$", text, re.M).group(1)))


async def answer(url: str, target, prompt: list[int], ca_cert: str | None = None) -> list[int]:
    client = tiny_client(url, TinyDrafter(perturbed(target, 1.0)), ca_cert=ca_cert, reply_timeout_s=30,
                         connect_timeout_s=10, edge_fallback=False)
    try:
        out = await generate_async(client, prompt, options=GenerateOptions(max_new_tokens=N, stop_ids=NO_STOP,
                                                                           block=3))
    finally:
        client.drafter = None
        await client.close()
    c = out["completions"][0]
    assert c["target_quality"] and c["edge_only_spans"] == []
    return c["token_ids"]


def test_concurrent_greedy_sessions_through_haproxy_match_their_solo_runs(cluster, target, cert):
    r1, r2 = cluster["replicas"]
    solo = [asyncio.run(answer(replica_url(r1), target, p)) for p in PROMPTS]
    assert solo == [reference(target, p, N) for p in PROMPTS]  # the replica serves the target
    before = [sessions_total(r) for r in (r1, r2)]

    async def eight():
        jobs = [answer(cluster["url"], target, p) for p in PROMPTS]
        jobs += [answer(cluster["tls_url"], target, p, ca_cert=cert["ca"]) for p in PROMPTS]
        return await asyncio.gather(*jobs)

    got = asyncio.run(eight())
    assert got == solo + solo
    spread = [sessions_total(r) - b for r, b in zip((r1, r2), before)]
    assert sum(spread) == 8 and min(spread) >= 2, f"leastconn should use both replicas: {spread}"


def test_bad_input_through_haproxy_gets_the_verifiers_error(cluster, cert):
    url = cluster["url"]
    garbage = asyncio.run(raw_session(url, [b"\x07this is not a frame"], hello=hello_frame()))
    assert errors(garbage) == ["bad_frame"]
    wrong_model = asyncio.run(raw_session(url, [], hello=hello_frame({**fingerprint(), "tokens_sha256": "0" * 64})))
    assert errors(wrong_model) == ["model_mismatch"]
    ctx = ssl.create_default_context(cafile=cert["ca"])
    over_tls = asyncio.run(raw_session(cluster["tls_url"], ["hello?"], hello=hello_frame(), ssl=ctx))
    assert errors(over_tls) == ["bad_frame"]


def test_only_the_protocol_and_health_pass_the_balancer(cluster):
    base = cluster["url"].rsplit("/ws", 1)[0].replace("ws://", "http://")
    health = json.loads(urllib.request.urlopen(base + "/healthz", timeout=10).read())
    assert health["status"] == "ok" and health["model"] == "tiny-qwen2"
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(base + "/metrics", timeout=10)  # scraped per replica, not via the balancer
    assert info.value.code == 404
    stats = urllib.request.urlopen(cluster["stats"].replace("/stats", "/metrics"), timeout=10).read().decode()
    assert re.search(r'haproxy_server_status\{proxy="verifiers",server="replica2",state="UP"\} 1', stats), \
        "HAProxy's health checks should see both replicas up"


def test_the_script_stops_its_replicas_and_haproxy_on_sigterm(cluster):
    """Last in the module: SIGTERM to cluster.sh ends every process it started."""
    pids = [r["pid"] for r in cluster["replicas"]] + [cluster["haproxy_pid"]]
    assert all(alive(p) for p in pids)
    cluster["proc"].send_signal(signal.SIGTERM)
    cluster["proc"].wait(timeout=40)
    deadline = time.monotonic() + 15
    while any(alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(alive(p) for p in pids)
