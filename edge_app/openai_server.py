"""`picospec edge-serve`: an OpenAI-compatible HTTP endpoint on the edge device.

GET /v1/models, POST /v1/chat/completions (chat template), POST /v1/completions (raw prompt text),
streaming (server-sent events in OpenAI's chunk shapes) or not. Every answer carries `usage` and a
`picospec` object with our stats (mode, acceptance, tokens/s, bytes, target_quality).

Choices made here:
- The cloud unreachable -> HTTP 503 (type "server_error", code "cloud_unreachable"), after the
  client's usual reconnect attempts: a program never gets draft-quality text it did not ask for.
  A request may ask for it with {"picospec": {"mode": "edge"}}; `--edge-fallback` lets answers go on
  from the draft alone while the cloud is away. Either way such an answer says
  picospec.target_quality = false (and picospec.edge_only_tokens how many tokens were draft-only).
- temperature defaults to the server's --temperature (0 = greedy), not OpenAI's 1.0: an edge
  endpoint is usually wanted deterministic. Any `model` name is accepted (clients hard-code them).
- One generation at a time on the drafter (an asyncio.Lock); other requests queue.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import sys
import time
import uuid
from dataclasses import dataclass, replace

from aiohttp import web

from edge_app.args import add_edge_arguments, add_sampling_arguments, edge_config_kwargs, generate_options
from edge_app.openai_protocol import Request, RequestError, parse_request
from edge_app.repl import drop_session, start_client
from edge_app.stats import merge_stats
from edge_app.textstream import TextStream

log = logging.getLogger("picospec.edge_serve")


def register(sub) -> None:
    p = sub.add_parser("edge-serve", help="serve an OpenAI-compatible API from this edge device")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (0 picks a free one; default 8000)")
    p.add_argument("--model-name", default="picospec", help="the model id /v1/models lists")
    p.add_argument("--edge-fallback", action="store_true", help="while the cloud is away, answer from the "
                   "draft alone (marked picospec.target_quality=false) instead of HTTP 503")
    add_sampling_arguments(p)
    add_edge_arguments(p)
    p.set_defaults(func=run, max_new_tokens=256)


@dataclass
class Completion:
    text: str
    tokens: int
    finish_reason: str
    stats: dict


class StopWatcher:
    """The on_commit callback of one completion: emits safe text deltas, cuts at a stop string."""

    def __init__(self, decode, stop_ids, stops: tuple[str, ...], emit=None):
        self.stream = TextStream(decode, stops)
        self.stop_ids, self.emit = set(stop_ids), emit
        self.task: asyncio.Task | None = None
        self.first_s: float | None = None

    @property
    def stopped(self) -> bool:
        return self.stream.stopped

    @property
    def text(self) -> str:
        return self.stream.text

    def __call__(self, new_ids: list[int], speculative: list[int]) -> None:
        if self.stopped:
            self._cancel()
            return
        if self.first_s is None and new_ids:
            self.first_s = time.perf_counter()
        self._send(self.stream.feed(new_ids))
        if self.stopped:
            self._cancel()  # enough: the rest of the answer would be cut anyway

    def _cancel(self) -> None:
        if self.task is not None and not self.task.done():
            self.task.cancel()
            # Python 3.11's wait_for swallows a cancel that races a reply: insist until it ends
            asyncio.get_running_loop().call_later(0.25, self._cancel)

    def flush(self) -> None:
        self._send(self.stream.finish())

    def _send(self, delta: str) -> None:
        if delta and self.emit is not None:
            self.emit(delta)

    def tokens(self) -> int:
        return sum(1 for t in self.stream.ids if t not in self.stop_ids)


async def complete(client, ids: list[int], options, stops: tuple[str, ...], emit=None) -> Completion:
    """One completion with stop strings; emit(text) streams it. Raises CloudError."""
    from edge_app.pipeline import GenerationStats

    watcher = StopWatcher(client.decode, client.stop_ids, stops, emit)
    t0 = time.perf_counter()
    watcher.task = asyncio.ensure_future(client.generate_ids(ids, options, watcher))
    try:
        answer = await watcher.task
    except asyncio.CancelledError:
        if not watcher.stopped:
            await drop_session(client)
            raise
        answer = None
    watcher.flush()
    if answer is not None:
        reason = "stop" if watcher.stopped else answer.finish_reason
        return Completion(watcher.text, watcher.tokens(), reason, answer.stats.to_dict())
    # stopped by a stop string: the cancelled pipeline left no stats; what we measured ourselves
    await drop_session(client)  # the verifier may still be busy with the abandoned answer
    stats = GenerationStats(mode=options.mode, wall_s=time.perf_counter() - t0, new_tokens=watcher.tokens(),
                            ttft_s=watcher.first_s - t0 if watcher.first_s else None)
    return Completion(watcher.text, watcher.tokens(), "stop", {**stats.to_dict(), "partial": True})


# -- the HTTP app ----------------------------------------------------------------------------
def _error(err: RequestError) -> web.Response:
    return web.json_response(err.body(), status=err.status)


def cloud_error(err) -> RequestError:
    from edge_app.pipeline import RETRYABLE

    if err.code in RETRYABLE:
        return RequestError(f"the cloud verifier is unreachable: {err.message}", None, "cloud_unreachable",
                            503, "server_error")
    return RequestError(f"the cloud verifier refused: {err.message}", None, err.code, 502, "server_error")


@web.middleware
async def openai_errors(request: web.Request, handler):
    """Every error as OpenAI's JSON shape, 404 and 405 included."""
    try:
        return await handler(request)
    except RequestError as err:
        return _error(err)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        kind = "not_found_error" if exc.status == 404 else "invalid_request_error"
        return _error(RequestError(f"{request.method} {request.path}: {exc.reason}", None, None, exc.status, kind))
    except Exception as err:  # a bug of ours: still an OpenAI-shaped answer, and a traceback in the log
        log.exception("request failed")
        return _error(RequestError(f"internal error: {type(err).__name__}: {err}", None, None, 500, "server_error"))


