"""The edge's generation loops: pipeline (default), sync, cloud-only and edge-only.

The edge state for one answer (positions are absolute token indices):
  committed   prompt + committed output; the cloud holds the same list once verdicts arrive
  drafted     speculative tokens after `committed`, each with the distribution it was sampled from
  sent        how many of `drafted` have gone up
  forced      the paper variant's recovered token: committed here, still to be sent up
  epoch       bumps whenever the cloud corrects the prefix; verdicts of older epochs are stale
The drafter's KV cache always holds committed + drafted.

Pipeline: the edge keeps drafting while blocks are in flight, up to a run-ahead; a verdict is
applied between draft steps (the verdict is the interrupt). Sync: the same protocol with the
run-ahead equal to the block, waiting for each verdict. Both give exactly the target's output.
"""
from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

import codec
from edge_app.drafter import common_prefix_len
from edge_app.link import CloudError, CloudLink
from edge_app.meters import EdgeMeters
from edge_app.policy import choose_plan, ema
from sampling import SamplingParams, SparseDist, draft_dist, recover_from_top_k, sample_sparse

MODES = ("pipeline", "sync", "cloud", "edge")
# "idle_timeout": the verifier evicted a session that sat idle; a new one resumes the answer
RETRYABLE = ("disconnected", "timeout", "unreachable", "idle_timeout")

# on_commit(new_committed_ids, speculative_ids): called whenever the committed text grows
CommitCallback = Callable[[list[int], list[int]], None]


@dataclass
class GenerateOptions:
    max_new_tokens: int = 128
    params: SamplingParams = field(default_factory=SamplingParams)
    mode: str = "pipeline"
    variant: str = "exact"  # "exact" (sparse q up, cloud recovers) or "paper" (scalar q up, top-K down)
    paper_top_k: int = 8
    block: int | None = None  # fixed block size; None adapts to measurements
    fill: bool = True  # pipeline: let the cloud fill its idle bubbles with target tokens
    run_ahead: int | None = None  # max unverified drafted tokens; None = 2 x block
    stop_ids: tuple[int, ...] = ()


@dataclass
class GenerationStats:
    mode: str
    drafted: int = 0
    accepted: int = 0
    rejected: int = 0
    recovered: int = 0
    bonus: int = 0
    rounds: int = 0
    stale_drafts: int = 0
    bytes_up: int = 0
    bytes_down: int = 0
    wall_s: float = 0.0
    ttft_s: float | None = None
    new_tokens: int = 0
    reconnects: int = 0
    edge_only_tokens: int = 0
    filled: int = 0
    block_sizes: list[int] = field(default_factory=list)
    verify_s: list[float] = field(default_factory=list)
    edge: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        verified = self.accepted + self.rejected
        return {
            "mode": self.mode,
            "drafted": self.drafted,
            "accepted": self.accepted,
            "rejected": self.rejected,
            "recovered": self.recovered,
            "bonus": self.bonus,
            "rounds": self.rounds,
            "stale_drafts": self.stale_drafts,
            "reconnects": self.reconnects,
            "filled": self.filled,
            "edge_only_tokens": self.edge_only_tokens,
            "acceptance_rate": self.accepted / verified if verified else None,
            "mean_accepted_per_round": self.accepted / self.rounds if self.rounds else None,
            "bytes_up": self.bytes_up,
            "bytes_down": self.bytes_down,
            "bytes_up_per_token": self.bytes_up / self.new_tokens if self.new_tokens else None,
            "bytes_down_per_token": self.bytes_down / self.new_tokens if self.new_tokens else None,
            "wall_s": self.wall_s,
            "ttft_s": self.ttft_s,
            "new_tokens": self.new_tokens,
            "tokens_per_s": self.new_tokens / self.wall_s if self.wall_s > 0 else None,
            "mean_block": float(np.mean(self.block_sizes)) if self.block_sizes else None,
            "mean_verify_s": float(np.mean(self.verify_s)) if self.verify_s else None,
            "edge": self.edge,
        }


@dataclass
class Answer:
    token_ids: list[int]
    stats: GenerationStats
    finish_reason: str  # "stop" (end of sequence) or "length"
    edge_only_spans: list[tuple[int, int]] = field(default_factory=list)  # draft-only token ranges


