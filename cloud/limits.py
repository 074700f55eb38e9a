"""Per-connection and per-credential limits of the verifier: what one edge may cost the others.

Each is a small pure object the server consults on the event loop (no locks needed there):
  TokenBucket   messages per second of one connection (a burst, then a steady rate)
  SessionQuota  concurrent sessions per credential (a token, or the peer address on an open server)
  op_cost       how much memory a decoded message holds while it waits in a session's queue
"""
from __future__ import annotations

import hmac
import time
from dataclasses import dataclass, field
from typing import Callable

import codec


@dataclass
class TokenBucket:
    """`rate` tokens a second up to `burst`; each message takes one. rate <= 0 disables it."""

    rate: float
    burst: float
    clock: Callable[[], float] = time.monotonic
    tokens: float = field(init=False)
    stamp: float = field(init=False)

    def __post_init__(self) -> None:
        self.tokens = self.burst
        self.stamp = self.clock()

    def take(self, n: float = 1.0) -> bool:
        if self.rate <= 0:
            return True
        now = self.clock()
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens < n:
            return False
        self.tokens -= n
        return True


class SessionQuota:
    """Counts open sessions per key; `acquire` refuses past `limit` (limit <= 0: no limit)."""

    def __init__(self, limit: int):
        self.limit = limit
        self.open: dict[str, int] = {}

    def acquire(self, key: str) -> bool:
        if self.limit > 0 and self.open.get(key, 0) >= self.limit:
            return False
        self.open[key] = self.open.get(key, 0) + 1
        return True

    def release(self, key: str) -> None:
        left = self.open.get(key, 0) - 1
        if left > 0:
            self.open[key] = left
        else:
            self.open.pop(key, None)


def match_token(presented: str | None, accepted: tuple[str, ...]) -> int | None:
    """Index of the accepted token the edge presented, else None.

    Every accepted token is compared, in constant time each, whatever matched earlier: the
    answer's timing says nothing about which token, or how much of one, was right.
    """
    given = (presented or "").encode()
    found = None
    for i, token in enumerate(accepted):
        if hmac.compare_digest(given, token.encode()) and found is None:
            found = i
    return found


def op_cost(op) -> int:
    """Token ids (and draft-distribution entries) a decoded message holds: its queued weight."""
    if isinstance(op, codec.Prompt):
        return 1 + len(op.ids)
    if isinstance(op, codec.Draft):
        return 1 + len(op.ids) + sum(len(d.ids) for d in op.dists or ())
    return 1
