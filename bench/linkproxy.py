"""A user-space TCP proxy that makes loopback look like a slow, far-away link.

The benchmark box has no `tc netem`, so the edge-cloud link is emulated here: every chunk read on
one side is released on the other after its serialisation time at the direction's bandwidth plus a
one-way delay (and jitter), in order, with a retransmission stall standing in for packet loss.
"up" is client -> upstream (edge -> cloud), "down" is upstream -> client. See docs/LINK_EMULATION.md.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import random
import socket
import struct
import threading
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Coroutine, Literal, NamedTuple, TypeVar

Direction = Literal["up", "down"]
T = TypeVar("T")

READ_BYTES = 64 * 1024
# One emulated packet when a link is shaped or lossy: a typical Ethernet TCP payload, so bandwidth
# spreads a burst over time and loss hits per packet, as on a real wire.
SEGMENT_BYTES = 1448
# Bytes held per direction before we stop reading (backpressure); about netem's 1000-packet limit.
MAX_BUFFER_BYTES = 1 << 20
# Linux TCP_RTO_MIN: no retransmission timeout is shorter, however small the RTT.
MIN_RTO_S = 0.2
CONNECT_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class LinkConfig:
    """Link impairments. Delays are one-way per direction (rtt = up + down); kbps = 1000 bit/s."""

    delay_ms: float = 0.0
    jitter_ms: float = 0.0
    up_kbps: float | None = None
    down_kbps: float | None = None
    loss: float = 0.0
    seed: int | None = None
    delay_up_ms: float | None = None  # overrides delay_ms for client -> upstream
    delay_down_ms: float | None = None  # overrides delay_ms for upstream -> client

    def __post_init__(self) -> None:
        delays = (self.delay_ms, self.jitter_ms, self.delay_up_ms or 0.0, self.delay_down_ms or 0.0)
        if any(d < 0 for d in delays):
            raise ValueError("delays and jitter must be >= 0")
        if any(k is not None and k <= 0 for k in (self.up_kbps, self.down_kbps)):
            raise ValueError("bandwidth must be > 0 kbps (None = unlimited)")
        if not 0.0 <= self.loss <= 1.0:
            raise ValueError("loss is a probability in [0, 1]")

    def one_way_s(self, direction: Direction) -> float:
        override = self.delay_up_ms if direction == "up" else self.delay_down_ms
        return (self.delay_ms if override is None else override) / 1000.0

    def rate_bps(self, direction: Direction) -> float | None:
        kbps = self.up_kbps if direction == "up" else self.down_kbps
        return None if kbps is None else kbps * 1000.0

    @property
    def rtt_s(self) -> float:
        return self.one_way_s("up") + self.one_way_s("down")

    @property
    def rto_s(self) -> float:
        """The stall a lost chunk pays: TCP's retransmission timeout, floored like Linux's."""
        return max(MIN_RTO_S, 2.0 * self.rtt_s)

    @property
    def segmented(self) -> bool:
        """Whether chunks are cut into packets (only worth the cost when rate or loss act on them)."""
        return self.up_kbps is not None or self.down_kbps is not None or self.loss > 0


class WireClock(NamedTuple):
    """Per-direction timing state: when the wire is free again, and the last release time."""

    busy_until: float = 0.0
    last_release: float = 0.0


def schedule(
    clock: WireClock, now: float, nbytes: int, cfg: LinkConfig, direction: Direction,
    rng: random.Random,
) -> tuple[float, WireClock]:
    """When a chunk of `nbytes` read at `now` reaches the far side, and the clock after it."""
    rate = cfg.rate_bps(direction)
    start = max(now, clock.busy_until)  # queue behind bytes still on the wire
    sent = start + (nbytes * 8.0 / rate if rate else 0.0)
    delay = cfg.one_way_s(direction)
    if cfg.jitter_ms > 0:
        # Uniform +-jitter like netem's default, clamped so nothing arrives before it was sent.
        delay = max(0.0, delay + rng.uniform(-cfg.jitter_ms, cfg.jitter_ms) / 1000.0)
    if cfg.loss > 0 and rng.random() < cfg.loss:
        delay += cfg.rto_s  # TCP never loses bytes; a lost packet costs a retransmission timeout
    # TCP delivers in order: a chunk never overtakes the previous one (head-of-line blocking).
    release = max(clock.last_release, sent + delay)
    return release, WireClock(busy_until=sent, last_release=release)


def split_segments(data: bytes, size: int) -> list[bytes]:
    return [data[i:i + size] for i in range(0, len(data), size)] or [data]


class _DelayLine:
    """A byte-bounded FIFO of (release_at, payload) for one direction; payload None means EOF."""

    def __init__(self, limit_bytes: int) -> None:
        self._items: deque[tuple[float, bytes | None]] = deque()
        self._bytes = 0
        self._limit = limit_bytes
        self._has_items = asyncio.Event()
        self._has_room = asyncio.Event()
        self._has_room.set()

    async def put(self, release: float, payload: bytes | None) -> None:
        await self._has_room.wait()  # backpressure: the reader stops and the sender's TCP window fills
        self._items.append((release, payload))
        self._bytes += len(payload) if payload else 0
        self._has_items.set()
        if self._bytes >= self._limit:
            self._has_room.clear()

    async def head_release(self) -> float:
        await self._has_items.wait()
        return self._items[0][0]

    def pop_ready(self, now: float) -> tuple[bytes, bool]:
        """Everything due by `now`, joined (fewer writes); and whether EOF was reached."""
        parts: list[bytes] = []
        eof = False
        while self._items and self._items[0][0] <= now:
            payload = self._items.popleft()[1]
            if payload is None:
                eof = True
                break
            parts.append(payload)
            self._bytes -= len(payload)
        if not self._items:
            self._has_items.clear()
        if self._bytes < self._limit:
            self._has_room.set()
        return b"".join(parts), eof


def _reset(writer: asyncio.StreamWriter | None) -> None:
    """Close abruptly with an RST (SO_LINGER 0), so the peer sees a reset rather than a clean EOF."""
    if writer is None or writer.transport.is_closing():
        return
    sock = writer.get_extra_info("socket")
    with contextlib.suppress(OSError, AttributeError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


@dataclass(eq=False)
class _Conn:
    client: asyncio.StreamWriter
    upstream: asyncio.StreamWriter | None = None
    task: asyncio.Task | None = None


class LinkProxy:
    """Forwards TCP from listen_host:listen_port to upstream through an emulated link."""

    def __init__(
        self, upstream_host: str, upstream_port: int, config: LinkConfig | None = None,
        listen_host: str = "127.0.0.1", listen_port: int = 0,
        max_buffer_bytes: int = MAX_BUFFER_BYTES,
    ) -> None:
        self.upstream_host, self.upstream_port = upstream_host, upstream_port
        self.listen_host, self.listen_port = listen_host, listen_port
        self.config = config or LinkConfig()
        self.max_buffer_bytes = max_buffer_bytes
        self.bytes_up = 0
        self.bytes_down = 0
        self.connections = 0  # accepted so far
        self._conns: set[_Conn] = set()
        self._server: asyncio.AbstractServer | None = None
        self._open = asyncio.Event()  # cleared while blackholed
        self._open.set()

    @property
    def active_connections(self) -> int:
        return len(self._conns)

    @property
    def port(self) -> int:
        return self.listen_port

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._handle, self.listen_host, self.listen_port)
        self.listen_port = self._server.sockets[0].getsockname()[1]
        return self.listen_port

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        await self.drop_connections()
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None

    def update(self, config: LinkConfig) -> None:
        """Change the link live; chunks already scheduled keep their release times."""
        self.config = config

    def set_blackhole(self, on: bool) -> None:
        """Stall everything, as if the cloud were unreachable: connections are accepted but never
        dialled upstream and no byte moves either way; lifting it resumes them, like TCP would."""
        if on:
            self._open.clear()
        else:
            self._open.set()

    async def drop_connections(self) -> None:
        """Reset every current connection on both sides (fault injection)."""
        conns = list(self._conns)
        for conn in conns:
            _reset(conn.client)
            _reset(conn.upstream)
            if conn.task is not None:
                conn.task.cancel()
        tasks = [c.task for c in conns if c.task is not None]
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _handle(self, c_reader: asyncio.StreamReader, c_writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        number = self.connections
        conn = _Conn(client=c_writer, task=asyncio.current_task())
        self._conns.add(conn)
        try:
            await self._open.wait()  # an unreachable cloud: hold the client, dial nothing
            u_reader, conn.upstream = await asyncio.wait_for(
                asyncio.open_connection(self.upstream_host, self.upstream_port), CONNECT_TIMEOUT_S)
            clean = await self._relay(number, conn.client, c_reader, conn.upstream, u_reader)
            if clean:
                for writer in (conn.client, conn.upstream):
                    writer.close()
            else:
                _reset(conn.client)
                _reset(conn.upstream)
        except asyncio.CancelledError:
            pass  # dropped or stopping; the sockets were already reset
        except (OSError, asyncio.TimeoutError):
            _reset(conn.client)  # upstream refused or timed out: the edge sees a reset
            _reset(conn.upstream)
        finally:
            self._conns.discard(conn)

    async def _relay(
        self, number: int, c_writer: asyncio.StreamWriter, c_reader: asyncio.StreamReader,
        u_writer: asyncio.StreamWriter, u_reader: asyncio.StreamReader,
    ) -> bool:
        """Run both directions until both reach EOF (True) or either fails (False)."""
        seed = self.config.seed
        tasks = []
        for direction, src, dst in (("up", c_reader, u_writer), ("down", u_reader, c_writer)):
            # A seeded rng per connection and direction keeps runs reproducible whatever interleaving.
            rng = random.Random(f"{seed}/{number}/{direction}") if seed is not None else random.Random()
            line = _DelayLine(self.max_buffer_bytes)
            tasks.append(asyncio.ensure_future(self._pump(src, line, direction, rng)))
            tasks.append(asyncio.ensure_future(self._deliver(line, dst, direction)))
        try:
            done, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
            return not pending and all(t.exception() is None for t in done)
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _pump(
        self, src: asyncio.StreamReader, line: _DelayLine, direction: Direction, rng: random.Random,
    ) -> None:
        """Read one side, stamp every segment with its release time, queue it."""
        loop = asyncio.get_running_loop()
        clock = WireClock()
        while True:
            data = await src.read(READ_BYTES)
            now = loop.time()
            cfg = self.config  # read per chunk so update() takes effect live
            if not data:
                # The FIN travels the link too, after the data before it.
                await line.put(max(clock.last_release, now + cfg.one_way_s(direction)), None)
                return
            segments = split_segments(data, SEGMENT_BYTES) if cfg.segmented else [data]
            for seg in segments:
                release, clock = schedule(clock, now, len(seg), cfg, direction, rng)
                await line.put(release, seg)

    async def _deliver(
        self, line: _DelayLine, dst: asyncio.StreamWriter, direction: Direction,
    ) -> None:
        """Write each segment to the other side once due, in order, honouring its backpressure."""
        loop = asyncio.get_running_loop()
        while True:
            release = await line.head_release()
            # Loop: a timer may fire a hair early, and a chunk must never arrive before its time.
            while (wait := release - loop.time()) > 0:
                await asyncio.sleep(wait)
            await self._open.wait()
            payload, eof = line.pop_ready(loop.time())
            if payload:
                dst.write(payload)
                if direction == "up":
                    self.bytes_up += len(payload)
                else:
                    self.bytes_down += len(payload)
                await dst.drain()
            if eof:
                if dst.can_write_eof():
                    dst.write_eof()  # half-close: the other direction may still be talking
                return


class ThreadedLinkProxy:
    """A LinkProxy on its own event loop in a daemon thread, for sync tests and the benchmark."""

    def __init__(
        self, upstream_host: str, upstream_port: int, config: LinkConfig | None = None,
        listen_host: str = "127.0.0.1", listen_port: int = 0,
    ) -> None:
        self.proxy = LinkProxy(upstream_host, upstream_port, config, listen_host, listen_port)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    def start(self, timeout: float = 10.0) -> int:
        loop = asyncio.new_event_loop()
        self._loop = loop
        self._thread = threading.Thread(target=loop.run_forever, name="linkproxy", daemon=True)
        self._thread.start()
        return self._call(self.proxy.start(), timeout)

    def close(self, timeout: float = 10.0) -> None:
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        try:
            self._call(self.proxy.stop(), timeout)
        finally:
            loop.call_soon_threadsafe(loop.stop)
            thread.join(timeout)
            if not thread.is_alive():
                loop.close()
            self._loop = self._thread = None

    def __enter__(self) -> ThreadedLinkProxy:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def port(self) -> int:
        return self.proxy.port

    @property
    def host(self) -> str:
        return self.proxy.listen_host

    def url_for(self, path: str = "/", scheme: str = "http") -> str:
        return f"{scheme}://{self.host}:{self.port}{path if path.startswith('/') else '/' + path}"

    def update(self, config: LinkConfig) -> None:
        self._call(_run_sync(self.proxy.update, config))

    def set_blackhole(self, on: bool) -> None:
        self._call(_run_sync(self.proxy.set_blackhole, on))

    def drop_connections(self, timeout: float = 10.0) -> None:
        self._call(self.proxy.drop_connections(), timeout)

    # Counters are plain ints written on the proxy's loop; reading them from here is safe.
    @property
    def bytes_up(self) -> int:
        return self.proxy.bytes_up

    @property
    def bytes_down(self) -> int:
        return self.proxy.bytes_down

    @property
    def connections(self) -> int:
        return self.proxy.connections

    def _call(self, coro: Coroutine[Any, Any, T], timeout: float = 10.0) -> T:
        if self._loop is None:
            coro.close()
            raise RuntimeError("ThreadedLinkProxy is not running")
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)


async def _run_sync(fn: Callable[..., T], *args: Any) -> T:
    """Run a plain callable on the proxy's loop (its Events are not thread-safe)."""
    return fn(*args)


