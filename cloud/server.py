"""The cloud verifier: an aiohttp server, one verify session per WebSocket connection.

Routes: GET /healthz (JSON), GET /metrics (Prometheus text), GET /ws (the PicoSpec protocol).
A connection's life: handshake (cloud/admission.py: token, tokenizer, quotas) -> a read loop
(cloud/read_loop.py: rate limits, decoding, idle eviction) feeding a work loop (cloud/work_loop.py)
that hands forward passes to the one scheduler (cloud/scheduler.py). Bad input closes only the
session that sent it, with an Error message that says what was wrong.
"""
from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from dataclasses import dataclass

from aiohttp import WSMsgType, web

import codec
from cloud.admission import Admission
from cloud.connection import Conn, WebSocket, decode_frame, refuse, send, server_ssl
from cloud.errors import SessionError
from cloud.fill import FillTimings
from cloud.limits import TokenBucket
from cloud.metrics import Metrics, process_memory
from cloud.prefix_cache import PrefixStore
from cloud.read_loop import read_loop
from cloud.rule_impl import resolve_rule
from cloud.scheduler import Scheduler
from cloud.session import VerifySession
from cloud.work_loop import WorkLoop

COUNTERS = ("picospec_sessions_total", "picospec_verify_passes_total", "picospec_drafted_tokens_total",
            "picospec_accepted_tokens_total", "picospec_bytes_up_total", "picospec_bytes_down_total",
            "picospec_messages_up_total", "picospec_messages_down_total", "picospec_evictions_total",
            "picospec_rate_limited_total", "picospec_connections_lost_total", "picospec_prefill_tokens_total",
            "picospec_generated_tokens_total", "picospec_filled_tokens_total", "picospec_stale_drafts_total",
            "picospec_prefix_hits_total", "picospec_prefix_reused_tokens_total",
            "picospec_branches_taken_total")


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8765
    token: str | None = None
    tokens: tuple[str, ...] = ()  # more accepted tokens (one per edge fleet): limits count per token
    max_sessions: int = 64
    max_sessions_per_token: int = 8  # per token; per peer address on an open server; 0 = no limit
    max_msg_size: int = codec.MAX_FRAME
    msgs_per_s: float = 400.0  # per connection, steady; 0 = no limit
    msg_burst: float = 800.0  # per connection, messages allowed at once
    hello_timeout_s: float = 10.0
    idle_timeout_s: float = 300.0
    max_block: int = 16
    # cross-session batching (cloud/scheduler.py): every ready session's pass in one forward pass
    # per tick, up to batch_max_tokens fed ids; prompts are fed prefill_chunk ids per pass
    batch: bool = True
    batch_max_tokens: int = 256
    prefill_chunk: int = 64  # ids a prompt feeds per pass: other sessions' passes join every chunk's tick
    # fill bubbles with the cloud's own target tokens only while the verifier is this lightly
    # shared: with many sessions, idle time of one is another's verify time
    fill_max_sessions: int = 2
    max_queued_msgs: int = 256
    max_queued_cost: int = 1 << 18  # ids held by a connection's decoded, not yet handled messages
    max_queued_entries: int = 1 << 21  # drafted ids + distribution entries awaiting a pass
    max_context: int = 32768
    tls_cert: str | None = None
    tls_key: str | None = None
    # where the accept / recover rule runs (cloud/rule_impl.py): "auto" (torch on a GPU target,
    # numpy on a CPU one), "numpy" or "torch"
    rule: str = "auto"
    # keys and values of prompt openings shared across sessions (cloud/prefix_cache.py); 0 = off
    prefix_cache_bytes: int = 256 << 20

    @property
    def accepted_tokens(self) -> tuple[str, ...]:
        return ((self.token,) if self.token else ()) + tuple(t for t in self.tokens if t)


