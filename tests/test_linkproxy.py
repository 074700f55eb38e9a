"""The user-space link emulator: delay, bandwidth, jitter order, loss, faults, WebSocket, threads, CLI.

Everything binds to 127.0.0.1 only. Timing bounds are loose enough for a loaded 2-core machine:
lower bounds are exact (the proxy never releases early), upper bounds leave ~40 ms of slack.
"""
from __future__ import annotations

import asyncio
import contextlib
import random
import signal
import socket
import socketserver
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import AsyncIterator, Iterator

import aiohttp
import pytest
from aiohttp import web

from bench.linkproxy import (
    LinkConfig,
    LinkProxy,
    ThreadedLinkProxy,
    WireClock,
    build_parser,
    config_from_args,
    parse_hostport,
    schedule,
)

HOST = "127.0.0.1"
SLACK_S = 0.040
REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------- helpers

async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except ConnectionError:
        pass
    finally:
        writer.close()


@contextlib.asynccontextmanager
async def proxied_echo(config: LinkConfig) -> AsyncIterator[LinkProxy]:
    server = await asyncio.start_server(_echo, HOST, 0)
    proxy = LinkProxy(HOST, server.sockets[0].getsockname()[1], config)
    await proxy.start()
    try:
        yield proxy
    finally:
        await proxy.stop()
        server.close()
        await server.wait_closed()


async def connect(proxy: LinkProxy) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection(HOST, proxy.port)


async def ping(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, size: int = 16) -> float:
    """One echo round trip of `size` bytes, in seconds."""
    loop = asyncio.get_running_loop()
    payload = random.randbytes(size)
    t0 = loop.time()
    writer.write(payload)
    await writer.drain()
    got = await asyncio.wait_for(reader.readexactly(size), 10)
    elapsed = loop.time() - t0
    assert got == payload
    return elapsed