def parse_hostport(text: str) -> tuple[str, int]:
    """'127.0.0.1:9000' or '[::1]:9000' -> (host, port)."""
    host, sep, port = text.rpartition(":")
    if not sep or not host:
        raise ValueError(f"expected HOST:PORT, got {text!r}")
    return host.strip("[]"), int(port)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.linkproxy", description=__doc__.split("\n")[0])
    p.add_argument("--listen", default="127.0.0.1:9000", help="HOST:PORT to accept the edge on")
    p.add_argument("--upstream", required=True, help="HOST:PORT of the cloud server")
    p.add_argument("--delay-ms", type=float, default=0.0, help="one-way delay, each direction")
    p.add_argument("--delay-up-ms", type=float, default=None, help="override for edge -> cloud")
    p.add_argument("--delay-down-ms", type=float, default=None, help="override for cloud -> edge")
    p.add_argument("--jitter-ms", type=float, default=0.0, help="uniform +- per chunk")
    p.add_argument("--up-kbps", type=float, default=None, help="edge -> cloud bandwidth")
    p.add_argument("--down-kbps", type=float, default=None, help="cloud -> edge bandwidth")
    p.add_argument("--loss", type=float, default=0.0, help="probability a packet pays an RTO")
    p.add_argument("--seed", type=int, default=None)
    return p


def config_from_args(args: argparse.Namespace) -> LinkConfig:
    return LinkConfig(
        delay_ms=args.delay_ms, jitter_ms=args.jitter_ms, up_kbps=args.up_kbps,
        down_kbps=args.down_kbps, loss=args.loss, seed=args.seed,
        delay_up_ms=args.delay_up_ms, delay_down_ms=args.delay_down_ms)


async def _serve_forever(proxy: LinkProxy) -> None:
    port = await proxy.start()
    print(f"linkproxy {proxy.listen_host}:{port} -> {proxy.upstream_host}:{proxy.upstream_port}"
          f" {proxy.config}", flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        await proxy.stop()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    listen_host, listen_port = parse_hostport(args.listen)
    up_host, up_port = parse_hostport(args.upstream)
    proxy = LinkProxy(up_host, up_port, config_from_args(args), listen_host, listen_port)
    try:
        asyncio.run(_serve_forever(proxy))
    except KeyboardInterrupt:
        pass
    print(f"linkproxy done: {proxy.connections} connections, "
          f"{proxy.bytes_up} B up, {proxy.bytes_down} B down", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