class VerifierServer:
    """Serves one target engine to many edge sessions."""

    def __init__(self, engine, fingerprint: dict, model_name: str, config: ServerConfig = ServerConfig(),
                 eos_id: int | None = None):
        self.engine = engine
        self.fingerprint = fingerprint
        self.model_name = model_name
        self.config = config
        self.eos_id = eos_id if eos_id is not None else fingerprint.get("eos_id")
        self.metrics = Metrics()
        self.scheduler = Scheduler(batch=config.batch, max_tokens=config.batch_max_tokens, metrics=self.metrics)
        for name in COUNTERS:  # present from the start at 0, so a scraper's rate() has a baseline
            self.metrics.inc(name, 0)
        self.sessions: dict[str, VerifySession] = {}
        self.rule_impl = resolve_rule(config.rule, engine.device)
        self.openings = PrefixStore(config.prefix_cache_bytes) if config.prefix_cache_bytes > 0 else None
        self.fill_timings = FillTimings()  # per device: a new session's bubbles timed from its last ones
        self.draining = False  # set by cloud.drain: refuse new sessions, /healthz answers 503
        self.admission = Admission(config.accepted_tokens, fingerprint, model_name,
                                   config.max_sessions, config.max_sessions_per_token)
        self._conns: set[Conn] = set()
        self.app = web.Application()
        self.app.router.add_get("/healthz", self.healthz)
        self.app.router.add_get("/metrics", self.metrics_route)
        self.app.router.add_get("/ws", self.websocket)
        self._runner: web.AppRunner | None = None
        self.port: int | None = None

    # -- lifecycle ---------------------------------------------------------------------------
    async def start(self) -> int:
        self._runner = web.AppRunner(self.app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.config.host, self.config.port,
                           ssl_context=server_ssl(self.config.tls_cert, self.config.tls_key))
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]
        return self.port

    async def stop(self) -> None:
        # close every session first: the runner would otherwise wait for their handlers to end
        closing = [conn.ws.close(code=1001, message=b"verifier shutting down") for conn in self._conns]
        if closing:  # an edge behind a stalled link never answers the close: do not wait for it
            await asyncio.wait([asyncio.ensure_future(c) for c in closing], timeout=2.0)
        if self._runner:
            await self._runner.cleanup()
        self.scheduler.close()

    @property
    def scheme(self) -> str:
        return "https" if self.config.tls_cert else "http"

    # -- plain routes ------------------------------------------------------------------------
    async def healthz(self, request: web.Request) -> web.Response:
        # 503 while draining: load balancers and readiness probes route new sessions elsewhere
        return web.json_response({
            "status": "draining" if self.draining else "ok", "model": self.model_name, "vocab_size": self.engine.vocab_size,
            "sessions": len(self.sessions), "protocol": list(codec.SUPPORTED_VERSIONS),
            "device": str(self.engine.device), "rule": self.rule_impl,
            "fingerprint": self.fingerprint,  # the tokenizer's (public): what a hello must match
        }, status=503 if self.draining else 200)

    async def metrics_route(self, request: web.Request) -> web.Response:
        m = self.metrics
        m.gauge("picospec_sessions", len(self.sessions))
        m.gauge("picospec_prefix_store_bytes", self.openings.nbytes if self.openings else 0)
        # what the sessions hold now: KV-cache positions (memory) and queued drafted tokens
        sessions = list(self.sessions.values())
        m.gauge("picospec_kv_cache_tokens", sum(s.engine.cache_len for s in sessions))
        m.gauge("picospec_queued_draft_entries", sum(s.queued_entries for s in sessions))
        for name, value in process_memory().items():
            m.gauge(name, value)
        return web.Response(text=m.render(), content_type="text/plain")

    # -- the protocol ------------------------------------------------------------------------
    async def websocket(self, request: web.Request) -> web.StreamResponse:
        cfg = self.config
        ws = WebSocket(max_msg_size=cfg.max_msg_size, heartbeat=30.0)
        conn = Conn(sid=uuid.uuid4().hex[:12], ws=ws, bucket=TokenBucket(cfg.msgs_per_s, cfg.msg_burst))
        try:
            await ws.prepare(request)
            await self._handshake(conn, request.remote or "?")
        except SessionError as err:
            await refuse(conn, err, self.metrics)
            self._release(conn)
            return ws
        except ConnectionError:  # gone before the session began (a client that gave up)
            self._release(conn)
            return ws
        self.metrics.inc("picospec_sessions_total")
        conn.log(logging.INFO, "opened", "session opened", peer=request.remote)
        work = WorkLoop(conn, self.scheduler, self.metrics, cfg,
                        may_fill=lambda: len(self.sessions) <= cfg.fill_max_sessions, openings=self.openings)
        worker = asyncio.create_task(work.run())
        self._conns.add(conn)
        try:
            await read_loop(conn, worker, cfg, self.metrics, self.engine.vocab_size)
        finally:
            self._conns.discard(conn)
            worker.cancel()
            await asyncio.gather(worker, return_exceptions=True)
            self._release(conn)
            s = conn.session
            self.metrics.observe("picospec_session_seconds", time.monotonic() - conn.opened)
            conn.log(logging.INFO, "closed", "session closed", passes=s.passes, drafted=s.drafted,
                     accepted=s.accepted)
        return ws

    async def _handshake(self, conn: Conn, peer: str) -> None:
        cfg = self.config
        try:
            msg = await conn.ws.receive(timeout=cfg.hello_timeout_s)
        except asyncio.TimeoutError:
            raise SessionError("timeout", f"no hello within {cfg.hello_timeout_s:g} s")
        if msg.type != WSMsgType.BINARY:
            raise SessionError("bad_frame", "expected a binary hello frame")
        conn.bucket.take()
        hello = decode_frame(msg.data, self.engine.vocab_size, cfg.max_msg_size)
        if not isinstance(hello, codec.Hello):
            raise SessionError("bad_message", f"expected hello, got {type(hello).__name__}")
        if self.draining:
            raise SessionError("draining", "this verifier is draining; connect to another replica")
        conn.quota_key, params = self.admission.admit(hello, peer, len(self.sessions))
        # no await between admit and taking the slot: concurrent hellos cannot overfill
        conn.session = VerifySession(self.engine.fork(), params, hello.variant, hello.paper_top_k,
                                     eos_id=self.eos_id, max_context=self._max_context(),
                                     max_queued_entries=cfg.max_queued_entries, rule_impl=self.rule_impl,
                                     fill_timing=self.fill_timings.of(conn.quota_key))
        self.sessions[conn.sid] = conn.session
        await send(conn, codec.Welcome(
            session_id=conn.sid, fingerprint=self.fingerprint, model=self.model_name,
            vocab_size=self.engine.vocab_size, server="picospec"), self.metrics)

    def _release(self, conn: Conn) -> None:
        """Forget a session: its slot, its quota, and its KV cache (now, not at GC time)."""
        if conn.session is not None and self.sessions.pop(conn.sid, None) is not None:
            conn.session.engine.reset()
        if conn.quota_key is not None:
            self.admission.release(conn.quota_key)
            conn.quota_key = None

    def _max_context(self) -> int:
        """The configured context limit, never past the positions the target was trained for."""
        trained = getattr(getattr(self.engine, "model", None), "config", None)
        trained = getattr(trained, "max_position_embeddings", None)
        return min(self.config.max_context, int(trained)) if trained else self.config.max_context


def ready_line(port: int, model: str, scheme: str = "http") -> str:
    """The line a parent process waits for before it connects."""
    return json.dumps({"event": "ready", "port": port, "model": model, "scheme": scheme, "time": time.time()})