async def best_rtt(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> float:
    """Fastest of 3 pings after a warm-up: robust to a busy scheduler for the upper bound, and
    still a strict lower bound (if the fastest ping took >= 2 x delay, they all did)."""
    await ping(reader, writer)
    return min([await ping(reader, writer) for _ in range(3)])


async def sees_eof_or_reset(reader: asyncio.StreamReader) -> bool:
    try:
        return await asyncio.wait_for(reader.read(1024), 3) == b""
    except ConnectionError:
        return True


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------- the pure schedule

def test_schedule_zero_config_releases_now() -> None:
    release, clock = schedule(WireClock(), 5.0, 1000, LinkConfig(), "up", random.Random(0))
    assert release == 5.0 and clock.last_release == 5.0


def test_schedule_bandwidth_and_delay_add_up() -> None:
    cfg = LinkConfig(delay_ms=10, up_kbps=1000)
    clock, rng = WireClock(), random.Random(0)
    for _ in range(10):  # 10 x 1250 B at 1 Mbit/s = 100 ms on the wire, all read at t=0
        release, clock = schedule(clock, 0.0, 1250, cfg, "up", rng)
    assert release == pytest.approx(0.110)
    down, _ = schedule(WireClock(), 0.0, 1250, cfg, "down", rng)  # down is unlimited
    assert down == pytest.approx(0.010)


def test_schedule_jitter_never_reorders_and_varies() -> None:
    cfg = LinkConfig(delay_ms=5, jitter_ms=20, seed=1)
    clock, rng, releases = WireClock(), random.Random(1), []
    for i in range(500):
        release, clock = schedule(clock, i * 0.001, 100, cfg, "up", rng)
        releases.append(release - i * 0.001)
        assert release >= i * 0.001  # never before it was sent, even with jitter > delay
    assert len({round(r, 6) for r in releases}) > 50
    absolute = [r + i * 0.001 for i, r in enumerate(releases)]
    assert absolute == sorted(absolute)


def test_schedule_loss_penalty_is_seeded_and_about_p() -> None:
    cfg = LinkConfig(delay_ms=10, loss=0.1)
    assert cfg.rto_s == pytest.approx(0.2)  # floored at Linux's 200 ms
    assert LinkConfig(delay_ms=100, loss=0.1).rto_s == pytest.approx(0.4)  # 2 x RTT

    def penalties(seed: int) -> list[int]:
        clock, rng, hit = WireClock(), random.Random(seed), []
        for i in range(1000):
            now = i * 1.0  # far apart, so head-of-line blocking never carries a penalty over
            release, clock = schedule(clock, now, 100, cfg, "up", rng)
            hit.append(int(release - now >= cfg.rto_s))
        return hit

    first = penalties(7)
    assert first == penalties(7)
    assert 60 <= sum(first) <= 140


def test_config_validation() -> None:
    for bad in (dict(delay_ms=-1), dict(loss=1.5), dict(up_kbps=0), dict(jitter_ms=-2)):
        with pytest.raises(ValueError):
            LinkConfig(**bad)
    cfg = LinkConfig(delay_ms=30, delay_down_ms=70)
    assert cfg.one_way_s("up") == pytest.approx(0.03) and cfg.rtt_s == pytest.approx(0.1)


# ---------------------------------------------------------------- through the proxy

@pytest.mark.parametrize("delay_ms", [0, 25, 75])
def test_round_trip_delay(delay_ms: float) -> None:
    async def body() -> None:
        async with proxied_echo(LinkConfig(delay_ms=delay_ms)) as proxy:
            reader, writer = await connect(proxy)
            await ping(reader, writer)  # warm up: connection set-up is not what we measure
            rtts = sorted([await ping(reader, writer) for _ in range(5)])
            writer.close()
            assert rtts[0] >= 2 * delay_ms / 1000
            assert rtts[2] < 2 * delay_ms / 1000 + SLACK_S, rtts
            assert proxy.bytes_up == proxy.bytes_down == 6 * 16
            assert proxy.connections == 1
    asyncio.run(body())


def test_per_direction_delay_and_live_update() -> None:
    async def body() -> None:
        async with proxied_echo(LinkConfig(delay_up_ms=10, delay_down_ms=50)) as proxy:
            reader, writer = await connect(proxy)
            assert 0.060 <= await best_rtt(reader, writer) < 0.060 + SLACK_S
            proxy.update(LinkConfig())
            assert await best_rtt(reader, writer) < SLACK_S
            writer.close()
    asyncio.run(body())


def test_bandwidth_200kB_at_1000kbps_takes_about_1_6s() -> None:
    async def body() -> None:
        async with proxied_echo(LinkConfig(up_kbps=1000)) as proxy:
            reader, writer = await connect(proxy)
            elapsed = await ping(reader, writer, size=200_000)
            writer.close()
            assert 1.59 <= elapsed < 2.3, elapsed
            assert proxy.bytes_up == 200_000
    asyncio.run(body())


def test_download_bandwidth() -> None:
    async def body() -> None:
        async with proxied_echo(LinkConfig(down_kbps=4000)) as proxy:
            reader, writer = await connect(proxy)
            elapsed = await ping(reader, writer, size=100_000)  # 0.2 s at 4 Mbit/s
            writer.close()
            assert 0.19 <= elapsed < 0.5, elapsed
    asyncio.run(body())


def test_jitter_keeps_bytes_in_order() -> None:
    async def body() -> None:
        async with proxied_echo(LinkConfig(delay_ms=5, jitter_ms=20, seed=3)) as proxy:
            reader, writer = await connect(proxy)
            chunks = [b"<%04d:" % i + random.randbytes(random.randint(1, 300)) + b">"
                      for i in range(300)]
            expected = b"".join(chunks)

            async def send() -> None:
                for i, chunk in enumerate(chunks):
                    writer.write(chunk)
                    await writer.drain()
                    if i % 10 == 0:
                        await asyncio.sleep(0.002)  # separate reads, so each gets its own jitter

            sender = asyncio.create_task(send())
            got = await asyncio.wait_for(reader.readexactly(len(expected)), 10)
            await sender
            writer.close()
            assert got == expected
    asyncio.run(body())


def test_loss_adds_retransmission_penalty() -> None:
    async def body() -> None:
        async with proxied_echo(LinkConfig(loss=1.0, seed=0)) as proxy:
            reader, writer = await connect(proxy)
            rtt = await ping(reader, writer)
            assert rtt >= 2 * 0.2  # both directions pay one RTO
            proxy.update(LinkConfig(loss=0.0))
            assert await best_rtt(reader, writer) < SLACK_S
            writer.close()
    asyncio.run(body())


def test_drop_connections_resets_the_client_and_proxy_keeps_serving() -> None:
    async def body() -> None:
        async with proxied_echo(LinkConfig(delay_ms=5)) as proxy:
            reader, writer = await connect(proxy)
            await ping(reader, writer)
            await proxy.drop_connections()
            assert await sees_eof_or_reset(reader)
            assert proxy.active_connections == 0
            reader2, writer2 = await connect(proxy)
            await ping(reader2, writer2)
            writer2.close()
            assert proxy.connections == 2
    asyncio.run(body())


def test_blackhole_stalls_then_resumes() -> None:
    async def body() -> None:
        async with proxied_echo(LinkConfig()) as proxy:
            reader, writer = await connect(proxy)
            await ping(reader, writer)
            proxy.set_blackhole(True)
            fresh_reader, fresh_writer = await connect(proxy)  # the kernel still completes SYN
            for w in (writer, fresh_writer):
                w.write(b"anyone?")
            for r in (reader, fresh_reader):
                with pytest.raises(asyncio.TimeoutError):
                    await asyncio.wait_for(r.readexactly(7), 0.3)
            proxy.set_blackhole(False)
            for r in (reader, fresh_reader):
                assert await asyncio.wait_for(r.readexactly(7), 2) == b"anyone?"
            writer.close()
            fresh_writer.close()
    asyncio.run(body())


def test_unreachable_upstream_resets_the_client() -> None:
    async def body() -> None:
        proxy = LinkProxy(HOST, free_port(), LinkConfig())
        await proxy.start()
        reader, writer = await connect(proxy)
        assert await sees_eof_or_reset(reader)
        writer.close()
        await proxy.stop()
    asyncio.run(body())


def test_aiohttp_http_and_websocket_through_the_proxy() -> None:
    async def ws_echo(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        async for msg in ws:
            if msg.type == aiohttp.WSMsgType.TEXT:
                await ws.send_str(msg.data)
            elif msg.type == aiohttp.WSMsgType.BINARY:
                await ws.send_bytes(msg.data)
        return ws

    async def hello(request: web.Request) -> web.Response:
        return web.Response(text="hello")

    async def body() -> None:
        app = web.Application()
        app.add_routes([web.get("/ws", ws_echo), web.get("/hello", hello)])
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, HOST, 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        proxy = LinkProxy(HOST, port, LinkConfig(delay_ms=10, down_kbps=20_000))
        await proxy.start()
        loop = asyncio.get_running_loop()
        try:
            async with aiohttp.ClientSession() as session:
                async with session.get(f"http://{HOST}:{proxy.port}/hello") as resp:
                    assert await resp.text() == "hello"
                async with session.ws_connect(f"http://{HOST}:{proxy.port}/ws") as ws:
                    t0 = loop.time()
                    await ws.send_str("draft tokens")
                    assert await asyncio.wait_for(ws.receive_str(), 5) == "draft tokens"
                    assert loop.time() - t0 >= 0.020
                    blob = random.randbytes(100_000)
                    await ws.send_bytes(blob)
                    assert await asyncio.wait_for(ws.receive_bytes(), 5) == blob
        finally:
            await proxy.stop()
            await runner.cleanup()
        assert proxy.bytes_down > 100_000
    asyncio.run(body())


# ---------------------------------------------------------------- threads and the CLI

class _EchoHandler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        with contextlib.suppress(OSError):
            while data := self.request.recv(65536):
                self.request.sendall(data)


@contextlib.contextmanager
def threaded_echo() -> Iterator[int]:
    server = socketserver.ThreadingTCPServer((HOST, 0), _EchoHandler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


def sync_best_rtt(sock: socket.socket) -> float:
    sync_ping(sock)  # warm-up: the echo server spawns a thread per connection
    return min(sync_ping(sock) for _ in range(3))


def sync_ping(sock: socket.socket, payload: bytes = b"ping") -> float:
    t0 = time.monotonic()
    sock.sendall(payload)
    got = b""
    while len(got) < len(payload):
        part = sock.recv(65536)
        assert part, "connection closed"
        got += part
    assert got == payload
    return time.monotonic() - t0


def test_threaded_proxy_for_sync_code() -> None:
    with threaded_echo() as echo_port, ThreadedLinkProxy(HOST, echo_port,
                                                         LinkConfig(delay_ms=20)) as link:
        assert link.url_for("/v1/verify") == f"http://{HOST}:{link.port}/v1/verify"
        assert link.url_for("ws", scheme="ws") == f"ws://{HOST}:{link.port}/ws"
        with socket.create_connection((HOST, link.port), timeout=5) as sock:
            assert 0.040 <= sync_best_rtt(sock) < 0.040 + SLACK_S
            link.update(LinkConfig())
            assert sync_best_rtt(sock) < SLACK_S
            link.drop_connections()
            try:
                assert sock.recv(1024) == b""
            except ConnectionResetError:
                pass
        assert link.connections == 1 and link.bytes_up == 8 * 4
        link.set_blackhole(True)
        link.set_blackhole(False)
        with socket.create_connection((HOST, link.port), timeout=5) as sock:
            sync_ping(sock)


def test_cli_parsing() -> None:
    args = build_parser().parse_args([
        "--listen", "127.0.0.1:9000", "--upstream", "127.0.0.1:8000", "--delay-ms", "25",
        "--jitter-ms", "5", "--up-kbps", "1000", "--down-kbps", "5000", "--loss", "0.01"])
    assert config_from_args(args) == LinkConfig(
        delay_ms=25, jitter_ms=5, up_kbps=1000, down_kbps=5000, loss=0.01)
    assert parse_hostport(args.listen) == (HOST, 9000)
    assert parse_hostport("[::1]:8000") == ("::1", 8000)
    with pytest.raises(ValueError):
        parse_hostport("8000")


def test_cli_runs_until_interrupted() -> None:
    with threaded_echo() as echo_port:
        proc = subprocess.Popen(
            [sys.executable, "-m", "bench.linkproxy", "--listen", f"{HOST}:0",
             "--upstream", f"{HOST}:{echo_port}", "--delay-ms", "5"],
            cwd=REPO, stdout=subprocess.PIPE, text=True)
        try:
            banner = proc.stdout.readline()  # type: ignore[union-attr]
            port = int(banner.split()[1].rsplit(":", 1)[1])
            with socket.create_connection((HOST, port), timeout=5) as sock:
                assert sync_ping(sock) >= 0.010
            proc.send_signal(signal.SIGINT)
            out, _ = proc.communicate(timeout=10)
            assert proc.returncode == 0 and "1 connections" in out
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