class EdgeServer:
    def __init__(self, client, defaults, model_name: str = "picospec"):
        self.client, self.defaults, self.model_name = client, defaults, model_name
        self.lock = asyncio.Lock()
        self.app = web.Application(middlewares=[openai_errors])
        self.app.router.add_get("/v1/models", self.models)
        self.app.router.add_post("/v1/chat/completions", self.chat)
        self.app.router.add_post("/v1/completions", self.completions)
        self.app.router.add_get("/health", self.health)

    async def health(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok", "draft": self.client.draft_name, "cloud": self.client.cloud_url})

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{
            "id": self.model_name, "object": "model", "created": int(time.time()), "owned_by": "picospec",
            "picospec": {"draft": self.client.draft_name, "cloud": self.client.cloud_url}}]})

    async def chat(self, request: web.Request) -> web.StreamResponse:
        return await self._handle(request, chat=True)

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._handle(request, chat=False)

    async def _handle(self, request: web.Request, chat: bool) -> web.StreamResponse:
        try:
            body = await request.json()
        except ValueError as err:
            raise RequestError(f"the body is not valid JSON: {err}", None, "invalid_json")
        req = parse_request(body, chat, self.defaults)
        if chat:
            ids = self.client.encode_chat(req.messages)
        else:
            ids = req.prompt if isinstance(req.prompt, list) else self.client.encode_prompt(req.prompt, raw=True)
            if max(ids) >= self.client.drafter.n_vocab:
                raise RequestError(f"token ids must be below {self.client.drafter.n_vocab}", "prompt", "invalid_value")
        n_ctx = self.client.drafter.n_ctx
        if len(ids) + req.max_tokens > n_ctx:
            raise RequestError(f"{len(ids)} prompt tokens + max_tokens {req.max_tokens} exceed the context of "
                               f"{n_ctx} tokens", "messages" if chat else "prompt", "context_length_exceeded")
        async with self.lock:
            if req.stream:
                return await self._stream(request, req, ids, chat)
            return web.json_response(await self._whole(req, ids, chat))

    def _options(self, req: Request, i: int = 0):
        from sampling import SamplingParams

        seed = None if req.seed is None else req.seed + i
        params = SamplingParams(req.temperature, req.top_p, req.top_k, seed).validate()
        return replace(self.defaults, max_new_tokens=req.max_tokens, params=params, mode=req.mode)

    def _picospec(self, stats: list[dict], mode: str) -> dict:
        edge_only = sum(s.get("edge_only_tokens", 0) for s in stats)
        # partial: an answer cut by a stop string was cancelled, so its pipeline counts are missing
        return {**merge_stats(stats), "mode": mode, "edge_only_tokens": edge_only,
                "partial": any(s.get("partial", False) for s in stats),
                "target_quality": mode != "edge" and edge_only == 0,
                "draft": self.client.draft_name, "cloud": self.client.cloud_url}

    def _head(self, chat: bool, chunk: bool = False) -> dict:
        kind = ("chat.completion.chunk" if chunk else "chat.completion") if chat else "text_completion"
        return {"id": ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24], "object": kind,
                "created": int(time.time()), "model": self.model_name}

    async def _whole(self, req: Request, ids: list[int], chat: bool) -> dict:
        from edge_app.link import CloudError

        done = []
        for i in range(req.n):
            try:
                done.append(await complete(self.client, ids, self._options(req, i), req.stop))
            except CloudError as err:
                await drop_session(self.client)
                raise cloud_error(err)
        choices = [{"index": i, "finish_reason": c.finish_reason, "logprobs": None,
                    **({"message": {"role": "assistant", "content": c.text}} if chat else {"text": c.text})}
                   for i, c in enumerate(done)]
        completion_tokens = sum(c.tokens for c in done)
        return {**self._head(chat), "choices": choices,
                "usage": {"prompt_tokens": len(ids), "completion_tokens": completion_tokens,
                          "total_tokens": len(ids) + completion_tokens},
                "picospec": self._picospec([c.stats for c in done], req.mode)}

    async def _stream(self, request: web.Request, req: Request, ids: list[int], chat: bool) -> web.StreamResponse:
        """SSE: a role chunk (chat), text chunks as they are committed, a finish chunk, [DONE].
        Errors before the first text are plain HTTP errors; after it, an error event."""
        from edge_app.link import CloudError

        head = self._head(chat, chunk=True)
        queue: asyncio.Queue = asyncio.Queue()
        gen = asyncio.ensure_future(complete(self.client, ids, self._options(req), req.stop, queue.put_nowait))
        gen.add_done_callback(lambda _: queue.put_nowait(None))
        delta = await queue.get()
        if delta is None and gen.exception() is not None:  # failed before any text: a plain HTTP error
            if not isinstance(gen.exception(), CloudError):
                raise gen.exception()
            await drop_session(self.client)
            return _error(cloud_error(gen.exception()))

        def chunk(text: str | None, finish: str | None = None, **extra) -> dict:
            choice = {"index": 0, "finish_reason": finish, "logprobs": None}
            if chat:
                choice["delta"] = {} if text is None else {"content": text}
            else:
                choice["text"] = text or ""
            return {**head, "choices": [choice], **extra}

        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await resp.prepare(request)
        send = lambda obj: resp.write(f"data: {json.dumps(obj)}\n\n".encode())  # noqa: E731
        try:
            if chat:
                first = chunk(None)
                first["choices"][0]["delta"] = {"role": "assistant", "content": ""}
                await send(first)
            while delta is not None:
                await send(chunk(delta))
                delta = await queue.get()
            try:
                result: Completion = gen.result()
            except CloudError as err:
                await drop_session(self.client)
                await send(cloud_error(err).body())
            except Exception as err:  # headers are gone: the error travels as an event
                log.exception("generation failed mid-stream")
                await send(RequestError(f"internal error: {err}", None, None, 500, "server_error").body())
            else:
                await send(chunk(None, result.finish_reason, picospec=self._picospec([result.stats], req.mode)))
                if req.include_usage:
                    await send({**head, "choices": [], "usage": {
                        "prompt_tokens": len(ids), "completion_tokens": result.tokens,
                        "total_tokens": len(ids) + result.tokens}})
            await resp.write(b"data: [DONE]\n\n")
        except ConnectionError:  # the client went away: stop generating for it
            log.info("client disconnected mid-stream")
        finally:
            if not gen.done():
                gen.cancel()
                await asyncio.gather(gen, return_exceptions=True)
        return resp


