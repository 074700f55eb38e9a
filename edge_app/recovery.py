"""When the verifier is away: the draft model alone, every token labelled as such.

`run_edge_only` is the edge mode (`--mode edge`). `run_edge_until_cloud_returns` is the fallback
while a lost verifier is being looked for: it drafts and commits tokens on its own, and a probe
beside it tries to reconnect now and then; it returns the new link when the verifier is back.
"""
from __future__ import annotations

import asyncio
import time
from typing import Awaitable, Callable

import numpy as np

from edge_app.answer import AnswerState
from edge_app.draft_model import DraftModel, draft_step, resync
from edge_app.link import CloudLink

Reconnect = Callable[[object], Awaitable[CloudLink | None]]


async def _draft_and_commit(drafter: DraftModel, answer: AnswerState, rng: np.random.Generator,
                            labelled: bool) -> None:
    with answer.meters.phase("draft"):
        token = (await asyncio.get_running_loop().run_in_executor(
            None, draft_step, drafter, answer.options.params, rng))[0]
    answer.stats.drafted += 1
    if labelled:
        answer.stats.edge_only_tokens += 1
    answer.commit([token], edge_only=labelled)


async def run_edge_only(answer: AnswerState, drafter: DraftModel, rng: np.random.Generator) -> None:
    """The draft model alone (a baseline; not target quality)."""
    with answer.meters.phase("prefill"):
        await asyncio.get_running_loop().run_in_executor(None, drafter.prefill, list(answer.committed))
    while answer.done_reason is None:
        await _draft_and_commit(drafter, answer, rng, labelled=False)


async def run_edge_until_cloud_returns(answer: AnswerState, drafter: DraftModel, rng: np.random.Generator,
                                       reconnect: Reconnect, retry_interval_s: float,
                                       notice: Callable[[str], None]) -> CloudLink | None:
    """Draft-only tokens, labelled, while a probe looks for the verifier; its link once back."""
    notice("the verifier is unreachable: continuing with the draft model alone "
           "(edge-only tokens are not target quality)")
    await asyncio.get_running_loop().run_in_executor(None, resync, drafter, list(answer.committed))
    next_try = time.monotonic() + retry_interval_s
    # the probe runs beside the drafting: a verifier behind a stalled link may take the whole
    # connect timeout to fail, and the answer must not stop meanwhile
    probe: asyncio.Future | None = None
    try:
        while answer.done_reason is None:
            await _draft_and_commit(drafter, answer, rng, labelled=True)
            if probe is None and time.monotonic() >= next_try:
                probe = asyncio.ensure_future(reconnect(None))
            if probe is not None and probe.done():
                link, probe = probe.result(), None
                if link is not None:
                    notice("the verifier is back: answers are target quality again")
                    return link
                next_try = time.monotonic() + retry_interval_s
        return None
    finally:
        if probe is not None and not probe.done():
            probe.cancel()
            await asyncio.gather(probe, return_exceptions=True)
