"""The verifier's one compute worker, and the kinds of work sessions hand it.

Every forward pass runs on one worker thread, off the event loop: a session's I/O never waits on
another session's compute, and passes never fight for the cores. Sessions do not call the worker
directly: each submits a Work item and awaits its result, and the scheduler pulls items in
arrival order and runs them one at a time.

A Work item is (kind, session, feed, finish): feed the session's engine `feed` in one forward
pass, then `finish(rows)` turns the rows [len(feed), V] into the result. Kinds:
  prefill  one chunk of a prompt                      finish: the last row
  verify   one verify pass over a block (verify.py)   finish: decide_pass -> PassResult
  fill     the pass a filled token needs              finish: keep the last row pending
  decode   the pass a cloud-only token needs          finish: keep the last row pending

Only the forward pass would be shared by a batch: a later scheduler can pull every ready item,
run their feeds as one batched forward pass over their sessions' caches, and hand each item its
own rows. This one runs them one by one.
"""
from __future__ import annotations

import asyncio
import collections
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

KINDS = ("prefill", "verify", "fill", "decode")


@dataclass(eq=False)
class Work:
    """One forward pass for one session, and what to make of its rows (both on the worker)."""

    kind: str
    session: Any  # a VerifySession: its engine holds the cache this pass extends
    feed: list[int]
    finish: Callable[[torch.Tensor], Any]
    submitted: float = field(default_factory=time.perf_counter)
    started: float | None = None
    ran_s: float = 0.0  # the forward pass and finish, on the worker
    future: asyncio.Future | None = None

    @property
    def waited_s(self) -> float:
        """Seconds it waited behind other sessions' work before it started."""
        return (self.started or self.submitted) - self.submitted

    def run(self) -> Any:
        """Worker thread: the forward pass, then finish."""
        self.started = time.perf_counter()
        rows = self.session.engine.forward(self.feed)  # [len(feed), V]
        result = self.finish(rows)
        self.ran_s = time.perf_counter() - self.started
        return result


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
        assert work.kind in KINDS and work.feed, work.kind
        loop = asyncio.get_running_loop()
        if self._task is None or self._task.done():
            self._wake = asyncio.Event()
            self._task = loop.create_task(self._pull_loop())
        work.future = loop.create_future()
        self.ready.append(work)
        self._wake.set()
        return await work.future

    def pull(self) -> Work | None:
        """The next item to run (a batching scheduler would take several here)."""
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
