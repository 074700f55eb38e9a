"""Graceful drain: how a verifier replica leaves a fleet without losing a committed token.

On the first SIGTERM (`picospec serve`): /healthz answers 503 "draining" so that the load balancer
routes new sessions elsewhere, new sessions are refused with the retryable code `draining`, every
pass in flight finishes and its verdict goes out, then each open session gets an Error `draining`
and a close with code 1012 (service restart). The edge reconnects to another replica and resumes
from its committed prefix. A second SIGTERM, or the deadline, ends the drain at once.
"""
from __future__ import annotations

import asyncio
import time

import codec

CLOSE_SERVICE_RESTART = 1012  # RFC 6455: the server is restarting; the client may reconnect
DRAIN_CODE = "draining"


async def drain(server, deadline_s: float = 45.0, poll_s: float = 0.02) -> dict:
    """Stop taking sessions, let passes in flight finish, then close every session with `draining`.

    Returns what happened (sessions closed, how many were cut at the deadline mid-pass, seconds)."""
    t0 = time.monotonic()
    server.draining = True
    closed = cut = 0
    for conn in list(server._conns):
        # a pass in flight finishes and its verdict is sent before the session is closed
        while conn.busy and time.monotonic() - t0 < deadline_s:
            await asyncio.sleep(poll_s)
        cut += bool(conn.busy)
        await close_for_drain(conn)
        closed += 1
    server.metrics.inc("picospec_drained_sessions_total", closed)
    return {"closed": closed, "cut_at_deadline": cut, "seconds": time.monotonic() - t0}


async def close_for_drain(conn) -> None:
    ws = conn.ws
    if ws.closed:
        return
    message = "this verifier is draining; reconnect to another replica to resume"
    try:
        await ws.send_bytes(codec.encode(codec.Error(code=DRAIN_CODE, message=message)))
        await ws.close(code=CLOSE_SERVICE_RESTART, message=DRAIN_CODE.encode())
    except (ConnectionError, RuntimeError):
        pass