# -- the command -----------------------------------------------------------------------------
async def warm_up(client, defaults) -> str | None:
    """One short answer: loads both sides' caches and tells whether the cloud answers."""
    from edge_app.link import CloudError

    try:
        answer = await client.generate_ids(client.encode_chat([{"role": "user", "content": "Hi"}]),
                                           replace(defaults, max_new_tokens=2), None)
    except CloudError as err:
        await drop_session(client)
        return err.message
    return "no verifier session" if answer.stats.edge_only_tokens else None


async def serve(args, defaults) -> int:
    from edge_app.client import EdgeClient, EdgeConfig

    # an API answers 503 rather than draft text nobody asked for, unless --edge-fallback
    client = EdgeClient(EdgeConfig(**{**edge_config_kwargs(args), "edge_fallback": args.edge_fallback}))
    try:
        await start_client(client)
        if defaults.mode != "edge" and (problem := await warm_up(client, defaults)):
            print(f"picospec edge-serve: warning: the cloud verifier is unreachable ({problem}); "
                  + ("answers come from the draft alone" if args.edge_fallback else "requests get HTTP 503")
                  + " until it answers", file=sys.stderr, flush=True)
        server = EdgeServer(client, defaults, args.model_name)
        runner = web.AppRunner(server.app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, args.host, args.port)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]
        print(f"picospec edge-serve: listening on http://{args.host}:{port}/v1 (draft {client.draft_name}, "
              f"verifier {client.cloud_url}, mode {defaults.mode})", flush=True)
        stop = asyncio.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            asyncio.get_running_loop().add_signal_handler(sig, stop.set)
        await stop.wait()
        await runner.cleanup()
    finally:
        await drop_session(client)
        await client.close()
    return 0


def run(args) -> int:
    from models.errors import ModelError

    logging.basicConfig(level=os.environ.get("PICOSPEC_LOG", "WARNING"), stream=sys.stderr)
    try:
        return asyncio.run(serve(args, generate_options(args)))
    except (ValueError, ModelError) as err:
        print(f"picospec edge-serve: {err}", file=sys.stderr)
        return 2
