"""Branch pre-drafting: prepare for the likeliest rejection while a block is in flight.

Once the main line holds a couple of drafts past the oldest block in flight (or the pipeline has
reached its run-ahead), the edge drafts a short continuation after the most likely *alternative*
token at the least confident position of that block (the drafted token whose logit beat the
runner-up by the smallest margin, if that margin is small). The complete branch goes up as a
Draft with `root` = the alternative (protocol version 3): the verifier keeps it aside, and if the
pass deciding that position recovers exactly the root, it verifies the branch next, with no round
trip and no drafting in between; the Verdict names the branch it took. A branch the verifier did
not take (it came too late) but whose root was recovered still saves the edge its drafting: it is
sent at once. Any other verdict discards the branch on both sides, and the drafter's cache goes
back to the main line (one batched feed) before it drafts there again.

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
