"""What the edge needs from a draft model: one sequence, its next-token logits, feed, roll back.

The llama.cpp drafter (edge_app.drafter.Drafter), the benchmark's replay drafter and the tests'
tiny torch drafters all implement this protocol; the speculative loop knows nothing else.
"""
from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np

from sampling import common_prefix_len, reusable_prefix

__all__ = ["DraftModel", "common_prefix_len", "resync", "reusable_prefix"]


@runtime_checkable
class DraftModel(Protocol):
    """One token sequence held in a KV cache. `length` tokens are cached; after `feed`,
    `logits()` is the next-token distribution at position `length`."""

    @property
    def length(self) -> int:
        """Tokens held in the cache."""

    @property
    def tokens(self) -> list[int]:
        """The cached tokens, in order."""

    def prefill(self, ids: list[int]) -> None:
        """Make the sequence `ids`, reusing the longest cached prefix it shares."""

    def feed(self, ids: list[int]) -> None:
        """Append ids to the sequence."""

    def rollback(self, length: int) -> None:
        """Forget positions from `length` on."""

    def logits(self) -> np.ndarray:
        """float32[V] next-token logits after the last fed token."""


def resync(drafter: DraftModel, committed: list[int]) -> None:
    """Make the drafter's sequence `committed`: roll back to the longest prefix it shares, feed the rest.

    At least one token is fed, so that logits() is the distribution after committed[-1].
    """
    keep = min(drafter.length, len(committed) - 1)
    keep = common_prefix_len(drafter.tokens[:keep], committed)
    drafter.rollback(keep)
    drafter.feed(committed[keep:])
