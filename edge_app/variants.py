"""How a drafted block goes up and how a rejection comes back: the exact rule or the paper's variant.

The speculative loop calls one of these two strategies and has no other knowledge of variants.
- ExactVariant (default): sampled drafts carry the sparse q they were sampled from; the cloud runs
  the complete accept / recover rule and sends the recovered token down. Output is exactly the
  target's distribution.
- PaperVariant: drafts carry only q(x); on a rejection the cloud sends its top-K p down and the
  edge samples the recovered token from norm(max(0, p_topK - q)), which is biased by the top-K
  truncation. The recovered ("forced") token goes up first in the next Draft.
"""
from __future__ import annotations

import numpy as np

import codec
from sampling import SparseDist, recover_from_top_k


class ExactVariant:
    name = "exact"

    def uplink(self, greedy: bool, forced: list[int], drafted: list[int],
               dists: list[SparseDist]) -> dict:
        """The distribution fields of a Draft: none when greedy, else one SparseDist per id."""
        if greedy:
            return {}
        return {"dists": [point_mass(t) for t in forced] + list(dists)}

    def recover_on_edge(self, verdict: codec.Verdict, rejected: SparseDist | None,
                        rng: np.random.Generator) -> int:
        raise RuntimeError("the verifier asked the edge to recover a token, but this session "
                           "uses the exact variant (the cloud recovers)")


class PaperVariant:
    name = "paper"

    def uplink(self, greedy: bool, forced: list[int], drafted: list[int],
               dists: list[SparseDist]) -> dict:
        """q(x) for each id (1.0 for a forced one): all the cloud's accept test needs."""
        if greedy:
            return {}
        return {"q_scalar": [1.0] * len(forced) + [d.prob(t) for d, t in zip(dists, drafted)]}

    def recover_on_edge(self, verdict: codec.Verdict, rejected: SparseDist | None,
                        rng: np.random.Generator) -> int:
        """Sample the recovered token from the cloud's top-K p and our own q at that position."""
        return recover_from_top_k(np.array(verdict.top_ids), np.array(verdict.top_probs), rejected, rng)


def variant_for(name: str) -> ExactVariant | PaperVariant:
    if name == "exact":
        return ExactVariant()
    if name == "paper":
        return PaperVariant()
    raise ValueError(f"unknown variant {name!r}; choose exact or paper")


def point_mass(token: int) -> SparseDist:
    return SparseDist(np.array([token], dtype=np.int64), np.array([1], dtype=np.int64))
