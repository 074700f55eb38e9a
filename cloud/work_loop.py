"""A session's work loop: the edge's messages, in order, turned into work for the scheduler.

  Prompt    -> prefill, chunk by chunk (other sessions' passes run between chunks) -> Prefilled
  Draft     -> queue it; verify what is queued, pass after pass, merging drafts that arrive
               meanwhile -> one Verdict per pass
  Generate  -> cloud-only decoding, one token per pass -> Tokens
  (nothing) -> bubble filling, when the session's fill strategy wants a token -> Tokens
Only this loop touches its session, so no session state needs a lock; the forward passes, and the
sampling of the session's own tokens (a read off the target's device), run on the scheduler's
worker while this loop awaits them.
"""
from __future__ import annotations

import asyncio
import logging
import time
from typing import Callable

import codec
from cloud.connection import Conn, refuse, send
from cloud.draft_queue import Block
from cloud.errors import SessionError
from cloud.metrics import Metrics
from cloud.prefix_cache import PrefixStore
from cloud.scheduler import Scheduler, Work
from cloud.verify import apply_pass, decide_pass, pass_feed


class WorkLoop:
    """config: ServerConfig (max_block, prefill_chunk); may_fill(): whether the verifier is lightly shared enough
    for bubble filling now."""

    def __init__(self, conn: Conn, scheduler: Scheduler, metrics: Metrics, config,
                 may_fill: Callable[[], bool], openings: PrefixStore | None = None):
        self.conn, self.session = conn, conn.session
        self.scheduler, self.metrics, self.config, self.may_fill = scheduler, metrics, config, may_fill
        self.openings = openings  # prompt openings shared across sessions (None: off)

    @property
    def opening_scope(self) -> str:
        """Who shares openings with this session: its access token's sessions (an open server's
        sessions all share)."""
        key = self.conn.quota_key or ""
        return key if key.startswith("token#") else ""

    async def run(self) -> None:
        conn = self.conn
        try:
            while True:
                while not conn.ops:
                    # in a bubble: fill now, or hold (seconds) while the edge's block is due
                    hold = self.session.fill.hold_s() if self.session.wants_fill() else None
                    if hold == 0.0:
                        await self.fill_one()
                        continue
                    conn.wake.clear()
                    try:
                        await asyncio.wait_for(conn.wake.wait(), hold)
                    except asyncio.TimeoutError:
                        pass  # the block is late: fill after all
                op = conn.pop()
                conn.busy = True
                await self.handle(op)
                conn.busy = False
                conn.last_active = time.monotonic()
        except SessionError as err:
            await refuse(conn, err, self.metrics)
        except (ConnectionError, RuntimeError) as err:  # the edge went away mid-send
            conn.log(logging.INFO, "lost", f"connection lost: {err}")
        except Exception as err:  # a bug here must cost this session only, and say so
            logging.getLogger("picospec.cloud").exception(
                "session %s: internal error", conn.sid, extra={"session": conn.sid})
            await refuse(conn, SessionError("internal", f"the verifier failed: {type(err).__name__}"), self.metrics)

    async def handle(self, op) -> None:
        if isinstance(op, codec.Prompt):
            await self.prefill(op)
        elif isinstance(op, codec.Draft):
            await self.queue_draft(op)
            await self.verify_queued()
        elif isinstance(op, codec.Generate):
            await self.generate(op.max_new_tokens)
        else:
            raise SessionError("bad_message", f"unexpected {type(op).__name__} from the edge")

    async def prepare_next_token(self, kind: str) -> bool:
        """The pass the session's next own token needs ("fill" or "decode"), if any; True if it ran."""
        feed = self.session.next_token_feed()
        if feed:
            await self.scheduler.submit(Work(kind, self.session, feed, self.session.keep_row))
        return bool(feed)

    # -- Prompt -> Prefilled -------------------------------------------------------------------
    async def prefill(self, op: codec.Prompt) -> None:
        session = self.session
        t0 = time.perf_counter()
        rest = session.begin_prompt(op.ids, op.max_new_tokens, self.openings, self.opening_scope)
        if session.opening_reused:
            self.metrics.inc("picospec_prefix_hits_total")
            self.metrics.inc("picospec_prefix_reused_tokens_total", session.opening_reused)
        last = None
        chunk = self.config.prefill_chunk  # other sessions' passes join every chunk's tick
        for start in range(0, len(rest), chunk):
            last = await self.scheduler.submit(Work("prefill", session, rest[start:start + chunk],
                                                    lambda rows: rows[-1]))
        fill = op.fill and self.may_fill()
        token = await self.scheduler.call(lambda: session.end_prompt(op.ids, op.max_new_tokens, last, fill=fill))
        if op.shared and self.openings is not None:
            session.share_opening(self.openings, op.shared, self.opening_scope)
        seconds = time.perf_counter() - t0
        self.metrics.observe("picospec_prefill_seconds", seconds)
        self.metrics.inc("picospec_prefill_tokens_total", len(rest))
        await send(self.conn, codec.Prefilled(committed_len=len(session.committed), epoch=session.epoch,
                                              prefill_s=seconds, token=token), self.metrics)

    # -- Draft -> Verdict ----------------------------------------------------------------------
    async def queue_draft(self, op: codec.Draft) -> None:
        session, epoch = self.session, self.session.epoch
        if not session.add_draft(Block.from_draft(op), self.conn.popped_at):
            self.metrics.inc("picospec_stale_drafts_total", len(op.ids))
            if session.epoch != epoch:
                # the draft contradicted filled tokens and moved the epoch: the edge waits to hear
                # of a newer epoch before it sends again, and no filled token may follow (the
                # answer's eos or budget reached): say it now, with an empty Tokens
                await send(self.conn, codec.Tokens(pos=len(session.committed), ids=[], done=False,
                                                   epoch=session.epoch), self.metrics)

    async def verify_queued(self) -> None:
        """Verify what is queued, pass after pass; drafts that arrived during a pass join the next."""
        conn, session, m = self.conn, self.session, self.metrics
        while True:
            while conn.ops and isinstance(conn.ops[0], codec.Draft):
                await self.queue_draft(conn.pop())
            block = session.take_block(self.config.max_block)
            if block is None:
                return
            work = Work("verify", session, pass_feed(session, block), lambda rows: decide_pass(session, block, rows))
            result = await self.scheduler.submit(work)
            result.verify_s = work.ran_s
            for branch in conn.pop_branches():  # sent during the pass: this verdict may take one
                await self.queue_draft(branch)
            epoch = apply_pass(session, block, result)
            m.inc("picospec_verify_passes_total")
            m.inc("picospec_drafted_tokens_total", len(block.drafted))
            m.inc("picospec_accepted_tokens_total", result.accepted)
            m.observe("picospec_verify_seconds", result.verify_s)
            m.observe("picospec_verify_wait_seconds", work.waited_s)  # behind other sessions' work
            if result.branch:
                m.inc("picospec_branches_taken_total")
            await send(conn, codec.Verdict(
                epoch=block.epoch, pos=block.pos, accepted=result.accepted, token=result.token,
                kind=result.kind, new_epoch=epoch, verify_s=result.verify_s,
                top_ids=result.top_ids, top_probs=result.top_probs, seq=block.seq, fed=result.fed,
                branch=result.branch), m)

    # -- nothing to verify -> filled Tokens ----------------------------------------------------
    async def fill_one(self) -> None:
        """One target token of the cloud's own while the edge drafts. If a draft arrives during the
        pass, the pass's row verifies that draft instead and nothing is sampled."""
        session = self.session
        t0 = time.monotonic()
        if await self.prepare_next_token("fill"):
            session.fill.observe_pass(time.monotonic() - t0)
        if self.conn.ops or not session.wants_fill():
            return
        token = await self.scheduler.call(session.commit_fill)
        self.metrics.inc("picospec_filled_tokens_total")
        await send(self.conn, codec.Tokens(pos=len(session.committed) - 1, ids=[token], done=False,
                                           epoch=session.epoch), self.metrics)

    # -- Generate -> Tokens --------------------------------------------------------------------
    async def generate(self, max_new_tokens: int) -> None:
        """Cloud-only decoding: one target token per pass, streamed as it is committed, up to
        max_new_tokens and never past the Prompt's budget."""
        session = self.session
        limit = session.generate_limit(max_new_tokens)
        for i in range(limit):
            await self.prepare_next_token("decode")
            token = await self.scheduler.call(session.commit_next_token)
            self.metrics.inc("picospec_generated_tokens_total")
            done = token == session.eos_id or i == limit - 1
            await send(self.conn, codec.Tokens(pos=len(session.committed) - 1, ids=[token], done=done,
                                               epoch=session.epoch), self.metrics)
            if done:
                return
        await send(self.conn, codec.Tokens(pos=len(session.committed), ids=[], done=True,
                                           epoch=session.epoch), self.metrics)
