"""The cloud's half of one round: verify a block of drafted ids in one forward pass.

Vocabulary (the README's, also on the wire and in /metrics):
  drafted    ids the edge sampled from its draft distribution q and sent in a block
  accepted   drafted ids kept (a prefix of the block)
  recovered  the token the cloud samples at the first rejected position, from norm(max(0, p - q))
  bonus      the token sampled after a block accepted whole when the edge waits for one
  committed  the prefix both sides agree on: prompt + accepted + recovered / bonus / filled tokens

The KV cache between passes (positions are absolute token indices):
  cache_len == len(committed) - 1   the last committed token (recovered, bonus, filled, the
                                    Prefilled token) is not fed yet, or
  cache_len == len(committed)       and `pending_row` holds the target's logits [V] for position
                                    len(committed): kept from the last row of a pass accepted
                                    whole, it verifies the next block's first id with no extra pass.

The rule that accepts and recovers is a strategy object: ExactRule here (the exact rejection
step, and greedy), PaperRule in cloud/paper_variant.py (scalar q up, top-K p down). Its math runs
in numpy on the host or in torch on the logits' device (cloud/rule_impl.py); either way the rows
stay where the target computed them and only token ids come back.

Randomness, per session: a sampled pass over n drafted ids draws n + 1 uniforms from the session's
RNG (u[j] tests drafted j, u[n] draws the recovered or bonus token); a token of the cloud's own
(Prefilled, filled, cloud-only) draws one. Greedy draws none.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from codec import VerdictKind
from cloud.draft_queue import Block
from cloud.errors import SessionError
from cloud.rule_impl import IMPLS
from sampling import Outcome, SamplingParams, verify_block_greedy

if TYPE_CHECKING:
    from cloud.session import VerifySession


@dataclass
class PassResult:
    """What one verify pass decided, before it is applied to the session."""

    accepted: int  # drafted ids kept
    token: int | None  # the recovered or bonus token, None for ACCEPTED and RECOVER_ON_EDGE
    kind: VerdictKind
    keep_cache: int  # cache length after the pass: the committed ids it holds
    fed: int  # ids the forward pass took (its size: the edge learns the pass time per size)
    pending_row: torch.Tensor | None  # [V] logits (target's device) for position len(committed), when the cache holds it all
    top_ids: list[int] | None = None  # the target's top-K at the rejection (paper variant)
    top_probs: list[float] | None = None
    verify_s: float = 0.0  # the pass's seconds on the worker
    branch: int = 0  # seq of the branch the recovered token took (queued for the next pass)


@dataclass
class Rejection:
    """What a rule says at the first rejected position."""

    kind: VerdictKind
    token: int | None
    pending_row: torch.Tensor | None = None
    top_ids: list[int] | None = None
    top_probs: list[float] | None = None


class ExactRule:
    """The exact variant: accept each drafted x with min(1, p(x) / q(x)) and recover from
    norm(max(0, p - q)), with q the draft's quantised distribution the edge sent (greedy: accept
    while x is the target's argmax, recover the argmax). The output follows p exactly.
    impl: "numpy" or "torch", where the math runs (cloud/rule_impl.py)."""

    name = "exact"
    allows_fill = True  # filled tokens are sampled from p: exact
    first_token_from_prefill = True  # Prefilled brings the answer's first token, sampled from p

    def __init__(self, params: SamplingParams, impl: str = "numpy"):
        self.params = params
        self.impl = IMPLS[impl]

    def reset(self) -> None:
        """A new prompt: nothing carries over."""

    def check(self, block: Block, queue_empty: bool) -> None:
        """What a block must carry in this variant; SessionError if it does not."""
        if block.forced:
            raise SessionError("bad_message", "a forced token is only allowed right after a rejection")
        if not self.params.greedy and block.dists is None and block.drafted:
            raise SessionError("bad_message", "sampling drafts must carry their distributions")

    def sample(self, row: torch.Tensor, rng: np.random.Generator) -> int:
        """One token from the target's own distribution (argmax when greedy): a bonus, filled,
        cloud-only or Prefilled token. row: [V] logits on the target's device."""
        if self.params.greedy:
            return self.impl.argmax([row])[0]
        return self.impl.sample(row, self.params, rng.random())

    def decide(self, block: Block, rows: list[torch.Tensor], bonus: bool,
               rng: np.random.Generator) -> tuple[Outcome, int | None]:
        """rows: [n + 1] target logits [V]: row j scores drafted id j, row n the position after the
        block. bonus: a block accepted whole earns a bonus token (from row n). Returns the outcome
        (accepted, recovered) and the bonus token or None, as sampling.verify_block_u does."""
        drafted = block.drafted
        n = len(drafted)
        if self.params.greedy:
            best = self.impl.argmax(rows[:n + bonus])
            outcome = verify_block_greedy(drafted, best[:n])
            return outcome, (best[n] if bonus and outcome.recovered is None else None)
        if not drafted and not bonus:
            return Outcome(0, None), None
        accepted, token = self.impl.exact(drafted, block.dists[block.forced:], rows, self.params,
                                          rng.random(n + 1), bonus)
        if accepted < n:
            return Outcome(accepted, token), None
        return Outcome(n, None), token

    def reject(self, outcome: Outcome, row: torch.Tensor) -> Rejection:
        """The verdict at the first rejected position (row: its target logits [V])."""
        return Rejection(VerdictKind.RECOVERED, outcome.recovered)

    def observe(self, kind: VerdictKind) -> None:
        """A verdict of this kind was applied."""


