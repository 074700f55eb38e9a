"""The cloud verifier: an aiohttp server, one verify session per WebSocket connection.

Routes: GET /healthz (JSON), GET /metrics (Prometheus text), GET /ws (the PicoSpec protocol).
Forward passes run on one worker thread, off the event loop, so a session's I/O never waits on
another session's compute. Bad input closes only the session that sent it, with an Error message
that says what was wrong.
"""
from __future__ import annotations

import asyncio
import collections
import hmac
import json
import logging
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from aiohttp import WSMsgType, web

import codec
from cloud.metrics import Metrics
from cloud.session import Block, SessionError, VerifySession
from sampling import SamplingParams

log = logging.getLogger("picospec.cloud")


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8765
    token: str | None = None
    max_sessions: int = 64
    max_msg_size: int = codec.MAX_FRAME
    hello_timeout_s: float = 10.0
    idle_timeout_s: float = 300.0
    max_block: int = 16
    max_queued_msgs: int = 1024
    max_context: int = 32768


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
        self.sessions: dict[str, VerifySession] = {}
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
        site = web.TCPSite(self._runner, self.config.host, self.config.port)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]
        return self.port

    async def stop(self) -> None:
        if self._runner:
            await self._runner.cleanup()
        self.executor.shutdown(wait=False, cancel_futures=True)

    # -- plain routes ------------------------------------------------------------------------
    async def healthz(self, request: web.Request) -> web.Response:
        return web.json_response({
            "status": "ok", "model": self.model_name, "vocab_size": self.engine.vocab_size,
            "sessions": len(self.sessions), "protocol": list(codec.SUPPORTED_VERSIONS),
            "device": str(self.engine.device),
        })

    async def metrics_route(self, request: web.Request) -> web.Response:
        self.metrics.gauge("picospec_sessions", len(self.sessions))
        return web.Response(text=self.metrics.render(), content_type="text/plain")

    # -- the protocol ------------------------------------------------------------------------
    async def websocket(self, request: web.Request) -> web.StreamResponse:
        ws = web.WebSocketResponse(max_msg_size=self.config.max_msg_size, heartbeat=30.0)
        await ws.prepare(request)
        session_id = uuid.uuid4().hex[:12]
        try:
            session = await self._handshake(ws, session_id)
        except SessionError as err:
            await self._refuse(ws, session_id, err)
            return ws
        self.sessions[session_id] = session
        self.metrics.inc("picospec_sessions_total")
        log.info("session %s opened", session_id)
        ops: collections.deque = collections.deque()
        wake = asyncio.Event()
        worker = asyncio.create_task(self._work_loop(ws, session_id, session, ops, wake))
        try:
            await self._read_loop(ws, session_id, session, ops, wake, worker)
        finally:
            worker.cancel()
            await asyncio.gather(worker, return_exceptions=True)
            self.sessions.pop(session_id, None)
            session.engine.reset()  # frees this session's KV cache now, not at GC time
            log.info("session %s closed", session_id)
        return ws

    async def _handshake(self, ws: web.WebSocketResponse, session_id: str) -> VerifySession:
        try:
            msg = await ws.receive(timeout=self.config.hello_timeout_s)
        except asyncio.TimeoutError:
            raise SessionError("timeout", f"no hello within {self.config.hello_timeout_s:g} s")
        if msg.type != WSMsgType.BINARY:
            raise SessionError("bad_frame", "expected a binary hello frame")
        hello = self._decode(msg.data)
        if not isinstance(hello, codec.Hello):
            raise SessionError("bad_message", f"expected hello, got {type(hello).__name__}")
        if self.config.token is not None and not hmac.compare_digest(
                (hello.token or "").encode(), self.config.token.encode()):
            raise SessionError("unauthorized", "missing or wrong access token")
        if len(self.sessions) >= self.config.max_sessions:
            raise SessionError("overloaded", f"the verifier serves {self.config.max_sessions} sessions at most")
        ok, reason = compatible_fingerprints(hello.fingerprint, self.fingerprint)
        if not ok:
            raise SessionError("model_mismatch", f"the draft cannot work with target {self.model_name}: {reason}")
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
        session = VerifySession(self.engine.fork(), params, hello.variant, hello.paper_top_k,
                                eos_id=self.eos_id, max_context=self.config.max_context)
        await ws.send_bytes(codec.encode(codec.Welcome(
            session_id=session_id, fingerprint=self.fingerprint, model=self.model_name,
            vocab_size=self.engine.vocab_size, server="picospec")))
        return session

    def _decode(self, data: bytes):
        try:
            return codec.decode(data, vocab_size=self.engine.vocab_size)
        except codec.CodecError as err:
            raise SessionError(err.code, err.message)

    async def _refuse(self, ws: web.WebSocketResponse, session_id: str, err: SessionError) -> None:
        self.metrics.inc("picospec_errors_total", kind=err.code)
        log.warning("session %s refused: %s: %s", session_id, err.code, err.message)
        if not ws.closed:
            try:
                await ws.send_bytes(codec.encode(codec.Error(code=err.code, message=err.message)))
            except ConnectionError:
                pass
            await ws.close(code=1008 if err.code in ("unauthorized", "model_mismatch") else 1002,
                           message=err.code.encode()[:120])

    async def _read_loop(self, ws, session_id, session, ops, wake, worker) -> None:
        while not ws.closed:
            try:
                msg = await ws.receive(timeout=self.config.idle_timeout_s)
            except asyncio.TimeoutError:
                await self._refuse(ws, session_id, SessionError("timeout", "session idle too long"))
                return
            if msg.type in (WSMsgType.CLOSE, WSMsgType.CLOSING, WSMsgType.CLOSED):
                return
            if msg.type == WSMsgType.ERROR:
                err = ws.exception()
                code = "too_large" if "size" in str(err).lower() else "bad_frame"
                await self._refuse(ws, session_id, SessionError(code, f"websocket error: {err}"))
                return
            try:
                if msg.type != WSMsgType.BINARY:
                    raise SessionError("bad_frame", "PicoSpec frames are binary")
                self.metrics.inc("picospec_bytes_up_total", len(msg.data))
                op = self._decode(msg.data)
                if isinstance(op, codec.Close):
                    await ws.close()
                    return
                if len(ops) >= self.config.max_queued_msgs:
                    raise SessionError("overloaded", "too many messages queued; slow down")
            except SessionError as err:
                await self._refuse(ws, session_id, err)
                return
            ops.append(op)
            wake.set()
            if worker.done():
                return

    async def _work_loop(self, ws, session_id, session: VerifySession, ops, wake) -> None:
        loop = asyncio.get_running_loop()
        try:
            while True:
                while not ops:
                    wake.clear()
                    await wake.wait()
                op = ops.popleft()
                if isinstance(op, codec.Prompt):
                    seconds = await loop.run_in_executor(self.executor, session.set_prompt, op.ids,
                                                         op.max_new_tokens)
                    self.metrics.observe("picospec_prefill_seconds", seconds)
                    await self._send(ws, codec.Prefilled(committed_len=len(session.context),
                                                         epoch=session.epoch, prefill_s=seconds))
                elif isinstance(op, codec.Draft):
                    self._queue_draft(session, op)
                    await self._verify_queued(ws, session, ops, loop)
                elif isinstance(op, codec.Generate):
                    await self._generate(ws, session, op.max_new_tokens, loop)
                else:
                    raise SessionError("bad_message", f"unexpected {type(op).__name__} from the edge")
        except SessionError as err:
            await self._refuse(ws, session_id, err)
        except (ConnectionError, RuntimeError) as err:  # the edge went away mid-send
            log.info("session %s: connection lost: %s", session_id, err)

    def _queue_draft(self, session: VerifySession, op) -> None:
        block = Block(epoch=op.epoch, pos=op.pos, ids=list(op.ids[op.forced:]),
                      dists=list(op.dists[op.forced:]) if op.dists is not None else None,
                      q_scalar=list(op.q_scalar[op.forced:]) if op.q_scalar is not None else None,
                      forced=list(op.ids[:op.forced]), wait=op.wait, seq=op.seq)
        if not session.add_draft(block):
            self.metrics.inc("picospec_stale_drafts_total", len(op.ids))

    async def _verify_queued(self, ws, session: VerifySession, ops, loop) -> None:
        """Verify what is queued, pass after pass, merging drafts that arrive meanwhile."""
        while True:
            # drafts that arrived during the last pass join this one (stale ones are dropped)
            while ops and isinstance(ops[0], codec.Draft):
                self._queue_draft(session, ops.popleft())
            block = session.take_block(self.config.max_block)
            if block is None:
                return
            result = await loop.run_in_executor(self.executor, session.compute_pass, block)
            epoch = session.apply_pass(block, result)
            self.metrics.inc("picospec_verify_passes_total")
            self.metrics.inc("picospec_drafted_tokens_total", len(block.ids))
            self.metrics.inc("picospec_accepted_tokens_total", result.accepted)
            self.metrics.observe("picospec_verify_seconds", result.verify_s)
            await self._send(ws, codec.Verdict(
                epoch=block.epoch, pos=block.pos, accepted=result.accepted, token=result.token,
                kind=result.kind, new_epoch=epoch, verify_s=result.verify_s,
                top_ids=result.top_ids, top_probs=result.top_probs, seq=block.seq))

    async def _generate(self, ws, session: VerifySession, max_new_tokens: int, loop) -> None:
        """Cloud-only decoding: one target token per forward pass, streamed as it is committed."""
        if not session.prompt_len:
            raise SessionError("bad_message", "generate before any prompt")
        limit = min(max_new_tokens, session.max_context - len(session.context))
        for i in range(limit):
            token = await loop.run_in_executor(self.executor, session.next_target_token)
            done = token == session.eos_id or i == limit - 1
            await self._send(ws, codec.Tokens(pos=len(session.context) - 1, ids=[token], done=done))
            if done:
                return
        if limit <= 0:
            await self._send(ws, codec.Tokens(pos=len(session.context), ids=[], done=True))

    async def _send(self, ws: web.WebSocketResponse, msg) -> None:
        data = codec.encode(msg)
        self.metrics.inc("picospec_bytes_down_total", len(data))
        await ws.send_bytes(data)


def compatible_fingerprints(draft: dict, target: dict) -> tuple[bool, str]:
    """Whether a draft's tokenizer can work with the target's (see models.fingerprint)."""
    from models.fingerprint import Fingerprint, compatible

    try:
        return compatible(Fingerprint.from_dict(draft), Fingerprint.from_dict(target))
    except (KeyError, TypeError, ValueError) as err:
        return False, f"malformed tokenizer fingerprint: {err}"


def ready_line(port: int, model: str) -> str:
    """The line a parent process waits for before it connects."""
    return json.dumps({"event": "ready", "port": port, "model": model, "time": time.time()})
