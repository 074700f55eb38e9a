"""A session's read loop: frames in, decoded messages queued for its work loop.

Everything the edge sends is checked here before it costs compute: the connection's message rate
(a token bucket), binary frames only, the codec's checks (sizes, zstd bombs, every field), and
the memory its queued, not yet handled messages hold. An edge that is silent for the idle timeout
while nothing of its own is pending is evicted (its KV cache freed; it may reconnect and resume).
"""
from __future__ import annotations

import asyncio
import logging
import time

from aiohttp import WSMsgType

import codec
from cloud.connection import Conn, decode_frame, refuse
from cloud.errors import SessionError
from cloud.limits import op_cost
from cloud.metrics import Metrics

CLOSED = (WSMsgType.CLOSE, WSMsgType.CLOSING, WSMsgType.CLOSED)


async def read_loop(conn: Conn, worker: asyncio.Task, config, metrics: Metrics, vocab_size: int) -> None:
    """Until the edge closes, is refused, goes idle, or its work loop ends. config: ServerConfig."""
    ws = conn.ws
    while not ws.closed:
        try:
            msg = await ws.receive(timeout=max(0.05, conn.last_active + config.idle_timeout_s - time.monotonic()))
        except asyncio.TimeoutError:
            # idle means neither side did anything: an edge waiting on a long pass is not idle
            if conn.busy or conn.ops:
                conn.last_active = time.monotonic()
            elif time.monotonic() - conn.last_active >= config.idle_timeout_s:
                metrics.inc("picospec_evictions_total")
                await refuse(conn, SessionError(
                    "idle_timeout", f"session idle for {config.idle_timeout_s:g} s; reconnect to resume"), metrics)
                return
            continue
        if msg.type in CLOSED:
            return
        if msg.type == WSMsgType.ERROR:
            await _on_ws_error(conn, metrics)
            return
        conn.last_active = time.monotonic()
        try:
            op = _admit(conn, msg, config, metrics, vocab_size)
        except SessionError as err:
            await refuse(conn, err, metrics)
            return
        if isinstance(op, codec.Close):
            await ws.close()
            return
        conn.push(op)
        if worker.done():
            return


def _admit(conn: Conn, msg, config, metrics: Metrics, vocab_size: int):
    """The decoded message, if the connection may send it now; SessionError if not."""
    if not conn.bucket.take():
        metrics.inc("picospec_rate_limited_total")
        raise SessionError("rate_limited", f"more than {config.msgs_per_s:g} messages a second "
                                           f"(burst {config.msg_burst:g})")
    if msg.type != WSMsgType.BINARY:
        raise SessionError("bad_frame", "PicoSpec frames are binary")
    metrics.inc("picospec_bytes_up_total", len(msg.data))
    metrics.inc("picospec_messages_up_total")
    op = decode_frame(msg.data, vocab_size, config.max_msg_size)
    if isinstance(op, codec.Close):
        return op
    if len(conn.ops) >= config.max_queued_msgs or conn.cost + op_cost(op) > config.max_queued_cost:
        raise SessionError("overloaded", "too many messages queued; wait for the replies")
    return op


async def _on_ws_error(conn: Conn, metrics: Metrics) -> None:
    err = conn.ws.exception()
    text = str(err).lower()
    if isinstance(err, asyncio.TimeoutError) or "pong" in text:  # a dead link: nobody to tell
        metrics.inc("picospec_connections_lost_total")
        conn.log(logging.INFO, "lost", f"connection lost: {err}")
        return
    code = "too_large" if "size" in text or getattr(err, "code", None) == 1009 else "bad_frame"
    await refuse(conn, SessionError(code, f"websocket error: {err}"), metrics)
