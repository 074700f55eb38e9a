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

Batching (the default, `batch=True`): each tick pulls every ready item, oldest first, up to
`max_tokens` fed ids (the oldest always runs, whatever its size; an item that does not fit waits at
the head of the queue for the next tick), and runs their feeds as ONE forward pass over their
sessions' own caches (cloud/batch_forward.py); each item's finish gets its own rows. A session has
at most one item queued (its work loop awaits each), so oldest-first is round-robin over sessions,
and a long prompt, fed in chunks, lets the others' verify passes into every tick; a tick takes at
most `max_prefill` prompt chunks, so verdicts do not wait behind many sessions' prompts. Every pass runs
through the batched code, a session alone included, so an answer does not depend on who else was
in its passes. A pass that fails is undone in every cache and its items rerun one by one: a bad
item costs only its own session. An engine or model the batched pass does not support runs alone.
"""
from __future__ import annotations

import asyncio
import collections
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from cloud.batch_forward import Segment, batched_forward, cache_lengths, restore_cache, supports_batching

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
        """Worker thread: the forward pass, then finish. Only a verify pass needs every row; the
        others ask the engine for the last one, where it can give just that."""
        self.started = time.perf_counter()
        rows = self.session.engine.forward(self.feed, last_only=self.kind != "verify")  # [len(feed) or 1, V]
        result = self.finish(rows)
        self.ran_s = time.perf_counter() - self.started
        return result


def batchable(work: Work) -> bool:
    """Whether a work item's engine runs in the batched pass: a plain TargetEngine (a subclass may
    override forward, e.g. the tests' slow engine) over a model of the supported layout."""
    from cloud.engine import TargetEngine

    engine = work.session.engine
    if type(engine).forward is not TargetEngine.forward or not hasattr(engine, "model"):
        return False
    ok = getattr(engine.model, "_picospec_batchable", None)
    if ok is None:
        ok = supports_batching(engine.model)
        engine.model._picospec_batchable = ok
    return ok


def run_tick(works: list[Work]) -> list[tuple[bool, Any]]:
    """Worker thread: one batched forward pass over every item's feed, then each item's finish.
    Returns (ok, result or exception) per item. A tick of one item is the engine's own pass (the
    model's forward: the target alone); the batched pass gives the same rows (bit for bit with
    the row-streaming kernel, tests/test_batch_forward.py)."""
    if len(works) == 1 or not all(batchable(w) for w in works):
        return [_run_alone(w) for w in works]
    t0 = time.perf_counter()
    for w in works:
        w.started = t0
    caches = [w.session.engine.cache for w in works]
    lengths = [cache_lengths(c) for c in caches]
    segments = [Segment(c, w.feed, all_rows=w.kind == "verify") for c, w in zip(caches, works)]
    try:
        with works[0].session.engine.model_lock:
            rows = batched_forward(works[0].session.engine.model, segments)
    except Exception:
        # undo what the pass wrote in every cache, then each item alone: only a bad one fails
        for c, n in zip(caches, lengths):
            restore_cache(c, n)
        return [_run_alone(w) for w in works]
    pass_s = time.perf_counter() - t0
    out = []
    for w, r in zip(works, rows):
        w.session.engine.forward_passes += 1
        try:
            result = w.finish(r)
        except Exception as err:  # e.g. a protocol error in this session's block: its own
            out.append((False, err))
        else:
            out.append((True, result))
        w.ran_s = pass_s  # what the session waited for: the shared pass
    return out


def _run_alone(work: Work) -> tuple[bool, Any]:
    try:
        return True, work.run()
    except Exception as err:
        return False, err


class Scheduler:
    """Pulls ready work items, oldest first, and runs them on one worker thread: with `batch`, every
    ready item (up to max_tokens fed ids) in one forward pass per tick; without, one at a time.
    `metrics` (cloud/metrics.Metrics), when given, gets the batch size and tokens per pass."""

    def __init__(self, batch: bool = True, max_tokens: int = 256, metrics=None, max_prefill: int = 1) -> None:
        self.batch = batch
        self.max_tokens = max_tokens
        self.max_prefill = max_prefill  # prefill chunks per tick: a verdict never waits behind many
        self.metrics = metrics
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

    async def call(self, fn: Callable[[], Any]) -> Any:
        """Run fn on the worker thread, between ticks: a session's own token is sampled there, so
        that a device sync (reading a token off a GPU row) waits for the device on the worker, never
        on the event loop."""
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn)

    def pull(self) -> list[Work]:
        """The items of the next tick: the oldest live one, then (batching) every other live one
        that fits in max_tokens, in age order, with at most max_prefill prompt chunks (a prompt's
        rows cost as much batched as alone, and a tick full of them would delay every verdict);
        the rest keep their places."""
        while self.ready and self.ready[0].future.done():  # cancelled by its session meanwhile
            self.ready.popleft()
        if not self.ready:
            return []
        first = self.ready.popleft()
        if not self.batch:
            return [first]
        tick, budget, left = [first], self.max_tokens - len(first.feed), collections.deque()
        prefills = int(first.kind == "prefill")
        while self.ready:
            work = self.ready.popleft()
            if work.future.done():
                continue
            is_prefill = work.kind == "prefill"
            if len(work.feed) <= budget and not (is_prefill and prefills >= self.max_prefill):
                tick.append(work)
                budget -= len(work.feed)
                prefills += is_prefill
            else:
                left.append(work)
        self.ready = left
        return tick

    async def _pull_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            tick = self.pull()
            if not tick:
                self._wake.clear()
                await self._wake.wait()
                continue
            if self.metrics is not None:
                self.metrics.histogram("picospec_batch_sessions", len(tick), BATCH_BUCKETS)
                self.metrics.histogram("picospec_batch_tokens", sum(len(w.feed) for w in tick), TOKEN_BUCKETS)
            try:
                results = await loop.run_in_executor(self.executor, run_tick, tick)  # one item: alone
            except asyncio.CancelledError:
                raise
            except BaseException as err:  # the executor itself failed: every item learns it
                results = [(False, err)] * len(tick)
            for work, (ok, value) in zip(tick, results):
                if work.future.done():  # its session went away during the pass
                    continue
                if ok:
                    work.future.set_result(value)
                else:
                    work.future.set_exception(value)

    def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
        for work in self.ready:
            if work.future is not None and not work.future.done():
                work.future.cancel()
        self.ready.clear()
        self.executor.shutdown(wait=False, cancel_futures=True)


BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)  # sessions per forward pass
TOKEN_BUCKETS = (1, 4, 8, 16, 32, 64, 128, 256, 512)  # fed ids per forward pass
