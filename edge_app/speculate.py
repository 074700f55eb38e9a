"""The edge's half of speculative decoding: draft, send, apply the verdict, roll back.

One answer, one verifier session. State (positions are absolute token indices):
  answer.committed  prompt + committed output; the cloud holds the same list
  drafted           speculative tokens after `committed`, each with the distribution it came from
  sent              how many of `drafted` have gone up
  forced            the paper variant's recovered token: committed here, not yet sent up
  epoch             the epoch the cloud told us to draft in (Prefilled, Verdict, Tokens carry it);
                    None until the Prefilled of this answer arrives
  early_epoch       until then, the epoch this answer's Prompt will give (one past the newest the
                    link has heard: the cloud moves it once per Prompt): the first blocks go up in
                    it while the cloud prefills, so the first verify pass starts when the prefill
                    ends; if Prefilled names another, the cloud dropped them and they go up again
  hold_epoch        drafts sent in this epoch turned out stale (a token the cloud committed itself
                    contradicted them): send nothing until the cloud announces a newer epoch
The drafter's KV cache holds committed + drafted (+ the unsent forced token, already committed).

Pipeline and sync are the same loop: sync has a run-ahead equal to the block and waits for each
verdict; the pipeline keeps drafting while blocks are in flight and applies verdicts between
draft steps (the verdict is the interrupt). `auto` picks one of them, or cloud-only streaming,
from the measured numbers (edge_app.policy) and re-plans after every verdict.
"""
from __future__ import annotations

import asyncio
import time

import numpy as np

import codec
from codec import VerdictKind
from edge_app.answer import AnswerState
from edge_app.branches import Branch, least_confident, runner_up
from edge_app.draft_model import DraftModel, draft_sample, draft_step, resync
from edge_app.link import CloudLink
from edge_app.policy import Estimates, Plan, cuts_block, ema
from edge_app.stats import acceptance_rate
from edge_app.variants import ExactVariant, PaperVariant
from sampling import SparseDist, token_prob

DEFAULT_BLOCK = 4
PREFILL_POLL_S = 0.01  # how often the cloud's messages are looked at while the drafter prefills
BRANCH_AFTER = 2  # main-line tokens drafted past the oldest block in flight before a branch starts
BRANCH_MARGIN = 2.0  # branch only where the runner-up's logit is within this of the drafted token's
SWITCH_TO_CLOUD = "cloud"  # what run() returns when auto decides cloud-only is faster


def fills_bubbles(options, mode: str, variant: str) -> bool:
    """Whether the cloud is asked to commit target tokens of its own while drafts are stale:
    in the pipeline and auto (not in sync, the vanilla baseline), with the exact variant."""
    return options.fill and mode != "sync" and variant == "exact"


