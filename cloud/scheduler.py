"""The verifier's one compute worker, and the kinds of work sessions hand it.

Every forward pass runs on one worker thread, off the event loop: a session's I/O never waits on
another session's compute, and passes never fight for the cores. Sessions do not call the worker
directly: each submits a Work item and awaits its result, and the scheduler pulls items in
arrival order and runs them one at a time.

Kinds of work (Work.kind):
  prefill  feed one chunk of a prompt (cloud/session.py: prefill_chunk)
  verify   one verify pass over a block of drafted ids (cloud/verify.py: verify_pass)
  fill     the pass a filled token needs (prepare_next_token)
  decode   the pass a cloud-only token needs (prepare_next_token)

Each item names its session and kind, so a later scheduler can pull every ready item of one kind
and run them as one batched forward pass; this one runs them one by one.
"""
from __future__ import annotations

import asyncio
import collections
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable

KINDS = ("prefill", "verify", "fill", "decode")


@dataclass(eq=False)
class Work:
    """One unit of compute for one session: `run()` on the worker thread."""

    kind: str
    session: Any
    run: Callable[[], Any]
    submitted: float = field(default_factory=time.perf_counter)
    started: float | None = None
    future: asyncio.Future | None = None

    @property
    def waited_s(self) -> float:
        """Seconds it waited behind other sessions' work before it started."""
        return (self.started or self.submitted) - self.submitted


class Scheduler:
    """Pulls work items in arrival order and runs them, one at a time, on one worker thread."""

    def __init__(self) -> None:
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="verify")
        self.ready: collections.deque[Work] = collections.deque()
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task | None = None

    async def submit(self, work: Work) -> Any:
        """Queue work and wait for its result (its exception, if it raised). A submitter that is
        cancelled before its work started takes the work out: nothing runs for a gone session."""
        assert work.kind in KINDS, work.kind
        loop = asyncio.get_running_loop()
        if self._task is None or self._task.done():
            self._wake = asyncio.Event()
            self._task = loop.create_task(self._pull_loop())
        work.future = loop.create_future()
        self.ready.append(work)
        self._wake.set()
        return await work.future

    def pull(self) -> Work | None:
        """The next item to run (a batching scheduler would take several of one kind here)."""
        while self.ready:
            work = self.ready.popleft()
            if not work.future.done():  # not cancelled by its session meanwhile
                return work
        return None

    async def _pull_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            work = self.pull()
            if work is None:
                self._wake.clear()
                await self._wake.wait()
                continue
            work.started = time.perf_counter()
            try:
                result = await loop.run_in_executor(self.executor, work.run)
            except asyncio.CancelledError:
                raise
            except BaseException as err:  # the session's work loop decides what it means
                if not work.future.done():
                    work.future.set_exception(err)
            else:
                if not work.future.done():
                    work.future.set_result(result)

    def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
        for work in self.ready:
            if work.future is not None and not work.future.done():
                work.future.cancel()
        self.ready.clear()
        self.executor.shutdown(wait=False, cancel_futures=True)
