"""Security: TLS (wss://) with a self-signed certificate made here, the token check, the
per-connection limits as pure objects, and that nothing from the wire is unpickled or evaluated."""
from __future__ import annotations

import argparse
import ast
import asyncio
import ssl
import subprocess
from pathlib import Path

import aiohttp
import pytest

from cloud.cli import add_serve_arguments, server_config
from cloud.engine import TargetEngine
from cloud.limits import SessionQuota, TokenBucket, match_token
from cloud.server import ServerConfig
from edge_app.link import CloudError, client_ssl
from edge_app.pipeline import GenerateOptions
from picospec.api import generate_async
from tests.conftest import ROOT
from tests.tiny import TinyDrafter, perturbed, tiny_model
from tests.tiny_edge import NO_STOP, Verifier, reference, tiny_client

PROMPT = [5, 9, 11, 40, 2]


@pytest.fixture(scope="module")
def target():
    return tiny_model(0)


@pytest.fixture(scope="module")
def cert(tmp_path_factory) -> tuple[str, str]:
    """A self-signed certificate for localhost and 127.0.0.1 (openssl; `cryptography` is not a
    dependency), valid for a day."""
    d = tmp_path_factory.mktemp("tls")
    key, crt = d / "key.pem", d / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                    "-nodes", "-keyout", str(key), "-out", str(crt), "-days", "1", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
                   check=True, capture_output=True, timeout=60)
    return str(crt), str(key)


@pytest.fixture(scope="module")
def tls_verifier(target, cert):
    with Verifier(TargetEngine(target), ServerConfig(port=0, tls_cert=cert[0], tls_key=cert[1])) as v:
        yield v


def wss(v: Verifier) -> str:
    return f"wss://127.0.0.1:{v.port}/ws"


def answer(client, n: int = 20) -> dict:
    async def go():
        try:
            return await generate_async(client, PROMPT, options=GenerateOptions(max_new_tokens=n, stop_ids=NO_STOP))
        finally:
            client.drafter = None
            await client.close()
    return asyncio.run(go())


def test_wss_with_the_trusted_self_signed_cert_gives_the_targets_output(tls_verifier, target, cert):
    client = tiny_client(wss(tls_verifier), TinyDrafter(perturbed(target, 1.0)), ca_cert=cert[0],
                         edge_fallback=False)
    out = answer(client)
    assert out["completions"][0]["token_ids"] == reference(target, PROMPT, 20)
    assert out["target_quality"] is True
    assert tls_verifier.server.scheme == "https"


def test_wss_without_trusting_the_cert_is_refused(tls_verifier, target):
    client = tiny_client(wss(tls_verifier), TinyDrafter(target), edge_fallback=False, reconnect_s=0.2)
    with pytest.raises(CloudError) as info:
        answer(client)
    assert info.value.code == "unreachable" and "certificate" in info.value.message.lower()


def test_plain_ws_to_a_tls_port_does_not_connect(tls_verifier, target):
    client = tiny_client(f"ws://127.0.0.1:{tls_verifier.port}/ws", TinyDrafter(target), edge_fallback=False,
                         reconnect_s=0.2, connect_timeout_s=2)
    with pytest.raises(CloudError) as info:
        answer(client)
    assert info.value.code in ("unreachable", "disconnected")


def test_healthz_and_metrics_over_https(tls_verifier, cert):
    async def get(path):
        ctx = ssl.create_default_context(cafile=cert[0])
        async with aiohttp.ClientSession() as http:
            async with http.get(f"https://127.0.0.1:{tls_verifier.port}{path}", ssl=ctx) as r:
                return r.status, await r.text()
    assert asyncio.run(get("/healthz"))[0] == 200
    assert "picospec_sessions_total" in asyncio.run(get("/metrics"))[1]


def test_ca_cert_is_for_wss_only():
    with pytest.raises(ValueError):
        client_ssl("ws://127.0.0.1:1/ws", "/some/ca.pem")
    assert client_ssl("wss://example.org/ws", None) is True  # the system's roots


def test_serve_flags_build_the_security_config(cert, tmp_path):
    tokens = tmp_path / "tokens"
    tokens.write_text("# one token per fleet\nfleet-a\n\nfleet-b\n")
    p = argparse.ArgumentParser()
    add_serve_arguments(p)
    args = p.parse_args(["--tls-cert", cert[0], "--tls-key", cert[1], "--token", "main", "--tokens-file",
                         str(tokens), "--max-sessions-per-token", "3", "--max-msgs-per-s", "50",
                         "--msg-burst", "60", "--max-msg-size", "65536", "--hello-timeout", "2",
                         "--idle-timeout", "30", "--max-context", "4096", "--log-json"])
    c = server_config(args)
    assert (c.tls_cert, c.tls_key) == tuple(cert)
    assert c.accepted_tokens == ("main", "fleet-a", "fleet-b")
    assert (c.max_sessions_per_token, c.msgs_per_s, c.msg_burst) == (3, 50, 60)
    assert (c.max_msg_size, c.hello_timeout_s, c.idle_timeout_s, c.max_context) == (65536, 2, 30, 4096)
    bad = p.parse_args(["--tls-cert", cert[0], "--tls-key", str(tmp_path / "missing.pem")])
    with pytest.raises(OSError):  # before any model is loaded
        server_config(bad)


