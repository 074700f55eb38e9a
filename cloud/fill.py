"""Bubble filling, as a strategy the session plugs in (Prompt.fill, exact variant only).

After a correction, and while the edge drafts its first block after a prompt, the verifier has
nothing fresh to verify. With filling on it commits target tokens of its own meanwhile, one per
forward pass, sampled from p exactly like a bonus token (so the output stays exact), and sends each
as Tokens with the session's epoch. A filled token does not change the epoch by itself: the edge
keeps drafts that match it. When a draft of the current epoch arrives for positions already
filled, the matching ids are dropped from it; a mismatch makes the edge's drafts stale (the
session starts a new epoch, carried by the next message that changes the committed prefix).

Timing. A filled token's pass feeds one row on its own, which costs nearly a whole pass, while the
same row rides almost free in the verify pass of the edge's next block. Filling pays while that pass
ends before the block arrives; a pass that the block has to wait for only delays it. So after a
correction the verifier fills only while a pass can end before the block is due (the
correction-to-block turnaround it has measured on this session), waits for the block otherwise,
and fills after all once the block is late by half a pass (the edge may have nothing more to send).
The prompt's bubble is timed the same way, from its own measurement (Prefilled to the first block):
an edge that prefills faster than its verifier drafted its first block during the cloud's prefill
and sends it the moment Prefilled arrives (a fill pass there delayed every answer's first verify
pass by ~0.2 s on this machine's pair), while one that prefills more slowly (a Pi beside a GPU)
leaves a long bubble that filling streams through.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    from cloud.session import VerifySession

LATE = 0.5  # a block this many fill passes past its due time is not coming soon: fill after all


@dataclass
class FillTiming:
    """What a session has measured about its bubbles (seconds); kept across its answers."""

    turnaround: float | None = None  # a correction -> the edge's next fresh block arrives
    first_block: float | None = None  # the prompt's end (Prefilled) -> the edge's first block arrives
    pass_s: float | None = None  # one filled token's forward pass

    def observe_turnaround(self, seconds: float) -> None:
        self.turnaround = _ema(self.turnaround, seconds)

    def observe_first_block(self, seconds: float) -> None:
        self.first_block = _ema(self.first_block, seconds)

    def observe_pass(self, seconds: float) -> None:
        self.pass_s = _ema(self.pass_s, seconds)


class FillTimings:
    """The bubble timing of each device the verifier has served (a token's or a peer address's
    sessions), so that a new session starts from what its device's last sessions measured: a
    one-shot answer opens a fresh session, and its prompt's bubble would otherwise always be
    filled. At most `kept` devices, the least recently seen forgotten first."""

    def __init__(self, kept: int = 4096) -> None:
        self.kept = kept
        self.by_key: dict[str, FillTiming] = {}

    def of(self, key: str | None) -> FillTiming:
        """The timing `key`'s sessions share (a new one for a device not seen, or None)."""
        if key is None:
            return FillTiming()
        timing = self.by_key.pop(key, None) or FillTiming()
        self.by_key[key] = timing  # (re)inserted last: dicts keep insertion order
        while len(self.by_key) > self.kept:
            self.by_key.pop(next(iter(self.by_key)))
        return timing


class NoFill:
    """The verifier waits for drafts (sync mode, the paper variant, a busy verifier)."""

    enabled = False

    def open_bubble(self) -> None:
        """Nothing fresh to verify from now on (a correction)."""

    def close_bubble(self, arrived_at: float | None = None) -> None:
        """Fresh drafts arrived (at `arrived_at`, on the fill clock)."""

    def wants_token(self, session: VerifySession) -> bool:
        return False

    def hold_s(self) -> float:
        """Seconds to wait for the edge's block before filling (0: fill now)."""
        return 0.0

    def observe_pass(self, seconds: float) -> None:
        """A filled token's pass took `seconds`."""


class BubbleFill(NoFill):
    enabled = True

    def __init__(self, timing: FillTiming | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self.timing = timing if timing is not None else FillTiming()
        self.clock = clock
        self.in_bubble = True  # the edge is drafting its first block (or still prefilling)
        self.opened_at = clock()
        self.after_correction = False  # the prompt's bubble, timed apart (FillTiming.first_block)

    def open_bubble(self) -> None:
        self.in_bubble = True
        self.opened_at = self.clock()
        self.after_correction = True

    def close_bubble(self, arrived_at: float | None = None) -> None:
        if self.in_bubble and arrived_at is not None:
            seconds = max(0.0, arrived_at - self.opened_at)
            if self.after_correction:
                self.timing.observe_turnaround(seconds)
            else:
                self.timing.observe_first_block(seconds)
        self.in_bubble = False

    def wants_token(self, session: VerifySession) -> bool:
        """In a bubble, nothing queued, and the answer not over: commit a token of our own."""
        return (self.in_bubble and not session.queue and session.budget_left > 0
                and session.committed[-1] != session.eos_id)

    def hold_s(self) -> float:
        t = self.timing
        wait = t.turnaround if self.after_correction else t.first_block
        if wait is None or t.pass_s is None:
            return 0.0  # nothing measured yet: fill
        now = self.clock()
        due = self.opened_at + wait
        if now + t.pass_s <= due:
            return 0.0  # a pass ends before the block is due: free
        return max(0.0, due + LATE * t.pass_s - now)

    def observe_pass(self, seconds: float) -> None:
        self.timing.observe_pass(seconds)


def _ema(previous: float | None, x: float, alpha: float = 0.3) -> float:
    return x if previous is None else (1 - alpha) * previous + alpha * x
