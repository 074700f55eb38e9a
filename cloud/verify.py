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
step, and greedy), PaperRule in cloud/paper_variant.py (scalar q up, top-K p down).
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
from sampling import (
    Outcome,
    SamplingParams,
    sample_dense,
    target_probs,
    verify_block,
    verify_block_greedy,
)

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
    pending_row: torch.Tensor | None  # [V] logits for position len(committed), when the cache holds it all
    top_ids: list[int] | None = None  # the target's top-K at the rejection (paper variant)
    top_probs: list[float] | None = None
    verify_s: float = 0.0  # the pass's seconds on the worker


@dataclass
class Rejection:
    """What a rule says at the first rejected position."""

    kind: VerdictKind
    token: int | None
    pending_row: torch.Tensor | None = None
    top_ids: list[int] | None = None
    top_probs: list[float] | None = None


def sample_target(row: torch.Tensor, params: SamplingParams, rng: np.random.Generator) -> int:
    """One token from the target's own distribution (argmax when greedy): a bonus, filled,
    cloud-only or Prefilled token. row: [V] logits."""
    if params.greedy:
        return int(torch.argmax(row))
    return sample_dense(target_probs(row.double().numpy(), params), rng)


class ExactRule:
    """The exact variant: accept each drafted x with min(1, p(x) / q(x)) and recover from
    norm(max(0, p - q)), with q the draft's quantised distribution the edge sent (greedy: accept
    while x is the target's argmax, recover the argmax). The output follows p exactly."""

    name = "exact"
    allows_fill = True  # filled tokens are sampled from p: exact
    first_token_from_prefill = True  # Prefilled brings the answer's first token, sampled from p

    def __init__(self, params: SamplingParams):
        self.params = params

    def reset(self) -> None:
        """A new prompt: nothing carries over."""

    def check(self, block: Block, queue_empty: bool) -> None:
        """What a block must carry in this variant; SessionError if it does not."""
        if block.forced:
            raise SessionError("bad_message", "a forced token is only allowed right after a rejection")
        if not self.params.greedy and block.dists is None and block.drafted:
            raise SessionError("bad_message", "sampling drafts must carry their distributions")

    def decide(self, block: Block, rows: list[torch.Tensor], rng: np.random.Generator) -> Outcome:
        """rows: [k] target logits [V] at the positions of the k drafted ids."""
        drafted = block.drafted
        if self.params.greedy:
            return verify_block_greedy(drafted, [int(torch.argmax(r)) for r in rows])
        probs = [target_probs(r.double().numpy(), self.params) for r in rows]  # [k] float64[V]
        return verify_block(drafted, block.dists[block.forced:], probs, rng)

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
    is the target's next-token logits after feed[i]."""
    committed, rule = session.committed, session.rule
    n_unfed = len(rows) - len(block.ids)

    # 3. the row that predicts drafted id j; before the feed, that is the kept pending row
    first = n_unfed + block.forced - 1
    drafted = block.drafted
    target_rows = [rows[first + j] if first + j >= 0 else session.pending_row for j in range(len(drafted))]

    # 4. the accept / recover rule
    outcome = rule.decide(block, target_rows, rng=session.rng) if drafted else Outcome(0, None)
    n = outcome.accepted
    keep = len(committed) + block.forced + n  # committed ids the cache holds after the pass

    # 5a. rejected at drafted id n: the rule says what comes instead
    if n < len(drafted):
        r = rule.reject(outcome, target_rows[n])
        return PassResult(n, r.token, r.kind, keep, len(rows), r.pending_row, r.top_ids, r.top_probs)

    # 5b. accepted whole: a bonus token if the edge waits for one and the answer goes on ...
    if block.wait and session.budget_left > len(block.ids) and block.ids[-1] != session.eos_id:
        bonus = sample_target(rows[-1], session.params, session.rng)
        return PassResult(n, bonus, VerdictKind.BONUS, keep, len(rows), None)
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

    # 9. a token the edge did not draft makes every later draft stale: a new epoch
    if result.kind.corrects:
        session.correct()
    return session.epoch