def test_edge_flags_reach_the_edge_config():
    from edge_app.client import EdgeConfig
    from edge_app.args import add_edge_arguments, edge_config_kwargs

    p = argparse.ArgumentParser()
    add_edge_arguments(p)
    args = p.parse_args(["--cloud", "wss://h:1", "--ca-cert", "ca.pem", "--reply-timeout", "7",
                         "--reconnect-s", "3", "--no-edge-fallback"])
    c = EdgeConfig(**edge_config_kwargs(args))
    assert (c.ca_cert, c.reply_timeout_s, c.reconnect_s, c.edge_fallback) == ("ca.pem", 7, 3, False)


# -- the pieces, alone -----------------------------------------------------------------------
def test_token_check_compares_every_token_in_constant_time(monkeypatch):
    """Each accepted token goes through hmac.compare_digest once, whatever was presented (right,
    wrong, another length, nothing) and wherever a match is: no early exit, no length shortcut."""
    import hmac

    real, calls = hmac.compare_digest, []

    def spy(a, b):
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", spy)
    accepted = ("alpha-secret", "b", "fleet-c-0123456789")
    cases = {**{t: i for i, t in enumerate(accepted)},
             "alpha-secreT": None, "alpha-secret!": None, "alpha": None, "c": None, "": None, None: None}
    for presented, expected in cases.items():
        calls.clear()
        assert match_token(presented, accepted) == expected, presented
        assert sorted(b for _, b in calls) == sorted(t.encode() for t in accepted), presented
        assert all(a == (presented or "").encode() for a, _ in calls)


def test_wrong_tokens_of_every_length_are_refused():
    token = "s3cret-Token-42"
    accepted = (token, "other")
    wrong = set()
    for n in range(len(token) + 4):
        wrong |= {token[:n], "x" * n, token + "x" * n}  # prefixes, junk, the token with a tail
    wrong |= {token[:i] + chr(ord(token[i]) ^ 1) + token[i + 1:] for i in range(len(token))}  # one char off
    wrong -= set(accepted)
    assert len({len(w) for w in wrong}) > len(token)  # every length from empty to longer than the token
    assert all(match_token(w, accepted) is None for w in wrong)
    assert match_token(token, accepted) == 0 and match_token("other", accepted) == 1


def test_token_bucket():
    now = [0.0]
    b = TokenBucket(rate=10, burst=3, clock=lambda: now[0])
    assert [b.take() for _ in range(4)] == [True, True, True, False]
    now[0] += 0.1  # one token back
    assert b.take() and not b.take()
    now[0] += 100
    assert sum(b.take() for _ in range(10)) == 3  # never more than the burst
    assert all(TokenBucket(rate=0, burst=0).take() for _ in range(100))  # disabled


def test_session_quota():
    q = SessionQuota(2)
    assert q.acquire("a") and q.acquire("a") and not q.acquire("a") and q.acquire("b")
    q.release("a")
    assert q.acquire("a")
    q.release("a"), q.release("a"), q.release("b")
    assert q.open == {}
    assert all(SessionQuota(0).acquire("x") for _ in range(100))


FORBIDDEN_MODULES = {"pickle", "cPickle", "_pickle", "marshal", "shelve", "dill", "cloudpickle", "joblib"}
FORBIDDEN_CALLS = {"eval", "exec", "compile", "__import__"}


def wire_code() -> list[Path]:
    """Every module that handles bytes from the wire: the codec, the server, the edge's link."""
    return sorted((ROOT / "codec").glob("*.py")) + sorted((ROOT / "cloud").glob("*.py")) + [
        ROOT / "edge_app" / "link.py", ROOT / "edge_app" / "pipeline.py"]


def test_nothing_from_the_wire_is_unpickled_or_evaluated():
    problems = []
    for path in wire_code():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                names = {(node.module or "").split(".")[0]}
            else:
                names = set()
            if names & FORBIDDEN_MODULES:
                problems.append(f"{path.name}:{node.lineno} imports {names & FORBIDDEN_MODULES}")
            if isinstance(node, ast.Call):
                f = node.func
                if isinstance(f, ast.Name) and f.id in FORBIDDEN_CALLS:
                    problems.append(f"{path.name}:{node.lineno} calls {f.id}()")
                if isinstance(f, ast.Attribute) and f.attr == "load" and isinstance(f.value, ast.Name) \
                        and f.value.id in ("torch", "yaml", "pickle", "numpy", "np"):
                    problems.append(f"{path.name}:{node.lineno} calls {f.value.id}.load()")
                if isinstance(f, ast.Attribute) and f.attr in ("unpackb", "Unpacker") and not any(
                        k.arg == "max_ext_len" for k in node.keywords):
                    problems.append(f"{path.name}:{node.lineno} unpacks msgpack without max_ext_len")
    assert not problems, problems
    assert len(wire_code()) >= 10
