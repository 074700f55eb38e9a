"""One WebSocket connection on the verifier: its state between the read and work loops, the
socket itself (which says why before it closes on an oversized message), the hello's checks,
and TLS."""
from __future__ import annotations

import asyncio
import collections
import ssl
import time
from dataclasses import dataclass, field

from aiohttp import WSCloseCode, web

import codec
from cloud.limits import TokenBucket, match_token, op_cost
from cloud.session import SessionError, VerifySession
from sampling import SamplingParams


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

    def push(self, op) -> None:
        self.ops.append(op)
        self.cost += op_cost(op)
        self.wake.set()

    def pop(self):
        op = self.ops.popleft()
        self.cost -= op_cost(op)
        return op


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


def check_hello(hello: codec.Hello, tokens: tuple[str, ...], fingerprint: dict,
                model_name: str) -> tuple[int | None, SamplingParams]:
    """(which accepted token it presented, its sampling settings), or SessionError saying why not."""
    which = match_token(hello.token, tokens) if tokens else None
    if tokens and which is None:
        raise SessionError("unauthorized", "missing or wrong access token")
    ok, reason = compatible_fingerprints(hello.fingerprint, fingerprint)
    if not ok:
        raise SessionError("model_mismatch", f"the draft cannot work with target {model_name}: {reason}")
    try:
        params = SamplingParams(
            temperature=float(hello.sampling.get("temperature", 0.0)),
            top_p=float(hello.sampling.get("top_p", 1.0)),
            top_k=int(hello.sampling.get("top_k", 0)),
            seed=hello.sampling.get("seed"),
        ).validate()
    except (TypeError, ValueError) as err:
        raise SessionError("bad_message", f"bad sampling settings: {err}")
    if hello.variant not in ("exact", "paper"):
        raise SessionError("bad_message", f"unknown variant {hello.variant!r}; use 'exact' or 'paper'")
    return which, params


def compatible_fingerprints(draft: dict, target: dict) -> tuple[bool, str]:
    """Whether a draft's tokenizer can work with the target's (see models.fingerprint)."""
    from models.fingerprint import Fingerprint, compatible

    try:
        return compatible(Fingerprint.from_dict(draft), Fingerprint.from_dict(target))
    except (KeyError, TypeError, ValueError) as err:
        return False, f"malformed tokenizer fingerprint: {err}"