def verify_pass(session: VerifySession, block: Block) -> PassResult:
    """One verify pass: steps 1-5 below. Reads the session, feeds the engine, draws from the RNG;
    changes nothing else, so it runs on the worker thread while the event loop serves other
    sessions. (The scheduler runs the same three calls as a work item.)"""
    t0 = time.perf_counter()
    # 1. feed: the committed ids the cache lacks, then the block's ids
    feed = pass_feed(session, block)
    # 2. one forward pass
    rows = session.engine.forward(feed)  # [len(feed), V]
    # 3-5. the accept / recover rule over the rows
    result = decide_pass(session, block, rows)
    result.verify_s = time.perf_counter() - t0
    return result


def pass_feed(session: VerifySession, block: Block) -> list[int]:
    """1. What the pass feeds: the committed ids the cache lacks (at most one), then the block's
    ids (forced first)."""
    return session.committed[session.engine.cache_len:] + block.ids


def decide_pass(session: VerifySession, block: Block, rows: torch.Tensor) -> PassResult:
    """Steps 3-5, given rows: [len(feed), V] from step 2, one forward pass over pass_feed: row i
    is the target's next-token logits after feed[i], on the target's device."""
    committed, rule = session.committed, session.rule
    n_unfed = len(rows) - len(block.ids)

    # 3. the rows that score drafted ids 0..n-1 and the position after the block (row n); a row
    # before the feed is the kept pending row
    first = n_unfed + block.forced - 1
    drafted = block.drafted
    target_rows = [rows[first + j] if first + j >= 0 else session.pending_row for j in range(len(drafted) + 1)]

    # 4. the accept / recover rule; a bonus token if the block is accepted whole, the edge waits
    # for one and the answer goes on
    bonus = bool(block.wait) and session.budget_left > len(block.ids) and block.ids[-1] != session.eos_id
    outcome, bonus_token = rule.decide(block, target_rows, bonus, rng=session.rng)
    n = outcome.accepted
    keep = len(committed) + block.forced + n  # committed ids the cache holds after the pass

    # 5a. rejected at drafted id n: the rule says what comes instead
    if n < len(drafted):
        r = rule.reject(outcome, target_rows[n])
        return PassResult(n, r.token, r.kind, keep, len(rows), r.pending_row, r.top_ids, r.top_probs)

    # 5b. accepted whole: the bonus token ...
    if bonus_token is not None:
        return PassResult(n, bonus_token, VerdictKind.BONUS, keep, len(rows), None)
    # ... else the last row verifies the next block's first id
    return PassResult(n, None, VerdictKind.ACCEPTED, keep, len(rows), rows[-1])


def apply_pass(session: VerifySession, block: Block, result: PassResult) -> int:
    """Commit a pass's outcome (event loop); returns the epoch the edge drafts in from now on."""
    # 6. commit the forced and accepted ids, and the recovered or bonus token
    session.committed += block.ids[:block.forced + result.accepted]
    if result.token is not None:
        session.committed.append(result.token)

    # 7. roll the cache back to what it fed of the committed prefix
    session.engine.rollback(result.keep_cache)
    session.pending_row = result.pending_row

    # 8. counters, and the variant's own state
    session.passes += 1
    session.drafted += len(block.drafted)
    session.accepted += result.accepted
    session.rule.observe(result.kind)

    # 9. a token the edge did not draft makes every later draft stale: a new epoch; a branch the
    # edge drafted after exactly this recovered token goes on in it, verified without a round trip
    if result.kind.corrects:
        branch = None
        if result.kind is VerdictKind.RECOVERED:
            branch = session.pop_branch(len(session.committed) - 1, result.token)
        session.correct()
        if branch is not None:
            result.branch = session.queue_branch(branch)
    return session.epoch
