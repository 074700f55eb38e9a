"""What the edge needs from a draft model: one sequence, its next-token logits, feed, roll back.

The llama.cpp drafter (edge_app.drafter.Drafter), the benchmark's replay drafter and the tests'
tiny torch drafters all implement this protocol; the speculative loop knows nothing else.
"""
from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np

from sampling import SamplingParams, SparseDist, common_prefix_len, draft_dist, reusable_prefix, sample_sparse

__all__ = ["DraftModel", "TokenListDrafter", "common_prefix_len", "draft_sample", "draft_step", "resync", "reusable_prefix"]


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


def draft_sample(drafter: DraftModel, params: SamplingParams,
                 rng: np.random.Generator) -> tuple[int, SparseDist, np.ndarray]:
    """Sample the next token from the quantised draft distribution (its argmax when greedy), without
    feeding it. Returns (token, the distribution it was sampled from, the logits [V] it came from)."""
    logits = drafter.logits()
    dist = draft_dist(logits, params)
    token = int(dist.ids[0]) if params.greedy else sample_sparse(dist, rng)
    return token, dist, logits


def draft_step(drafter: DraftModel, params: SamplingParams,
               rng: np.random.Generator) -> tuple[int, SparseDist, np.ndarray]:
    """draft_sample, then feed the token: the drafter's logits() are then those after it."""
    token, dist, logits = draft_sample(drafter, params, rng)
    drafter.feed([token])
    return token, dist, logits


class TokenListDrafter:
    """The bookkeeping every DraftModel shares: the sequence as a token list, prefix reuse on
    prefill, rollback by truncation. Subclasses compute in `feed` / `logits` (and extend
    `rollback` when they hold a cache of their own)."""

    def __init__(self) -> None:
        self._tokens: list[int] = []

    @property
    def length(self) -> int:
        return len(self._tokens)

    @property
    def tokens(self) -> list[int]:
        return list(self._tokens)

    def rollback(self, length: int) -> None:
        del self._tokens[length:]

    def feed(self, ids: list[int]) -> None:
        self._tokens += [int(t) for t in ids]

    def prefill(self, ids: list[int]) -> None:
        keep = reusable_prefix(self._tokens, ids)
        self.rollback(keep)
        self.feed(ids[keep:])
