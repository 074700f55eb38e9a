"""The cloud verifier: an aiohttp server, one verify session per WebSocket connection.

Routes: GET /healthz (JSON), GET /metrics (Prometheus text), GET /ws (the PicoSpec protocol).
Forward passes run on one worker thread, off the event loop, so a session's I/O never waits on
another session's compute. Bad input closes only the session that sent it, with an Error message
that says what was wrong.
"""
from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from aiohttp import WSMsgType, web

import codec
from cloud.connection import Conn, WebSocket, check_hello, server_ssl
from cloud.limits import SessionQuota, TokenBucket, op_cost
from cloud.metrics import Metrics, process_memory
from cloud.session import Block, SessionError, VerifySession

log = logging.getLogger("picospec.cloud")
COUNTERS = ("picospec_sessions_total", "picospec_verify_passes_total", "picospec_drafted_tokens_total",
            "picospec_accepted_tokens_total", "picospec_bytes_up_total", "picospec_bytes_down_total",
            "picospec_messages_up_total", "picospec_messages_down_total", "picospec_evictions_total",
            "picospec_rate_limited_total", "picospec_connections_lost_total", "picospec_prefill_tokens_total",
            "picospec_generated_tokens_total", "picospec_stale_drafts_total")
PREFILL_CHUNK = 512  # prompt tokens per forward pass; other sessions' passes run between chunks


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
    # fill bubbles with the cloud's own target tokens only while the verifier is this lightly
    # shared: with many sessions, idle time of one is another's verify time
    fill_max_sessions: int = 2
    max_queued_msgs: int = 256
    max_queued_cost: int = 1 << 18  # ids held by a connection's decoded, not yet handled messages
    max_queued_entries: int = 1 << 21  # drafted ids + distribution entries awaiting a pass
    max_context: int = 32768
    tls_cert: str | None = None
    tls_key: str | None = None

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
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="verify")
        self.metrics = Metrics()
        for name in COUNTERS:  # present from the start at 0, so a scraper's rate() has a baseline
            self.metrics.inc(name, 0)
        self.sessions: dict[str, VerifySession] = {}
        self.quota = SessionQuota(config.max_sessions_per_token)
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
        self.executor.shutdown(wait=False, cancel_futures=True)

    # -- plain routes ------------------------------------------------------------------------
    async def healthz(self, request: web.Request) -> web.Response:
        return web.json_response({
            "status": "ok", "model": self.model_name, "vocab_size": self.engine.vocab_size,
            "sessions": len(self.sessions), "protocol": list(codec.SUPPORTED_VERSIONS),
            "device": str(self.engine.device),
            "fingerprint": self.fingerprint,  # the tokenizer's (public): what a hello must match
        })

    @property
    def scheme(self) -> str:
        return "https" if self.config.tls_cert else "http"

    async def metrics_route(self, request: web.Request) -> web.Response:
        m = self.metrics
        m.gauge("picospec_sessions", len(self.sessions))
        # what the sessions hold now: KV-cache positions (memory) and queued drafted tokens
        m.gauge("picospec_kv_cache_tokens", sum(s.engine.cache_len for s in list(self.sessions.values())))
        m.gauge("picospec_queued_draft_entries", sum(s.queued_entries for s in list(self.sessions.values())))
        for name, value in process_memory().items():
            m.gauge(name, value)
        return web.Response(text=m.render(), content_type="text/plain")

    # -- the protocol ------------------------------------------------------------------------
    async def websocket(self, request: web.Request) -> web.StreamResponse:
        ws = WebSocket(max_msg_size=self.config.max_msg_size, heartbeat=30.0)
        conn = Conn(sid=uuid.uuid4().hex[:12], ws=ws,
                    bucket=TokenBucket(self.config.msgs_per_s, self.config.msg_burst))
        try:
            await ws.prepare(request)
            await self._handshake(conn, request.remote or "?")
        except SessionError as err:
            await self._refuse(conn, err)
            self._release(conn)
            return ws
        except ConnectionError:  # gone before the session began (a client that gave up)
            self._release(conn)
            return ws
        self.metrics.inc("picospec_sessions_total")
        self._log(logging.INFO, conn, "opened", "session opened", peer=request.remote)
        worker = asyncio.create_task(self._work_loop(conn))
        self._conns.add(conn)
        try:
            await self._read_loop(conn, worker)
        finally:
            self._conns.discard(conn)
            worker.cancel()
            await asyncio.gather(worker, return_exceptions=True)
            self._release(conn)
            s = conn.session
            self.metrics.observe("picospec_session_seconds", time.monotonic() - conn.opened)
            self._log(logging.INFO, conn, "closed", "session closed", passes=s.passes,
                      drafted=s.drafted, accepted=s.accepted)
        return ws

    def _release(self, conn: Conn) -> None:
        """Forget a session: its slot, its quota, and its KV cache (now, not at GC time)."""
        if conn.session is not None and self.sessions.pop(conn.sid, None) is not None:
            conn.session.engine.reset()
        if conn.quota_key is not None:
            self.quota.release(conn.quota_key)
            conn.quota_key = None

    async def _handshake(self, conn: Conn, peer: str) -> None:
        cfg = self.config
        try:
            msg = await conn.ws.receive(timeout=cfg.hello_timeout_s)
        except asyncio.TimeoutError:
            raise SessionError("timeout", f"no hello within {cfg.hello_timeout_s:g} s")
        if msg.type != WSMsgType.BINARY:
            raise SessionError("bad_frame", "expected a binary hello frame")
        conn.bucket.take()
        hello = self._decode(msg.data)
        if not isinstance(hello, codec.Hello):
            raise SessionError("bad_message", f"expected hello, got {type(hello).__name__}")
        which, params = check_hello(hello, cfg.accepted_tokens, self.fingerprint, self.model_name)
        if len(self.sessions) >= cfg.max_sessions:
            raise SessionError("overloaded", f"the verifier serves {cfg.max_sessions} sessions at most")
        # one credential's sessions are capped so that it cannot take every slot
        key = f"token#{which}" if which is not None else f"peer:{peer}"
        if not self.quota.acquire(key):
            raise SessionError("overloaded", f"{cfg.max_sessions_per_token} concurrent sessions per "
                                             f"{'token' if which is not None else 'address'} at most")
        conn.quota_key = key
        # no await between the checks above and taking the slot: concurrent hellos cannot overfill
        conn.session = VerifySession(self.engine.fork(), params, hello.variant, hello.paper_top_k,
                                     eos_id=self.eos_id, max_context=self._max_context(),
                                     max_queued_entries=cfg.max_queued_entries)
        self.sessions[conn.sid] = conn.session
        await self._send(conn, codec.Welcome(
            session_id=conn.sid, fingerprint=self.fingerprint, model=self.model_name,
            vocab_size=self.engine.vocab_size, server="picospec"))

    def _max_context(self) -> int:
        """The configured context limit, never past the positions the target was trained for."""
        trained = getattr(getattr(self.engine, "model", None), "config", None)
        trained = getattr(trained, "max_position_embeddings", None)
        return min(self.config.max_context, int(trained)) if trained else self.config.max_context

    def _decode(self, data: bytes):
        try:
            return codec.decode(data, vocab_size=self.engine.vocab_size,
                                max_frame=self.config.max_msg_size)
        except codec.CodecError as err:
            raise SessionError(err.code, err.message)

    async def _refuse(self, conn: Conn, err: SessionError) -> None:
        """Say why (an Error message with its code), then close: the other sessions carry on."""
        self.metrics.inc("picospec_errors_total", kind=err.code)
        self._log(logging.WARNING, conn, "refused", f"refused: {err.code}: {err.message}", code=err.code)
        ws = conn.ws
        if not ws.closed:
            try:
                await ws.send_bytes(codec.encode(codec.Error(code=err.code, message=err.message[:codec.MAX_STR])))
            except (ConnectionError, RuntimeError):
                pass
            await ws.close(code=1008 if err.code in ("unauthorized", "model_mismatch", "rate_limited") else 1002,
                           message=err.code.encode()[:120])

    async def _read_loop(self, conn: Conn, worker: asyncio.Task) -> None:
        cfg, ws = self.config, conn.ws
        while not ws.closed:
            now = time.monotonic()
            try:
                msg = await ws.receive(timeout=max(0.05, conn.last_active + cfg.idle_timeout_s - now))
            except asyncio.TimeoutError:
                # idle means neither side did anything: an edge waiting on a long pass is not idle
                if conn.busy or conn.ops:
                    conn.last_active = time.monotonic()
                elif time.monotonic() - conn.last_active >= cfg.idle_timeout_s:
                    self.metrics.inc("picospec_evictions_total")
                    await self._refuse(conn, SessionError(
                        "idle_timeout", f"session idle for {cfg.idle_timeout_s:g} s; reconnect to resume"))
                    return
                continue
            if msg.type in (WSMsgType.CLOSE, WSMsgType.CLOSING, WSMsgType.CLOSED):
                return
            if msg.type == WSMsgType.ERROR:
                await self._on_ws_error(conn)
                return
            conn.last_active = time.monotonic()
            try:
                if not conn.bucket.take():
                    self.metrics.inc("picospec_rate_limited_total")
                    raise SessionError("rate_limited", f"more than {cfg.msgs_per_s:g} messages a second "
                                                       f"(burst {cfg.msg_burst:g})")
                if msg.type != WSMsgType.BINARY:
                    raise SessionError("bad_frame", "PicoSpec frames are binary")
                self.metrics.inc("picospec_bytes_up_total", len(msg.data))
                self.metrics.inc("picospec_messages_up_total")
                op = self._decode(msg.data)
                if isinstance(op, codec.Close):
                    await ws.close()
                    return
                if len(conn.ops) >= cfg.max_queued_msgs or conn.cost + op_cost(op) > cfg.max_queued_cost:
                    raise SessionError("overloaded", "too many messages queued; wait for the replies")
            except SessionError as err:
                await self._refuse(conn, err)
                return
            conn.push(op)
            if worker.done():
                return

    async def _on_ws_error(self, conn: Conn) -> None:
        err = conn.ws.exception()
        text = str(err).lower()
        if isinstance(err, asyncio.TimeoutError) or "pong" in text:  # a dead link: nobody to tell
            self.metrics.inc("picospec_connections_lost_total")
            self._log(logging.INFO, conn, "lost", f"connection lost: {err}")
            return
        code = "too_large" if "size" in text or getattr(err, "code", None) == 1009 else "bad_frame"
        await self._refuse(conn, SessionError(code, f"websocket error: {err}"))

    async def _work_loop(self, conn: Conn) -> None:
        loop = asyncio.get_running_loop()
        session = conn.session
        try:
            while True:
                while not conn.ops:
                    if session is not None and session.can_fill():
                        await self._fill_one(conn, loop)
                        continue
                    conn.wake.clear()
                    await conn.wake.wait()
                op = conn.pop()
                conn.busy = True
                if isinstance(op, codec.Prompt):
                    await self._prefill(conn, op, loop)
                elif isinstance(op, codec.Draft):
                    self._queue_draft(session, op)
                    await self._verify_queued(conn, loop)
                elif isinstance(op, codec.Generate):
                    await self._generate(conn, op.max_new_tokens, loop)
                else:
                    raise SessionError("bad_message", f"unexpected {type(op).__name__} from the edge")
                conn.busy = False
                conn.last_active = time.monotonic()
        except SessionError as err:
            await self._refuse(conn, err)
        except (ConnectionError, RuntimeError) as err:  # the edge went away mid-send
            self._log(logging.INFO, conn, "lost", f"connection lost: {err}")
        except Exception as err:  # a bug here must cost this session only, and say so
            log.exception("session %s: internal error", conn.sid, extra={"session": conn.sid})
            await self._refuse(conn, SessionError("internal", f"the verifier failed: {type(err).__name__}"))

    async def _prefill(self, conn: Conn, op, loop) -> None:
        """Prompt -> Prefilled, one executor job per chunk so a long prompt shares the worker."""
        session = conn.session
        t0 = time.perf_counter()
        rest = session.begin_prompt(op.ids, op.max_new_tokens)
        last = None
        for start in range(0, len(rest), PREFILL_CHUNK):
            rows = await loop.run_in_executor(self.executor, session.engine.forward,
                                              rest[start:start + PREFILL_CHUNK])
            last = rows[-1]
        session.end_prompt(op.ids, op.max_new_tokens, last,
                           fill=op.fill and len(self.sessions) <= self.config.fill_max_sessions)
        seconds = time.perf_counter() - t0
        self.metrics.observe("picospec_prefill_seconds", seconds)
        self.metrics.inc("picospec_prefill_tokens_total", len(rest))
        await self._send(conn, codec.Prefilled(committed_len=len(session.context), epoch=session.epoch,
                                               prefill_s=seconds))

    def _queue_draft(self, session: VerifySession, op) -> None:
        block = Block(epoch=op.epoch, pos=op.pos, ids=list(op.ids[op.forced:]),
                      dists=list(op.dists[op.forced:]) if op.dists is not None else None,
                      q_scalar=list(op.q_scalar[op.forced:]) if op.q_scalar is not None else None,
                      forced=list(op.ids[:op.forced]), wait=op.wait, seq=op.seq)
        if not session.add_draft(block):
            self.metrics.inc("picospec_stale_drafts_total", len(op.ids))

    async def _verify_queued(self, conn: Conn, loop) -> None:
        """Verify what is queued, pass after pass, merging drafts that arrive meanwhile."""
        session = conn.session
        while True:
            # drafts that arrived during the last pass join this one (stale ones are dropped)
            while conn.ops and isinstance(conn.ops[0], codec.Draft):
                self._queue_draft(session, conn.pop())
            block = session.take_block(self.config.max_block)
            if block is None:
                return
            submitted = time.perf_counter()
            result = await loop.run_in_executor(self.executor, session.compute_pass, block)
            epoch = session.apply_pass(block, result)
            m = self.metrics
            m.inc("picospec_verify_passes_total")
            m.inc("picospec_drafted_tokens_total", len(block.ids))
            m.inc("picospec_accepted_tokens_total", result.accepted)
            m.observe("picospec_verify_seconds", result.verify_s)
            # time the pass waited behind other sessions' work on the one worker
            m.observe("picospec_verify_wait_seconds",
                      max(0.0, time.perf_counter() - submitted - result.verify_s))
            await self._send(conn, codec.Verdict(
                epoch=block.epoch, pos=block.pos, accepted=result.accepted, token=result.token,
                kind=result.kind, new_epoch=epoch, verify_s=result.verify_s,
                top_ids=result.top_ids, top_probs=result.top_probs, seq=block.seq))

    async def _fill_one(self, conn: Conn, loop) -> None:
        """One target token of the cloud's own while the edge drafts after a correction (exact:
        sampled from p). If a draft arrives during the forward pass, its row verifies that draft
        instead and nothing is sampled."""
        session = conn.session
        await loop.run_in_executor(self.executor, session.prepare_fill)
        if conn.ops or not session.can_fill():
            return
        token = session.commit_fill()
        self.metrics.inc("picospec_filled_tokens_total")
        await self._send(conn, codec.Tokens(pos=len(session.context) - 1, ids=[token], done=False))

    async def _generate(self, conn: Conn, max_new_tokens: int, loop) -> None:
        """Cloud-only decoding: one target token per forward pass, streamed as it is committed."""
        session = conn.session
        if not session.prompt_len:
            raise SessionError("bad_message", "generate before any prompt")
        limit = min(max_new_tokens, session.max_context - len(session.context))
        for i in range(limit):
            token = await loop.run_in_executor(self.executor, session.next_target_token)
            self.metrics.inc("picospec_generated_tokens_total")
            done = token == session.eos_id or i == limit - 1
            await self._send(conn, codec.Tokens(pos=len(session.context) - 1, ids=[token], done=done))
            if done:
                return
        if limit <= 0:
            await self._send(conn, codec.Tokens(pos=len(session.context), ids=[], done=True))

    async def _send(self, conn: Conn, msg) -> None:
        data = codec.encode(msg)
        self.metrics.inc("picospec_bytes_down_total", len(data))
        self.metrics.inc("picospec_messages_down_total")
        await conn.ws.send_bytes(data)
        conn.last_active = time.monotonic()

    def _log(self, level: int, conn: Conn, event: str, text: str, **fields) -> None:
        log.log(level, "session %s %s", conn.sid, text, extra={"session": conn.sid, "event": event, **fields})


def ready_line(port: int, model: str, scheme: str = "http") -> str:
    """The line a parent process waits for before it connects."""
    return json.dumps({"event": "ready", "port": port, "model": model, "scheme": scheme, "time": time.time()})
