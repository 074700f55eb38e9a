"""The paper's approximate variant, as a rule the verify step plugs in (`--variant paper`).

Uplink: one scalar q(x) per drafted id instead of its distribution. Verify: accept x with
min(1, p(x) / q(x)). On a rejection the cloud cannot form max(0, p - q) without q, so it sends the
target's top-K p down (RECOVER_ON_EDGE) and the edge samples the recovered token itself; that
token comes back as the forced first id of the edge's next block, committed without a test.
Only approximately the target's distribution (bench/drift.py measures how far off). Greedy runs
exactly as the exact variant.
"""
from __future__ import annotations

import numpy as np
import torch

from codec import VerdictKind
from cloud.draft_queue import Block
from cloud.errors import SessionError
from cloud.verify import ExactRule, Rejection
from sampling import Outcome, SamplingParams, accepts


class PaperRule(ExactRule):
    name = "paper"
    allows_fill = False  # a filled token would race the edge's own recovered one
    # the paper's protocol, reproduced for comparison: the first token is drafted and verified
    # like any other (so its drift can be measured too)
    first_token_from_prefill = False

    def __init__(self, params: SamplingParams, top_k: int = 8, impl: str = "numpy"):
        super().__init__(params, impl)
        self.top_k = top_k
        self.awaiting_forced = False  # after RECOVER_ON_EDGE: the next block starts with the token

    def reset(self) -> None:
        self.awaiting_forced = False

    def check(self, block: Block, queue_empty: bool) -> None:
        first_after_rejection = self.awaiting_forced and queue_empty
        if first_after_rejection and not block.forced:
            raise SessionError("bad_message", "the paper variant expects the recovered token first")
        if block.forced and not first_after_rejection:
            raise SessionError("bad_message", "a forced token is only allowed right after a rejection")
        if not self.params.greedy and block.q_scalar is None and block.drafted:
            raise SessionError("bad_message", "paper-variant drafts must carry q(x)")

    def decide(self, block: Block, rows: list[torch.Tensor], bonus: bool,
               rng: np.random.Generator) -> tuple[Outcome, int | None]:
        """As ExactRule.decide, with the scalar q(x) the edge sent: accept x with min(1, p(x)/q(x))
        (u[j] q < p, as the exact rule tests); nothing is recovered here (the edge does it)."""
        if self.params.greedy:
            return super().decide(block, rows, bonus, rng)
        drafted = block.drafted
        n = len(drafted)
        if not drafted and not bonus:
            return Outcome(0, None), None
        uniforms = rng.random(n + 1)
        q = block.q_scalar[block.forced:]
        for j, (x, q_x, p_x) in enumerate(zip(drafted, q, self.impl.token_probs(rows[:n], drafted, self.params))):
            if not accepts(x, q_x, p_x, uniforms[j]):
                return Outcome(j, None), None
        return Outcome(n, None), (self.impl.sample(rows[n], self.params, uniforms[n]) if bonus else None)

    def reject(self, outcome: Outcome, row: torch.Tensor) -> Rejection:
        if self.params.greedy:
            return super().reject(outcome, row)
        top_ids, top_probs = self.impl.top_k(row, self.params, self.top_k)
        # the cache holds every committed id: the row stays pending for the position after them
        return Rejection(VerdictKind.RECOVER_ON_EDGE, None, row, top_ids, top_probs)

    def observe(self, kind: VerdictKind) -> None:
        self.awaiting_forced = kind is VerdictKind.RECOVER_ON_EDGE