def finish(tokens: list[int], max_new: int, stop_ids: tuple[int, ...]) -> tuple[list[int], str | None]:
    """Cut generated tokens at the first stop token (kept) or at max_new; the reason, if finished."""
    for i, t in enumerate(tokens[:max_new]):
        if t in stop_ids:
            return tokens[: i + 1], "stop"
    if len(tokens) >= max_new:
        return tokens[:max_new], "length"
    return tokens, None


class Pipeline:
    """Drives one answer through the drafter and (except edge mode) the cloud link."""

    def __init__(self, drafter, link: CloudLink | None, options: GenerateOptions,
                 on_commit: CommitCallback | None = None, meters: EdgeMeters | None = None,
                 epoch: int = 0, estimates: dict | None = None):
        self.drafter = drafter
        self.link = link
        self.opt = options
        self.on_commit = on_commit or (lambda new, spec: None)
        self.meters = meters or EdgeMeters()
        self.epoch = epoch
        self.rng = np.random.default_rng(options.params.seed)
        self.stats = GenerationStats(mode=options.mode)
        # measured numbers that drive the adaptive block size (carried across answers)
        self.estimates = estimates if estimates is not None else {}
        self.committed: list[int] = []
        self.n_prompt = 0
        self.drafted: list[int] = []
        self.dists: list[SparseDist] = []
        self.forced: list[int] = []
        self.sent = 0
        self.seq = 0
        self.send_times: dict[int, float] = {}
        self.done_reason: str | None = None
        self.stop_drafting = False
        self._needs_resync = False
        self._bytes0: tuple[int, int] | None = None
        # fault handling: reconnect(err) -> a new CloudLink or None (set by EdgeClient)
        self.reconnect: Callable | None = None
        self.retry_interval_s = 5.0
        self.notice: Callable[[str], None] = lambda text: None
        self.edge_spans: list[tuple[int, int]] = []

    # -- public ------------------------------------------------------------------------------
    async def run(self, prompt_ids: list[int]) -> Answer:
        t0 = self.t0 = time.perf_counter()
        self.meters.start()
        self.committed = list(prompt_ids)
        self.n_prompt = len(prompt_ids)
        if self.opt.mode not in MODES:
            raise ValueError(f"unknown mode {self.opt.mode!r}; choose from {', '.join(MODES)}")
        if self.opt.mode == "edge":
            await self._run_edge()
        else:
            await self._drive_with_recovery()
        self.stats.wall_s = time.perf_counter() - t0
        generated, reason = finish(self.committed[self.n_prompt:], self.opt.max_new_tokens, self.opt.stop_ids)
        self.stats.new_tokens = len(generated)
        self._count_link_bytes()
        self.stats.edge = self.meters.snapshot()
        return Answer(generated, self.stats, reason or "length", self._edge_spans(len(generated)))

    # -- faults: reconnect and resume, or continue edge-only -------------------------------------
    async def _drive_with_recovery(self) -> None:
        """Run the cloud-backed mode; on a lost link reconnect and resume from the committed prefix
        (the cloud re-prefills it), or continue edge-only until the cloud is back."""
        while self.done_reason is None:
            try:
                if self.link is None:
                    raise CloudError("unreachable", "no verifier session")
                if self.opt.mode == "cloud":
                    await self._run_cloud()
                else:
                    await self._run_speculative(sync=self.opt.mode == "sync")
                return
            except CloudError as err:
                if self.reconnect is None or err.code not in RETRYABLE:
                    raise
                self.stats.reconnects += 1
                self._count_link_bytes()
                self.link = await self.reconnect(err)
                self.epoch = 0  # a new session counts epochs from zero
                if self.link is None:
                    await self._run_edge_until_cloud_returns()

    def _count_link_bytes(self) -> None:
        if self.link is not None and self._bytes0 is not None:
            self.stats.bytes_up += self.link.bytes_up - self._bytes0[0]
            self.stats.bytes_down += self.link.bytes_down - self._bytes0[1]
            self._bytes0 = (self.link.bytes_up, self.link.bytes_down)

    def _reset_speculation(self) -> None:
        """Forget everything not committed: a new session starts from the committed prefix."""
        self.drafted, self.dists, self.forced, self.sent = [], [], [], 0
        self.stop_drafting = False
        self.send_times.clear()
        self._needs_resync = True

    async def _run_edge_until_cloud_returns(self) -> None:
        """Draft-only tokens, each labelled as such, while retrying the cloud now and then."""
        self.notice("the verifier is unreachable: continuing with the draft model alone "
                    "(edge-only tokens are not target quality)")
        self._reset_speculation()
        await self._resync_drafter()
        self._bytes0 = None  # no link now; a new one starts its own byte count
        next_try = time.monotonic() + self.retry_interval_s
        # the probe runs beside the drafting: a verifier behind a stalled link may take the whole
        # connect timeout to fail, and the answer must not stop meanwhile
        probe: asyncio.Future | None = None
        try:
            while self.done_reason is None:
                start = len(self.committed) - self.n_prompt
                token, _ = await self._drafter_call("draft", self._draft_one)
                self.stats.drafted += 1
                self.stats.edge_only_tokens += 1
                self.edge_spans.append((start, start + 1))
                self._commit([token])
                if probe is None and time.monotonic() >= next_try:
                    probe = asyncio.ensure_future(self.reconnect(None))
                if probe is not None and probe.done():
                    link, probe = probe.result(), None
                    if link is not None:
                        self.link, self.epoch = link, 0
                        self.notice("the verifier is back: answers are target quality again")
                        return
                    next_try = time.monotonic() + self.retry_interval_s
        finally:
            if probe is not None and not probe.done():
                probe.cancel()
                await asyncio.gather(probe, return_exceptions=True)

    def _edge_spans(self, n: int) -> list[tuple[int, int]]:
        """Merged [start, end) ranges of generated tokens that only the draft produced."""
        merged: list[tuple[int, int]] = []
        for a, b in self.edge_spans:
            if a >= n:
                break
            if merged and merged[-1][1] == a:
                merged[-1] = (merged[-1][0], min(b, n))
            else:
                merged.append((a, min(b, n)))
        return merged

    # -- committing --------------------------------------------------------------------------
    def _commit(self, new: list[int]) -> None:
        if not new:
            return
        before = len(self.committed) - self.n_prompt
        self.committed += new
        if self.stats.ttft_s is None:
            self.stats.ttft_s = time.perf_counter() - self.t0
            self.meters.mark_first_token()
        generated, reason = finish(self.committed[self.n_prompt:], self.opt.max_new_tokens, self.opt.stop_ids)
        visible = generated[before:]
        self.meters.tokens_committed(len(visible))
        self.on_commit(visible, list(self.drafted))
        if reason:
            self.done_reason = reason

    # -- edge only ---------------------------------------------------------------------------
    async def _run_edge(self) -> None:
        await self._drafter_call("prefill", self.drafter.prefill, self.committed)
        while self.done_reason is None:
            token, _ = await self._drafter_call("draft", self._draft_one)
            self.stats.drafted += 1
            self.drafted = []
            self._commit([token])

    # -- cloud only --------------------------------------------------------------------------
    def _remaining(self) -> int:
        return self.opt.max_new_tokens - (len(self.committed) - self.n_prompt)

    async def _run_cloud(self) -> None:
        link = self.link
        self._bytes0 = (link.bytes_up, link.bytes_down)
        # (re)starting from the committed prefix: a resumed answer continues where it stopped
        await link.send(codec.Prompt(ids=self.committed, max_new_tokens=self._remaining()))
        self.epoch += 1
        await link.send(codec.Generate(max_new_tokens=self._remaining()))
        while self.done_reason is None:
            with self.meters.phase("network_wait"):
                msg = await link.recv()
            if isinstance(msg, codec.Tokens):
                self._commit(list(msg.ids))
                if msg.done:
                    break

    # -- speculative: pipeline and sync ------------------------------------------------------
    async def _run_speculative(self, sync: bool) -> None:
        link = self.link
        self._bytes0 = (link.bytes_up, link.bytes_down)
        self._reset_speculation()
        # 1. both sides prefill at once: the committed prefix goes up first, the edge prefills locally
        fill = self.opt.fill and not sync and self.opt.variant == "exact"
        await link.send(codec.Prompt(ids=self.committed, max_new_tokens=self._remaining(), fill=fill))
        self.epoch += 1
        await self._drafter_call("prefill", self.drafter.prefill, self.committed)
        self._needs_resync = False
        while self.done_reason is None:
            # 2. apply every verdict that has arrived (between draft steps)
            for msg in link.poll():
                self._on_message(msg)
            if self.done_reason is not None:
                break
            await self._resync_drafter()
            block, run_ahead = self._plan(sync)
            if self._may_draft(run_ahead):
                # 3. draft one token; send a full block at once
                token, dist = await self._drafter_call("draft", self._draft_one)
                self.drafted.append(token)
                self.dists.append(dist)
                self.stats.drafted += 1
                if token in self.opt.stop_ids or self._at_length_limit():
                    self.stop_drafting = True
                unsent = len(self.drafted) - self.sent
                if unsent >= block or self.stop_drafting:
                    await self._send_block(wait=sync or self.stop_drafting)
            else:
                # 4. nothing to draft: make sure the cloud has everything, then wait for a verdict
                if len(self.drafted) > self.sent or self.forced:
                    await self._send_block(wait=True)
                with self.meters.phase("network_wait"):
                    msg = await link.recv()
                self._on_message(msg)

    def _may_draft(self, run_ahead: int) -> bool:
        return not self.stop_drafting and len(self.drafted) < run_ahead and not self._at_length_limit()

    def _at_length_limit(self) -> bool:
        return len(self.committed) + len(self.drafted) - self.n_prompt >= self.opt.max_new_tokens

    def _plan(self, sync: bool) -> tuple[int, int]:
        """Block size and run-ahead: fixed by options, or chosen from the measured numbers."""
        if self.opt.block:
            block = self.opt.block
            return block, (block if sync else (self.opt.run_ahead or 2 * block))
        est = self.estimates
        if sync or not all(k in est for k in ("t_draft", "t_rtt", "t_verify", "a")):
            block = est.get("sync_block", 4)
            return block, (block if sync else 2 * block)
        plan = choose_plan(est["a"], est["t_draft"], est["t_rtt"], est["t_verify"], allow_sync=False)
        return plan.block, self.opt.run_ahead or plan.run_ahead

    async def _send_block(self, wait: bool) -> None:
        ids = self.forced + self.drafted[self.sent:]
        greedy = self.opt.params.greedy
        new_dists = self.dists[self.sent:]
        dists = q_scalar = None
        if not greedy and self.opt.variant == "exact":
            dists = [_point(t) for t in self.forced] + new_dists
        elif not greedy:
            q_scalar = [1.0] * len(self.forced) + [d.prob(t) for d, t in zip(new_dists, self.drafted[self.sent:])]
        # a forced token (the paper variant's recovered one) is committed already: it goes up first
        pos = len(self.committed) - len(self.forced) + self.sent
        self.seq += 1
        await self.link.send(codec.Draft(epoch=self.epoch, pos=pos, ids=ids, dists=dists, q_scalar=q_scalar,
                                         forced=len(self.forced), flush=True, wait=wait, seq=self.seq))
        self.send_times[self.seq] = time.perf_counter()
        self.stats.block_sizes.append(len(ids) - len(self.forced))
        self.sent = len(self.drafted)
        self.forced = []

    def _on_filled(self, msg) -> None:
        """Target tokens the cloud committed on its own while it had nothing fresh to verify.

        A drafted token at the same position that matches is simply committed. A sent draft that
        differs is stale, and the cloud, seeing the same pair, bumps its epoch as we do here; unsent
        drafts are dropped without a word.
        """
        for i, token in enumerate(msg.ids):
            if msg.pos + i != len(self.committed):
                raise RuntimeError(f"filled token for position {msg.pos + i}, committed {len(self.committed)}")
            self.stats.filled += 1
            if self.drafted and self.drafted[0] == token:
                self.drafted, self.dists = self.drafted[1:], self.dists[1:]
                self.sent = max(0, self.sent - 1)
            else:
                if self.sent:
                    self.epoch += 1
                self.stats.stale_drafts += len(self.drafted)
                self.drafted, self.dists, self.sent = [], [], 0
                self.stop_drafting = False
                self._needs_resync = True
            self._commit([token])

    def _on_message(self, msg) -> None:
        if isinstance(msg, codec.Prefilled):
            return
        if isinstance(msg, codec.Tokens):
            self._on_filled(msg)
            return
        if not isinstance(msg, codec.Verdict):
            raise RuntimeError(f"unexpected {type(msg).__name__} from the verifier during drafting")
        if msg.epoch != self.epoch:
            return  # a verdict on drafts the edge already threw away
        self._measure(msg)
        self.stats.rounds += 1
        n = msg.accepted
        accepted = self.drafted[:n]
        self.stats.accepted += n
        self.drafted, self.dists = self.drafted[n:], self.dists[n:]
        self.sent = max(0, self.sent - n)
        if msg.kind in ("recovered", "bonus", "rejected"):
            rejected_dist = self.dists[0] if self.dists else None
            stale = len(self.drafted) - (1 if msg.kind != "bonus" else 0)
            self.stats.stale_drafts += max(0, stale)
            if msg.kind != "bonus":
                self.stats.rejected += 1
            self.drafted, self.dists, self.sent = [], [], 0
            self.epoch = msg.new_epoch
            self.stop_drafting = False
            if msg.kind == "rejected":  # the paper variant: the edge samples the recovered token
                token = recover_from_top_k(np.array(msg.top_ids), np.array(msg.top_probs), rejected_dist, self.rng)
                self.forced = [token]
                self.stats.recovered += 1
            else:
                token = msg.token
                self.stats.recovered += msg.kind == "recovered"
                self.stats.bonus += msg.kind == "bonus"
            self._needs_resync = True
            self._commit(accepted + [token])
        else:
            self._commit(accepted)

    def _measure(self, msg) -> None:
        sent_at = self.send_times.pop(msg.seq, None)
        est = self.estimates
        self.stats.verify_s.append(msg.verify_s)
        est["t_verify"] = ema(est.get("t_verify"), msg.verify_s, 0.3)
        # the first verdict of an answer also waited for the cloud's prefill: not a round trip
        if sent_at is not None and self.stats.rounds > 0:
            est["t_rtt"] = ema(est.get("t_rtt"), max(0.0, time.perf_counter() - sent_at - msg.verify_s), 0.3)
        verified = self.stats.accepted + self.stats.rejected
        if verified >= 4:
            est["a"] = self.stats.accepted / verified

    async def _resync_drafter(self) -> None:
        """After a correction, roll the draft's KV cache back to the committed prefix (+ forced)."""
        if not self._needs_resync:
            return
        self._needs_resync = False
        target = self.committed
        with self.meters.phase("rollback"):
            keep = min(self.drafter.length, len(target) - 1)
            keep = common_prefix_len(self.drafter.tokens[:keep], target)
            await asyncio.get_running_loop().run_in_executor(None, self._rollback_and_feed, keep, target[keep:])

    def _rollback_and_feed(self, keep: int, ids: list[int]) -> None:
        self.drafter.rollback(keep)
        self.drafter.feed(ids)

    # -- drafting ----------------------------------------------------------------------------
    def _draft_one(self) -> tuple[int, SparseDist]:
        """Sample one token from the quantised draft distribution and feed it (worker thread)."""
        dist = draft_dist(self.drafter.logits(), self.opt.params)
        token = int(dist.ids[0]) if self.opt.params.greedy else sample_sparse(dist, self.rng)
        self.drafter.feed([token])
        return token, dist

    async def _drafter_call(self, phase: str, fn, *args):
        t0 = time.perf_counter()
        with self.meters.phase(phase):
            result = await asyncio.get_running_loop().run_in_executor(None, fn, *args)
        if phase == "draft":
            self.estimates["t_draft"] = ema(self.estimates.get("t_draft"), time.perf_counter() - t0, 0.2)
        return result


def _point(token: int) -> SparseDist:
    return SparseDist(np.array([token], dtype=np.int64), np.array([1], dtype=np.int64))