class SpeculativeLoop:
    """Drives one answer through drafter and verifier until it is done (or auto hands over)."""

    def __init__(self, answer: AnswerState, drafter: DraftModel, link: CloudLink, estimates: Estimates,
                 variant: ExactVariant | PaperVariant, rng: np.random.Generator, mode: str):
        self.answer = answer
        self.opt = answer.options
        self.stats = answer.stats
        self.meters = answer.meters
        self.drafter = drafter
        self.link = link
        self.est = estimates
        self.variant = variant
        self.rng = rng
        self.mode = mode  # "pipeline", "sync" or "auto"
        self.drafted: list[int] = []
        self.dists: list[SparseDist] = []
        self.sent = 0
        self.forced: list[int] = []
        self.epoch: int | None = None
        self.early_epoch: int | None = None
        self.prefilled_at: float | None = None  # when this answer's Prefilled arrived
        self.hold_epoch: int | None = None
        self.seq = 0
        # seq -> (sent at, ids in the Draft); sent at None: a branch the verifier took
        self.sent_blocks: dict[int, tuple[float | None, int]] = {}
        self.stop_drafting = False
        self.needs_resync = False
        # branch pre-drafting (optional): the runner-up token and its margin per drafted position
        self.rivals: dict[int, tuple[int, float]] = {}
        self.branch: Branch | None = None
        self.drafter_on_branch = False  # the drafter's cache holds the branch, not the main line
        # greedy only: a sampled recovered token comes from norm(max(0, p - q)), where the draft's
        # runner-up, likely under q, has little mass (no branch hit in 170 sampled tiny-model tries)
        self.branching = self.opt.branch and self.opt.params.greedy
        self.plan = Plan(mode if mode != "auto" else "pipeline", DEFAULT_BLOCK, DEFAULT_BLOCK, 0.0)
        self.fills = fills_bubbles(self.opt, mode, variant.name)

    @property
    def committed(self) -> list[int]:
        return self.answer.committed

    # -- the loop ----------------------------------------------------------------------------
    async def run(self) -> str | None:
        """Returns None when the answer is done, SWITCH_TO_CLOUD when auto hands it to the cloud."""
        # 1. both sides prefill at once: the committed prefix goes up first, the edge prefills
        #    locally and starts drafting; the cloud's Prefilled brings the first token and the epoch
        self.early_epoch = self.link.epoch + 1
        await self.link.send(self.answer.prompt_message(fill=self.fills))
        await self._prefill_drafter()
        while self.answer.done_reason is None:
            # 2. apply every message that has arrived (between draft steps)
            for msg in self.link.poll():
                self.on_message(msg)
            if self.answer.done_reason is not None:
                break
            self.plan = self._choose_plan()
            # hand over only on this answer's own evidence (an answer that starts speculating was
            # either planned so or is re-measuring after cloud-only answers)
            if self.plan.mode == "cloud" and self.stats.rounds >= 2 and self._nothing_in_flight():
                self.stats.mode_switches.append("cloud")
                return SWITCH_TO_CLOUD
            if self._branch_due() and await self._grow_branch():
                continue  # (one branch token per turn: messages are still looked at in between)
            if self._may_draft():
                # 3. draft one token; a full block goes up at once
                await self._draft_step()
            else:
                # 4. nothing to draft: make sure the cloud has everything, then wait for a message
                if self._may_send() and (len(self.drafted) > self.sent or self.forced):
                    await self._send_block(wait=True)
                if self.branching and await self._grow_branch():
                    continue
                with self.meters.phase("network_wait"):
                    msg = await self.link.recv()
                self.on_message(msg)
        return None

    async def _prefill_drafter(self) -> None:
        """The drafter's prefill, with the cloud's messages applied as they arrive: the first token
        (Prefilled) reaches the user when the cloud has it, not when an edge that prefills more
        slowly than its verifier (a Pi beside a GPU) is done too. Nothing is drafted yet, so no
        message touches the drafter meanwhile: a token the cloud commits only marks it for a resync.
        The inbox is polled (every PREFILL_POLL_S) rather than awaited: a recv cancelled when the
        prefill ends first can lose the message it was taking (asyncio.wait_for, Python 3.11)."""
        prefill = asyncio.ensure_future(self._drafter_call("prefill", self.drafter.prefill, list(self.committed)))
        try:
            while True:
                for msg in self.link.poll():
                    self.on_message(msg)
                if prefill.done():
                    break
                await asyncio.wait({prefill}, timeout=PREFILL_POLL_S)
        finally:
            await prefill  # an executor job cannot be cancelled: the drafter is not used before it ends

    def _may_draft(self) -> bool:
        at_limit = self.answer.generated + len(self.drafted) >= self.opt.max_new_tokens
        return not self.stop_drafting and not at_limit and len(self.drafted) < self.plan.run_ahead

    def _may_send(self) -> bool:
        epoch = self._send_epoch()
        return epoch is not None and (self.hold_epoch is None or epoch > self.hold_epoch)

    def _send_epoch(self) -> int | None:
        """The epoch drafts go up in: the one the cloud named, or before Prefilled the predicted one."""
        return self.epoch if self.epoch is not None else self.early_epoch

    def _branch_due(self) -> bool:
        """Branching before the run-ahead is reached: a branch the verifier can take must arrive
        before the pass that decides its root ends, so it is drafted once the main line holds
        BRANCH_AFTER tokens past the oldest block in flight, not after all of the run-ahead."""
        if not self.branching or self.epoch is None or (self.branch is not None and self.branch.done):
            return False
        oldest = self._oldest_block_size()
        return oldest is not None and len(self.drafted) - oldest >= BRANCH_AFTER

    def _oldest_block_size(self) -> int | None:
        """Ids in the oldest Draft still awaiting its verdict (None: nothing in flight)."""
        oldest = min(self.sent_blocks, default=None)
        return None if oldest is None else self.sent_blocks[oldest][1]

    def _nothing_in_flight(self) -> bool:
        return self.epoch is not None and self.sent == 0 and not self.forced and self.hold_epoch is None

    # -- planning ----------------------------------------------------------------------------
    def _choose_plan(self) -> Plan:
        """Block size and run-ahead (and in auto, the mode): fixed by options, or from measurements."""
        if self.opt.block:
            block = self.opt.block
            mode = "sync" if self.mode == "sync" else "pipeline"
            return Plan(mode, block, block if mode == "sync" else (self.opt.run_ahead or 2 * block), 0.0)
        if self.mode == "sync":  # the vanilla baseline keeps one block size
            return Plan("sync", self.est.sync_block, self.est.sync_block, 0.0)
        # with bubble filling the pipeline is never slower than cloud-only (a stale draft costs the
        # cloud nothing: it commits its own tokens meanwhile), and it dominates sync; the model's
        # choice between the three matters where the cloud cannot fill (the paper variant)
        choose = self.mode == "auto" and not self.fills
        plan = self.est.plan(allow_sync=choose, allow_cloud=choose)
        if plan is None:  # nothing measured yet: a middle-of-the-road pipeline
            return Plan("pipeline", DEFAULT_BLOCK, self.opt.run_ahead or 2 * DEFAULT_BLOCK, 0.0)
        if plan.mode == "pipeline" and self.opt.run_ahead:
            return Plan(plan.mode, plan.block, self.opt.run_ahead, plan.rate)
        return plan

    # -- drafting ----------------------------------------------------------------------------
    async def _draft_step(self) -> None:
        """Draft one token. A block it completes goes up before the token is fed to the drafter:
        the feed (one draft forward pass, needed only for the token after it) overlaps the block's
        trip instead of delaying it (measured: sync 1.09x, the pipeline 1.06x faster at 100 ms)."""
        await self._resync_drafter()  # (only here: a drafter left on a branch may be needed there)
        loop = asyncio.get_running_loop()
        t0 = time.perf_counter()
        with self.meters.phase("draft"):
            token, dist, rival, unsure = await loop.run_in_executor(None, self._draft_one, False)
            if rival is not None:
                self.rivals[len(self.committed) + len(self.drafted)] = rival
            self.drafted.append(token)
            self.dists.append(dist)
            self.stats.drafted += 1
            if token in self.opt.stop_ids or self.answer.generated + len(self.drafted) >= self.opt.max_new_tokens:
                self.stop_drafting = True
            unsent = len(self.drafted) - self.sent
            full = unsent >= self.plan.block or self.stop_drafting
            if self._may_send() and (full or unsure):
                self.stats.cut_blocks += not full
                await self._send_block(wait=self.plan.mode == "sync" or self.stop_drafting)
            await loop.run_in_executor(None, self.drafter.feed, [token])
        self.est.t_draft = ema(self.est.t_draft, time.perf_counter() - t0, 0.2)

    def _draft_one(self, feed: bool = True) -> tuple[int, SparseDist, tuple[int, float] | None, bool]:
        """Sample one token from the quantised draft distribution and (with `feed`) feed it (worker
        thread). Also: with branching on, the runner-up token and its logit margin; and whether the
        pipeline should send its block now because the draft model is unsure of the token."""
        token, dist, logits = (draft_step if feed else draft_sample)(self.drafter, self.opt.params, self.rng)
        rival = runner_up(logits, token) if self.branching else None
        unsure = False
        if self.plan.mode == "pipeline" and self.opt.cut_below > 0:
            temperature = 1.0 if self.opt.params.greedy else self.opt.params.temperature
            unsure = cuts_block(token_prob(logits, token, temperature), self.opt.cut_below)
        return token, dist, rival, unsure

    # -- branch pre-drafting (edge_app/branches.py) -------------------------------------------
    async def _grow_branch(self) -> bool:
        """Start a branch, draft one more token on it, or send it up once it is complete. False
        when there is nothing (more) to do on a branch."""
        loop = asyncio.get_running_loop()
        if self.branch is None:
            oldest = self._oldest_block_size()
            limit = min(self.sent, oldest) if oldest is not None else 0
            base = len(self.committed)
            j = least_confident([self.rivals.get(base + i, (0, float("inf")))[1] for i in range(limit)])
            if (j is None or self.forced or self.hold_epoch is not None or base + j not in self.rivals
                    or self.rivals[base + j][1] > BRANCH_MARGIN):
                return False
            self.branch = Branch(root_pos=base + j, root=self.rivals[base + j][0])
            self.stats.branches += 1
            await self._resync_drafter()
            with self.meters.phase("draft"):
                await loop.run_in_executor(None, self._start_branch, base + j, self.branch.root)
            return True
        if self.branch.done:
            return False
        if len(self.branch.tokens) >= self.opt.branch_len:
            await self._send_branch()
            return False
        token, dist, _, _ = await self._drafter_call("draft", self._draft_one)
        self.branch.tokens.append(token)
        self.branch.dists.append(dist)
        self.stats.branch_tokens += 1
        return True

    async def _send_branch(self) -> None:
        """The complete branch goes up for the verifier to keep aside: if the pass deciding its root
        recovers exactly the root, the verifier verifies the branch next, without waiting for the
        edge. The drafter goes back to the main line (before its next main-line draft)."""
        branch = self.branch
        branch.done = True
        if self._may_send() and branch.tokens:
            branch.seq = await self._send_draft(branch.root_pos + 1, [], list(branch.tokens), branch.dists,
                                                root=branch.root)
            self.stats.branches_sent += 1
        self.needs_resync = True

    def _start_branch(self, keep: int, root: int) -> None:
        """Worker thread: cut the drafter back to the branch point and feed the branch's root."""
        self.drafter.rollback(keep)
        self.drafter.feed([root])
        self.drafter_on_branch = True

    def _drop_branch(self, decided: bool = True) -> None:
        """The branch will not be used: the drafter goes back to the main line before drafting.
        decided=False: only if its root's position is decided by now (a branch the verifier holds
        stays until the verdict on its root, which may take it)."""
        if self.branch is not None and (decided or self.branch.root_pos < len(self.committed)):
            self.branch = None
            self.needs_resync = True

    def _take_branch(self, pos: int, token: int, taken: int) -> bool:
        """A recovered `token` at `pos` that the branch foresaw: its drafts become the main line
        (the drafter's cache holds them unless it went back to the main line). taken: the seq of
        the branch the verifier took (Verdict.branch): then its drafts are in flight already,
        else they go up now. Call after the drafts were dropped; False (the branch left in place)
        when the branch foresaw something else."""
        branch = self.branch
        if taken and (branch is None or taken != branch.seq):
            raise RuntimeError(f"the verifier took branch {taken}, which the edge does not hold")
        if branch is None or branch.root_pos != pos or branch.root != token:
            return False
        self.branch = None
        self.drafted, self.dists = list(branch.tokens), list(branch.dists)
        self.sent = len(branch.tokens) if taken else 0
        if taken:
            self.sent_blocks[branch.seq] = (None, len(branch.tokens))  # waited for a pass: no round trip
            self.stats.branches_taken += 1
        self.rivals = {p: r for p, r in self.rivals.items() if p < pos}  # they were the old line's
        self.needs_resync = not self.drafter_on_branch
        self.stats.branch_hits += 1
        limit = self.opt.max_new_tokens - self.answer.generated
        self.stop_drafting = any(t in self.opt.stop_ids for t in branch.tokens) or len(branch.tokens) >= limit
        return True

    async def _drafter_call(self, phase: str, fn, *args):
        t0 = time.perf_counter()
        with self.meters.phase(phase):
            result = await asyncio.get_running_loop().run_in_executor(None, fn, *args)
        if phase == "draft":
            self.est.t_draft = ema(self.est.t_draft, time.perf_counter() - t0, 0.2)
        return result

    async def _resync_drafter(self) -> None:
        """After a correction, roll the draft's KV cache back to the committed prefix."""
        if not self.needs_resync:
            return
        self.needs_resync = False
        with self.meters.phase("rollback"):  # committed + the drafts still on the main line
            target = list(self.committed) + list(self.drafted)
            await asyncio.get_running_loop().run_in_executor(None, resync, self.drafter, target)
        self.drafter_on_branch = False

    # -- sending -----------------------------------------------------------------------------
    async def _send_block(self, wait: bool) -> None:
        new = self.drafted[self.sent:]
        # a forced token (the paper variant's recovered one) is committed already: it goes up first
        pos = len(self.committed) - len(self.forced) + self.sent
        seq = await self._send_draft(pos, self.forced, new, self.dists[self.sent:], wait=wait)
        self.sent_blocks[seq] = (time.perf_counter(), len(self.forced) + len(new))
        self.stats.block_sizes.append(len(new))
        self.sent = len(self.drafted)
        self.forced = []

    async def _send_draft(self, pos: int, forced: list[int], new: list[int], dists: list[SparseDist],
                          **fields) -> int:
        """One Draft of forced + new ids at `pos` in the current epoch, with what the variant sends
        up for them and the next seq (returned); fields: Draft's wait or root."""
        self.seq += 1
        payload = self.variant.uplink(self.opt.params.greedy, forced, new, dists)
        await self.link.send(codec.Draft(epoch=self._send_epoch(), pos=pos, ids=forced + new, forced=len(forced),
                                         seq=self.seq, **fields, **payload))
        return self.seq

    # -- what the cloud says -----------------------------------------------------------------
    def on_message(self, msg) -> None:
        if isinstance(msg, codec.Prefilled):
            if msg.epoch != self.early_epoch and self.sent:
                self._resend_early_blocks()
            self.early_epoch = None
            self.prefilled_at = time.perf_counter()
            self._adopt_epoch(msg.epoch)
            if msg.token is not None:  # the answer's first token, sampled from the prefill's row
                self.stats.filled += 1
                self._on_cloud_tokens(msg.committed_len - 1, [msg.token])
        elif self.epoch is None:
            return  # left over from an earlier answer on this session
        elif isinstance(msg, codec.Tokens):
            self.stats.filled += len(msg.ids)
            self._on_cloud_tokens(msg.pos, list(msg.ids))
            self._adopt_epoch(msg.epoch)
        elif isinstance(msg, codec.Verdict):
            if msg.epoch == self.epoch:  # else: a verdict on drafts already thrown away
                self._on_verdict(msg)
        else:
            raise RuntimeError(f"unexpected {type(msg).__name__} from the verifier during drafting")

    def _resend_early_blocks(self) -> None:
        """Blocks sent during the prefill in a predicted epoch that turned out wrong (the cloud
        moved the epoch in a message still on its way): it dropped them, so they go up again."""
        self.sent = 0
        self.sent_blocks.clear()

    def _adopt_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        if self.hold_epoch is not None and epoch > self.hold_epoch:
            self.hold_epoch = None

    def _on_cloud_tokens(self, pos: int, ids: list[int]) -> None:
        """Tokens the cloud committed itself (the first token from its prefill, filled tokens).

        A drafted token at the same position that matches is simply committed. One that differs
        makes every draft stale; if some were sent, the cloud will find them stale too and move to
        a new epoch, which we wait to hear before sending more.
        """
        self._drop_branch()
        for i, token in enumerate(ids):
            if pos + i != len(self.committed):
                raise RuntimeError(f"the verifier committed position {pos + i}, the edge holds {len(self.committed)}")
            if self.drafted and self.drafted[0] == token:
                self.drafted, self.dists = self.drafted[1:], self.dists[1:]
                self.sent = max(0, self.sent - 1)
            elif self.drafted:
                if self.sent:
                    self.hold_epoch = self.epoch
                self._drop_drafts(len(self.drafted))
            else:  # nothing drafted here yet: the drafter must still be fed the token
                self.needs_resync = True
            self.answer.commit([token], self.drafted)
        if not self.sent:
            self.sent_blocks.clear()  # what was in flight the cloud committed itself: no verdict comes

    def _on_verdict(self, msg: codec.Verdict) -> None:
        self._measure(msg)
        self.stats.rounds += 1
        n = msg.accepted
        accepted = self.drafted[:n]
        self.stats.accepted += n
        self.drafted, self.dists = self.drafted[n:], self.dists[n:]
        self.sent = max(0, self.sent - n)
        if not msg.kind.corrects:
            self._adopt_epoch(msg.new_epoch)
            self._update_acceptance()
            self.answer.commit(accepted, self.drafted)
            self._drop_branch(decided=False)
            return
        # a token the edge did not draft is committed: every later draft is stale
        rejected_dist = self.dists[0] if self.dists else None
        if msg.kind is VerdictKind.BONUS:
            self.stats.bonus += 1
            self._drop_drafts(len(self.drafted))
        else:
            self.stats.rejected += 1
            self.stats.recovered += 1
            self._drop_drafts(len(self.drafted) - 1)  # the rejected one was tested, not stale
        if msg.kind is VerdictKind.RECOVER_ON_EDGE:
            token = self.variant.recover_on_edge(msg, rejected_dist, self.rng)
            self.forced = [token]
        else:
            token = msg.token
        if not (msg.kind is VerdictKind.RECOVERED and self._take_branch(len(self.committed) + n, token, msg.branch)):
            self._drop_branch()
        self._adopt_epoch(msg.new_epoch)
        self._update_acceptance()
        self.answer.commit(accepted + [token], [])

    def _drop_drafts(self, stale: int) -> None:
        self.stats.stale_drafts += max(0, stale)
        self.drafted, self.dists, self.sent = [], [], 0
        self.sent_blocks.clear()  # blocks in flight are stale: no verdict will answer them
        self.stop_drafting = False
        self.needs_resync = True

    def _measure(self, msg: codec.Verdict) -> None:
        sent_at, size = self.sent_blocks.pop(msg.seq, (None, 0))
        self.stats.verify_s.append(msg.verify_s)
        self.est.verify.observe(msg.fed or size or 1, msg.verify_s)
        # a block sent before Prefilled came down waited for the cloud's prefill: not a round trip
        # (nor did the first verdict of an answer)
        if sent_at is not None and self.stats.rounds > 0 and sent_at >= (self.prefilled_at or float("inf")):
            rtt = max(0.0, time.perf_counter() - sent_at - msg.verify_s)
            self.est.t_rtt = ema(self.est.t_rtt, rtt, 0.3)

    def _update_acceptance(self) -> None:
        if self.stats.accepted + self.stats.rejected >= 4:  # a few tests before trusting the rate
            self.est.acceptance = acceptance_rate(self.stats.accepted, self.stats.rejected)
