"""One answer on the edge, in any mode: the entry point the client, REPL and benchmark call.

    auto      (default) chooses cloud-only, sync or pipeline from measured numbers, and re-plans
    pipeline  drafts ahead while blocks are verified            } edge_app/speculate.py: the round
    sync      vanilla speculative decoding over the link        }
    cloud     the target alone, streamed (edge_app/cloud_only.py)
    edge      the draft alone, labelled not target quality (edge_app/recovery.py)

A lost verifier is reconnected and the answer resumes from its committed prefix (the cloud
re-prefills it); if it stays away, the answer goes on with the draft alone, labelled, until it is
back (edge_app/recovery.py).
"""
from __future__ import annotations

import time
from typing import Callable

import numpy as np

from edge_app.answer import (MODES, Answer, AnswerState, CommitCallback, GenerateOptions, GenerationStats,
                             finish)
from edge_app.cloud_only import run_cloud_only
from edge_app.draft_model import DraftModel
from edge_app.link import CloudError, CloudLink
from edge_app.meters import EdgeMeters
from edge_app.policy import Estimates
from edge_app.recovery import run_edge_only, run_edge_until_cloud_returns
from edge_app.speculate import SWITCH_TO_CLOUD, SpeculativeLoop, fills_bubbles
from edge_app.variants import variant_for

# "idle_timeout": the verifier evicted a session that sat idle; a new one resumes the answer.
# "draining": the replica is leaving the fleet (SIGTERM); another one resumes it (not a failure)
RETRYABLE = ("disconnected", "timeout", "unreachable", "idle_timeout", "draining")
RECHECK_AFTER = 4  # auto: cloud-only answers in a row before one speculates again to re-measure


class Pipeline:
    """Drives one answer through the drafter and (except edge mode) the cloud link."""

    def __init__(self, drafter: DraftModel, link: CloudLink | None, options: GenerateOptions,
                 on_commit: CommitCallback | None = None, meters: EdgeMeters | None = None,
                 estimates: Estimates | None = None):
        if options.mode not in MODES:
            raise ValueError(f"unknown mode {options.mode!r}; choose from {', '.join(MODES)}")
        self.drafter = drafter
        self.link = link
        self.opt = options
        self.on_commit = on_commit
        self.meters = meters or EdgeMeters()
        self.estimates = estimates if estimates is not None else Estimates()
        self.variant = variant_for(options.variant)
        self.rng = np.random.default_rng(options.params.seed)
        self.stats = GenerationStats(mode=options.mode)
        self.answer: AnswerState | None = None
        self.loop: SpeculativeLoop | None = None  # the round in progress (tests look at it)
        self._bytes0: tuple[int, int] | None = None
        # fault handling: reconnect(err) -> a new CloudLink or None (set by EdgeClient)
        self.reconnect: Callable | None = None
        self.retry_interval_s = 5.0
        self.notice: Callable[[str], None] = lambda text: None

    async def run(self, prompt_ids: list[int], shared: int = 0) -> Answer:
        """shared: leading prompt ids that many conversations open with (Prompt.shared)."""
        self.meters.start()
        answer = self.answer = AnswerState(prompt_ids, self.opt, self.stats, self.meters, self.on_commit, shared)
        if self.opt.mode == "edge":
            await run_edge_only(answer, self.drafter, self.rng)
        else:
            await self._drive_with_recovery(answer)
        self.stats.wall_s = time.perf_counter() - answer.t0
        generated, reason = answer.result()
        self.stats.new_tokens = len(generated)
        self._count_link_bytes()
        self.stats.edge = self.meters.snapshot()
        return Answer(generated, self.stats, reason, answer.merged_edge_spans(len(generated)))

    async def _drive_with_recovery(self, answer: AnswerState) -> None:
        """Run the cloud-backed mode; on a lost link reconnect and resume from the committed prefix,
        or continue edge-only until the cloud is back."""
        while answer.done_reason is None:
            try:
                if self.link is None:
                    raise CloudError("unreachable", "no verifier session")
                await self._run_with_cloud(answer)
                return
            except CloudError as err:
                if self.reconnect is None or err.code not in RETRYABLE:
                    raise
                if err.code == "draining":
                    self.stats.migrations += 1  # a planned move to another replica
                else:
                    self.stats.reconnects += 1
                self._count_link_bytes()
                self.link = await self.reconnect(err)
                if self.link is None:
                    self._bytes0 = None  # no link now; a new one starts its own byte count
                    self.link = await run_edge_until_cloud_returns(
                        answer, self.drafter, self.rng, self.reconnect, self.retry_interval_s, self.notice)

    async def _run_with_cloud(self, answer: AnswerState) -> None:
        self._bytes0 = (self.link.bytes_up, self.link.bytes_down)
        mode = self.opt.mode
        if mode == "auto" and self._cloud_is_faster():
            mode = "cloud"
            self.stats.mode_switches.append("cloud")
        if mode == "cloud":
            await run_cloud_only(answer, self.link, self.estimates)
            return
        self.loop = SpeculativeLoop(answer, self.drafter, self.link, self.estimates, self.variant,
                                    self.rng, mode)
        if await self.loop.run() == SWITCH_TO_CLOUD:
            await run_cloud_only(answer, self.link, self.estimates, prompt_sent=True)

    def _cloud_is_faster(self) -> bool:
        """auto, at the start of an answer: does the model (with what was measured) pick cloud-only?

        After RECHECK_AFTER cloud-only answers in a row, one answer speculates anyway: the link or
        the prompts may have changed, and only speculating measures them again.
        """
        est = self.estimates
        if fills_bubbles(self.opt, "auto", self.variant.name):
            return False  # the pipeline with filling is never slower than cloud-only (speculate.py)
        plan = est.plan(allow_sync=True, allow_cloud=True)
        if plan is None or plan.mode != "cloud" or est.cloud_answers >= RECHECK_AFTER:
            est.cloud_answers = 0
            return False
        est.cloud_answers += 1
        return True

    def _count_link_bytes(self) -> None:
        if self.link is not None and self._bytes0 is not None:
            self.stats.bytes_up += self.link.bytes_up - self._bytes0[0]
            self.stats.bytes_down += self.link.bytes_down - self._bytes0[1]
            self._bytes0 = (self.link.bytes_up, self.link.bytes_down)


__all__ = ["Answer", "CommitCallback", "GenerateOptions", "GenerationStats", "MODES", "Pipeline", "RETRYABLE",
           "finish"]
