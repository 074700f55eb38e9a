"""One WebSocket connection on the verifier: its state shared by the read and work loops, the
socket (which says why before it closes on an oversized message), sending, refusing, and TLS."""
from __future__ import annotations

import asyncio
import collections
import logging
import ssl
import time
from dataclasses import dataclass, field

from aiohttp import WSCloseCode, web

import codec
from cloud.errors import SessionError
from cloud.limits import TokenBucket, op_cost
from cloud.metrics import Metrics
from cloud.session import VerifySession

log = logging.getLogger("picospec.cloud")
# refusals that are about who the peer is or how it behaves (1008 policy violation), not a
# malformed stream (1002 protocol error)
POLICY_CODES = ("unauthorized", "model_mismatch", "rate_limited")


@dataclass(eq=False)
class Conn:
    """One connection's state, shared by its read loop (fills `ops`) and work loop (drains it)."""

    sid: str
    ws: web.WebSocketResponse
    bucket: TokenBucket
    session: VerifySession | None = None
    quota_key: str | None = None
    ops: collections.deque = field(default_factory=collections.deque)
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    cost: int = 0  # op_cost of what is in ops
    busy: bool = False  # the work loop is handling a message (an edge may wait in silence)
    last_active: float = field(default_factory=time.monotonic)
    opened: float = field(default_factory=time.monotonic)
    arrivals: collections.deque = field(default_factory=collections.deque)  # time.monotonic() per op
    popped_at: float = 0.0  # when the op last popped came in

    def push(self, op) -> None:
        self.arrivals.append(time.monotonic())
        self.ops.append(op)
        self.cost += op_cost(op)
        self.wake.set()

    def pop(self):
        op = self.ops.popleft()
        self.popped_at = self.arrivals.popleft()
        self.cost -= op_cost(op)
        return op

    def pop_branches(self) -> list:
        """The branch Drafts (Draft.root set) waiting in ops, taken out of turn: a branch moves no
        position, and one that arrived during a pass must be known before that pass's verdict
        (its recovered token may be the branch's root). The other ops keep their order."""
        taken, ops, arrivals = [], collections.deque(), collections.deque()
        for op, at in zip(self.ops, self.arrivals):
            if getattr(op, "root", None) is not None:
                taken.append(op)
                self.cost -= op_cost(op)
            else:
                ops.append(op)
                arrivals.append(at)
        self.ops, self.arrivals = ops, arrivals
        return taken

    def log(self, level: int, event: str, text: str, **fields) -> None:
        """A log line about this session, its id in a field of its own (see cloud/logs.py)."""
        log.log(level, "session %s %s", self.sid, text, extra={"session": self.sid, "event": event, **fields})


class WebSocket(web.WebSocketResponse):
    """aiohttp closes on an oversized message before the handler sees it: say why first."""

    async def close(self, *, code: int = WSCloseCode.OK, message: bytes = b"", drain: bool = True) -> bool:
        if code == WSCloseCode.MESSAGE_TOO_BIG and not self.closed:
            try:
                await self.send_bytes(codec.encode(codec.Error(
                    code="too_large", message=f"a message over {self._max_msg_size} bytes")))
            except (ConnectionError, RuntimeError):
                pass
            message = message or b"too_large"
        return await super().close(code=code, message=message, drain=drain)


def decode_frame(data: bytes, vocab_size: int, max_frame: int):
    """The message in a frame from the edge, or SessionError with the codec's code."""
    try:
        return codec.decode(data, vocab_size=vocab_size, max_frame=max_frame)
    except codec.CodecError as err:
        raise SessionError(err.code, err.message)


async def send(conn: Conn, msg, metrics: Metrics) -> None:
    data = codec.encode(msg)
    metrics.inc("picospec_bytes_down_total", len(data))
    metrics.inc("picospec_messages_down_total")
    await conn.ws.send_bytes(data)
    conn.last_active = time.monotonic()


async def refuse(conn: Conn, err: SessionError, metrics: Metrics) -> None:
    """Say why (an Error message with its code), then close: the other sessions carry on."""
    metrics.inc("picospec_errors_total", kind=err.code)
    conn.log(logging.WARNING, "refused", f"refused: {err.code}: {err.message}", code=err.code)
    ws = conn.ws
    if not ws.closed:
        try:
            await ws.send_bytes(codec.encode(codec.Error(code=err.code, message=err.message[:codec.MAX_STR])))
        except (ConnectionError, RuntimeError):
            pass
        await ws.close(code=1008 if err.code in POLICY_CODES else 1002, message=err.code.encode()[:120])


def server_ssl(cert: str | None, key: str | None) -> ssl.SSLContext | None:
    """TLS for wss://: the certificate chain and its key (PEM files); None serves plain ws://."""
    if not cert:
        if key:
            raise ValueError("--tls-key needs --tls-cert")
        return None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cert, key)
    return ctx
