"""Token sequences: the one common-prefix helper the edge's drafter and the cloud's cache share."""
from __future__ import annotations

from collections.abc import Sequence


def common_prefix_len(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common prefix of two token sequences."""
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def reusable_prefix(cached: Sequence[int], ids: Sequence[int]) -> int:
    """How many cached positions a new sequence `ids` can keep: their common prefix, but never all
    of `ids` (at least one token is fed, so that there are logits for the next position)."""
    return min(common_prefix_len(cached, ids), len(ids) - 1)
