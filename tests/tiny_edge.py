"""Helpers for fault, security and fuzz tests over the tiny models.

  tiny_client      an EdgeClient whose drafter is a TinyDrafter (no GGUF), notices recorded
  Commits          an on_commit that records what streamed and fires a fault at the k-th token
  Verifier         a ServerThread that can be stopped and started again on the same port
  HealthySession   a session answering over and over in the background: the "other edge" that
                   must keep working while a hostile one is refused
  raw_session      a bare WebSocket client that sends whatever frames a test likes
"""
from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import replace
from typing import Callable

import aiohttp

import codec
from cloud.engine import TargetEngine, greedy_reference
from cloud.server import ServerConfig
from edge_app.client import EdgeClient, EdgeConfig
from edge_app.link import CloudLink
from edge_app.pipeline import GenerateOptions, Pipeline
from tests.tiny import ServerThread, TinyDrafter, fingerprint, perturbed

NO_STOP = (-1,)  # an answer that runs to its length: long enough to break in the middle


def tiny_client(url: str, drafter, **config) -> EdgeClient:
    """An EdgeClient over `drafter` (not started: it has nothing to load)."""
    client = EdgeClient(EdgeConfig(cloud=url, **config))
    client.drafter, client.fingerprint, client.stop_ids = drafter, fingerprint(), NO_STOP
    client.notices = []
    client.on_notice = client.notices.append
    return client


def reference(model, prompt: list[int], n: int) -> list[int]:
    """The model alone, greedy, to n tokens (no stop token)."""
    return greedy_reference(TargetEngine(model), prompt, n, None)[0]


class Commits:
    """on_commit: records the streamed ids; starts fault() once when `at` ids have streamed, on a
    thread of its own (the edge's loop must stay free to see the fault happen)."""

    def __init__(self, at: int | None = None, fault: Callable[[], None] | None = None):
        self.ids: list[int] = []
        self.at, self.fault = at, fault
        self.fired_at: int | None = None

    def __call__(self, new: list[int], speculative: list[int]) -> None:
        self.ids += new
        if self.at is not None and self.fired_at is None and len(self.ids) >= self.at:
            self.fired_at = len(self.ids)
            self.thread = threading.Thread(target=self.fault, daemon=True)
            self.thread.start()


class Verifier:
    """A tiny verifier that can die and come back on the same port (a restart, a crash)."""

    def __init__(self, engine, config: ServerConfig | None = None):
        self.engine, self.config = engine, config or ServerConfig(port=0)
        self.thread: ServerThread | None = None
        self.port = self.config.port
        self.starts = 0

    def start(self) -> "Verifier":
        self.thread = ServerThread(self.engine, replace(self.config, port=self.port)).__enter__()
        self.port = self.thread.port
        self.starts += 1
        return self

    def stop(self) -> None:
        if self.thread is not None:
            self.thread.__exit__(None, None, None)
            self.thread = None

    def restart(self, down_s: float) -> None:
        """Stop, stay down for down_s (the edge sees refusals), start again on the same port."""
        self.stop()
        time.sleep(down_s)
        self.start()

    @property
    def server(self):
        return self.thread.server

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    def __enter__(self) -> "Verifier":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


async def open_link(url: str, **hello) -> CloudLink:
    link = CloudLink(url, reply_timeout_s=30)
    await link.connect(codec.Hello(fingerprint=hello.pop("fp", fingerprint()), sampling={
        "temperature": 0.0, "top_p": 1.0, "top_k": 0, "seed": None}, **hello))
    return link


class HealthySession:
    """Answers PROMPT again and again on one session from a background thread, checking each one
    against the target; `check()` says whether it kept working the whole time."""

    def __init__(self, url: str, target, prompt: list[int] = (5, 9, 11), n: int = 12, pause_s: float = 0.01):
        self.url, self.prompt, self.n, self.pause_s = url, list(prompt), n, pause_s
        self.expected = reference(target, self.prompt, n)
        self.drafter = TinyDrafter(perturbed(target, 1.0))
        self.answers = 0
        self.wrong: list[list[int]] = []
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)

    async def _run(self) -> None:
        try:
            link = await open_link(self.url)
            while not self._stop.is_set():
                p = Pipeline(self.drafter, link, GenerateOptions(max_new_tokens=self.n, block=3,
                                                                  stop_ids=NO_STOP))
                ans = await p.run(self.prompt)
                self.answers += 1
                if ans.token_ids != self.expected:
                    self.wrong.append(ans.token_ids)
                await asyncio.sleep(self.pause_s)
            await link.close()
        except BaseException as err:  # reported by check()
            self.error = err

    def __enter__(self) -> "HealthySession":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(30)

    def check(self, min_answers: int = 1) -> None:
        assert self.error is None, f"the healthy session failed: {self.error!r}"
        assert not self.wrong, f"the healthy session got wrong answers: {self.wrong[:1]}"
        assert self.answers >= min_answers, f"the healthy session answered only {self.answers} times"


async def raw_session(url: str, frames: list, hello: bytes | None = None, wait_s: float = 5.0,
                      **ws_kw) -> list:
    """Send `hello` (if any) then `frames` (bytes, or str for a text frame) on a bare WebSocket;
    return the decoded messages received until the server closes (or wait_s passes)."""
    got: list = []
    async with aiohttp.ClientSession() as http:
        async with http.ws_connect(url, max_msg_size=codec.MAX_FRAME * 2, **ws_kw) as ws:
            for frame in ([hello] if hello is not None else []) + list(frames):
                try:
                    await (ws.send_str(frame) if isinstance(frame, str) else ws.send_bytes(frame))
                except (ConnectionError, RuntimeError):
                    break
            deadline = time.monotonic() + wait_s
            while (left := deadline - time.monotonic()) > 0:
                try:
                    msg = await ws.receive(timeout=left)
                except asyncio.TimeoutError:
                    break
                if msg.type != aiohttp.WSMsgType.BINARY:
                    break
                got.append(codec.decode(msg.data))
    return got


def hello_frame(fp: dict | None = None, **kw) -> bytes:
    return codec.encode(codec.Hello(fingerprint=fp or fingerprint(), sampling={
        "temperature": 0.0, "top_p": 1.0, "top_k": 0, "seed": None}, **kw))


def errors(messages: list) -> list[str]:
    return [m.code for m in messages if isinstance(m, codec.Error)]
