"""Branch pre-drafting: use the edge's idle wait to prepare for the likeliest rejection.

When the pipeline has reached its run-ahead and would only wait for a verdict, the drafter is idle.
Instead it drafts a short continuation after the most likely *alternative* token at the least
confident position of the block in flight (the drafted token whose logit beat the runner-up by the
smallest margin). If the verdict then rejects exactly there and the cloud's recovered token is that
alternative, the edge already holds the next drafts, with their distributions and its KV cache:
it sends them at once instead of drafting them after the correction. Any other verdict discards
the branch, and the drafter's cache is rolled back to the main line (one batched feed).

Exactness is untouched: branch tokens are drafted tokens like any other, sampled from the draft
distribution they travel with, and the cloud verifies every one of them.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from sampling import SparseDist


@dataclass
class Branch:
    """A continuation drafted after `root` at absolute position `root_pos` (not on the main line)."""

    root_pos: int
    root: int
    tokens: list[int] = field(default_factory=list)
    dists: list[SparseDist] = field(default_factory=list)
    done: bool = False  # complete: sent up (or could not be), no more tokens
    seq: int = 0  # the Draft it went up in (0: not sent)


def runner_up(logits: np.ndarray, chosen: int) -> tuple[int, float]:
    """(the likeliest token other than `chosen`, logit margin chosen - runner-up). logits: [V]."""
    top2 = np.argpartition(logits, -2)[-2:]
    other = int(top2[0] if int(top2[1]) == chosen else top2[1])
    if other == chosen:  # chosen was not in the top two (a sampled draft): the top one is the rival
        other = int(top2[np.argmax(logits[top2])])
    return other, float(logits[chosen] - logits[other])


def least_confident(margins: list[float]) -> int | None:
    """Index of the smallest margin, or None for none."""
    return int(np.argmin(margins)) if margins else None
