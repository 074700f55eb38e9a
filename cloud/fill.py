"""Bubble filling, as a strategy the session plugs in (Prompt.fill, exact variant only).

After a correction, and while the edge drafts its first block after a prompt, the verifier has
nothing fresh to verify. With filling on it commits target tokens of its own meanwhile, one per
forward pass, sampled from p exactly like a bonus token (so the output stays exact), and sends each
as Tokens with the session's epoch. A filled token does not change the epoch by itself: the edge
keeps drafts that match it. When a draft of the current epoch arrives for positions already
filled, the matching ids are dropped from it; a mismatch makes the edge's drafts stale (the
session starts a new epoch, carried by the next message that changes the committed prefix).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from cloud.draft_queue import Block

if TYPE_CHECKING:
    from cloud.session import VerifySession


class NoFill:
    """The verifier waits for drafts (sync mode, the paper variant, a busy verifier)."""

    enabled = False

    def open_bubble(self) -> None:
        """Nothing fresh to verify from now on (a prompt, a correction)."""

    def close_bubble(self) -> None:
        """Fresh drafts arrived."""

    def wants_token(self, session: VerifySession) -> bool:
        return False

    def overlap(self, block: Block, committed: list[int]) -> Block | None:
        """The block without ids the cloud filled itself; None if it contradicts them."""
        return block


class BubbleFill(NoFill):
    enabled = True

    def __init__(self) -> None:
        self.in_bubble = True  # the edge is drafting its first block: fill the wait

    def open_bubble(self) -> None:
        self.in_bubble = True

    def close_bubble(self) -> None:
        self.in_bubble = False

    def wants_token(self, session: VerifySession) -> bool:
        """In a bubble, nothing queued, and the answer not over: commit a token of our own."""
        return (self.in_bubble and not session.queue and session.budget_left > 0
                and session.committed[-1] != session.eos_id)

    def overlap(self, block: Block, committed: list[int]) -> Block | None:
        if block.pos >= len(committed) or block.forced:
            return block
        n = min(len(block.ids), len(committed) - block.pos)
        if block.ids[:n] != committed[block.pos:block.pos + n]:
            return None  # the edge drafted something else at a filled position: stale
        return block.slice(n)
