"""Temperature, top-k, top-p, the quantised draft distribution and the exact accept / recover rule.

Everything here is pure: arrays and a seeded ``numpy.random.Generator`` in, numbers out.

Exactness rests on one fact: the edge samples each drafted token from a ``SparseDist`` of integer
weights and sends those same integers, so the cloud's q_i is bit for bit the one that was sampled
from. The accept / recover rule (Leviathan et al., Chen et al.) then makes every committed token
follow the target's sampling distribution p_i exactly.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Sum of the integer weights of a drafted distribution before dropping zero weights. Tokens whose
# probability rounds to zero at this resolution are never drafted: harmless for exactness (q is
# whatever we sample from), and it keeps the sparse support, and so the uplink, small.
DRAFT_RESOLUTION = 1 << 12


@dataclass(frozen=True)
class SamplingParams:
    """The user's sampling settings; both sides apply them the same way."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0

    def validate(self) -> "SamplingParams":
        if not (self.temperature >= 0.0 and np.isfinite(self.temperature)):
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if not (0.0 < self.top_p <= 1.0):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 disables it), got {self.top_k}")
        return self


@dataclass(frozen=True)
class SparseDist:
    """A distribution over token ids held as integer weights.

    ids: int64[n], ascending and unique. weights: int64[n], each > 0. q(x) = weights[x] / total.
    """

    ids: np.ndarray
    weights: np.ndarray

    @property
    def total(self) -> int:
        return int(self.weights.sum())

    def prob(self, token: int) -> float:
        """q(token); 0.0 when the token is outside the support."""
        i = int(np.searchsorted(self.ids, token))
        if i < len(self.ids) and int(self.ids[i]) == token:
            return float(self.weights[i]) / self.total
        return 0.0

    def dense(self, vocab_size: int) -> np.ndarray:
        """float64[vocab_size] with q on the support and zeros elsewhere."""
        q = np.zeros(vocab_size, dtype=np.float64)
        q[self.ids] = self.weights / float(self.total)
        return q

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, SparseDist):
            return NotImplemented
        return np.array_equal(self.ids, other.ids) and np.array_equal(self.weights, other.weights)

    def __hash__(self) -> int:
        return hash((self.ids.tobytes(), self.weights.tobytes()))


@dataclass(frozen=True)
class Outcome:
    """The outcome of verifying one block.

    accepted: how many drafted tokens were kept (a prefix of the block).
    recovered: the token sampled at the first rejected position, or None if the block was
    accepted whole.
    """

    accepted: int
    recovered: int | None


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """float64[V] softmax of logits / temperature, computed stably."""
    z = np.asarray(logits, dtype=np.float64) / temperature
    z = z - z.max()
    e = np.exp(z)
    return e / e.sum()


def truncate_probs(probs: np.ndarray, top_k: int = 0, top_p: float = 1.0) -> np.ndarray:
    """Keep the top-k tokens, then the smallest set whose mass reaches top_p; renormalise.

    probs: float64[V]. Returns float64[V] with zeros outside the kept set. Ties are broken by
    token id (stable sort), so both sides keep the same set for the same numbers.
    """
    if top_k <= 0 and top_p >= 1.0:
        return probs
    order = _descending(probs, top_k, top_p)
    if top_k > 0:
        order = order[:top_k]
    kept_p = probs[order]
    if top_p < 1.0:
        mass_before = np.cumsum(kept_p) - kept_p
        # mass is measured within the top-k set, as the usual sampler chain does (without top-k,
        # `order` may be only the head of the vocabulary: measure against the whole)
        total = kept_p.sum() if top_k > 0 else probs.sum()
        keep = mass_before < top_p * total
        keep[0] = True
        order = order[keep]
        kept_p = kept_p[keep]
    out = np.zeros_like(probs)
    out[order] = kept_p / kept_p.sum()
    return out


_CANDIDATES = 1024


def _descending(probs: np.ndarray, top_k: int, top_p: float) -> np.ndarray:
    """Token ids by descending probability, ties by ascending id: all of them, or a head long
    enough for the truncation asked for.

    Sorting a 152k vocabulary takes ~10 ms; the head that top-k / top-p keep is almost always in
    the 1024 most likely tokens, so only those are sorted (every token tied with the smallest of
    them is included, so the result does not depend on how a partial sort breaks ties).
    """
    need = top_k if top_k > 0 else _CANDIDATES
    if len(probs) <= 4 * max(need, _CANDIDATES):
        return np.argsort(-probs, kind="stable")
    threshold = np.partition(probs, len(probs) - need)[len(probs) - need]
    head = np.flatnonzero(probs >= threshold)
    if top_k <= 0 and probs[head].sum() < top_p * probs.sum():
        return np.argsort(-probs, kind="stable")  # a flat distribution: the head is not enough
    return head[np.lexsort((head, -probs[head]))]


def target_probs(logits: np.ndarray, params: SamplingParams) -> np.ndarray:
    """The sampling distribution p for one position. logits: [V]. Returns float64[V].

    Greedy is the one-hot distribution on the argmax (lowest id on a tie).
    """
    if params.greedy:
        p = np.zeros(len(logits), dtype=np.float64)
        p[int(np.argmax(logits))] = 1.0
        return p
    return truncate_probs(softmax(logits, params.temperature), params.top_k, params.top_p)


def draft_dist(
    logits: np.ndarray, params: SamplingParams, resolution: int = DRAFT_RESOLUTION
) -> SparseDist:
    """The quantised distribution the edge samples a drafted token from. logits: [V].

    temperature, then top-k / top-p truncation, then rounding to integer weights out of
    `resolution`; zero weights are dropped, the argmax always stays.
    """
    if params.greedy:
        top = int(np.argmax(logits))
        return SparseDist(np.array([top], dtype=np.int64), np.array([1], dtype=np.int64))
    p = target_probs(logits, params)
    weights = np.rint(p * resolution).astype(np.int64)
    weights[int(np.argmax(p))] = max(1, int(weights[int(np.argmax(p))]))
    ids = np.flatnonzero(weights).astype(np.int64)
    return SparseDist(ids, weights[ids])


def sample_sparse(dist: SparseDist, rng: np.random.Generator) -> int:
    """Draw a token from exactly the integer weights of `dist`."""
    cum = np.cumsum(dist.weights)
    r = int(rng.integers(int(cum[-1])))
    return int(dist.ids[int(np.searchsorted(cum, r, side="right"))])


def sample_dense(p: np.ndarray, rng: np.random.Generator) -> int:
    """Draw a token from float64[V] probabilities p (need not sum exactly to one)."""
    cum = np.cumsum(p)
    u = rng.random() * cum[-1]
    i = int(np.searchsorted(cum, u, side="right"))
    # guard the float edge where u lands on the last boundary: take the last token with mass
    return i if i < len(p) and p[i] > 0 else int(np.flatnonzero(p)[-1])


def residual_probs(p: np.ndarray, q: SparseDist) -> np.ndarray:
    """norm(max(0, p - q)) over the vocabulary. p: float64[V]. Returns float64[V].

    If p <= q everywhere (possible only when p == q), rejection had probability zero; p itself is
    returned so the caller never divides by zero.
    """
    r = p.copy()
    support = q.ids[q.ids < len(p)]
    r[support] -= q.weights[q.ids < len(p)] / float(q.total)
    np.maximum(r, 0.0, out=r)
    mass = r.sum()
    return r / mass if mass > 0 else p


def verify_token(token: int, q_token: float, p: np.ndarray, rng: np.random.Generator) -> bool:
    """Accept a drafted token with probability min(1, p(token) / q(token)).

    q_token must be > 0: the token was sampled from q.
    """
    if not q_token > 0.0:
        raise ValueError(f"drafted token {token} has q = {q_token}: it cannot have been sampled")
    p_token = float(p[token]) if 0 <= token < len(p) else 0.0
    if p_token >= q_token:
        return True  # no randomness spent: keeps seeded runs aligned with greedy-like cases
    return bool(rng.random() * q_token < p_token)


def verify_block(
    drafted: list[int],
    draft_dists: list[SparseDist],
    target_rows: list[np.ndarray],
    rng: np.random.Generator,
) -> Outcome:
    """The exact accept / recover rule over one block.

    drafted: [k] token ids; draft_dists: [k] distributions they were sampled from;
    target_rows: [k] float64[V] target sampling distributions at the same positions.
    Stops at the first rejection j and samples the recovered token from norm(max(0, p_j - q_j)).
    """
    for j, (token, q, p) in enumerate(zip(drafted, draft_dists, target_rows)):
        if not verify_token(token, q.prob(token), p, rng):
            return Outcome(accepted=j, recovered=sample_dense(residual_probs(p, q), rng))
    return Outcome(accepted=len(drafted), recovered=None)


def verify_block_greedy(drafted: list[int], target_argmax: list[int]) -> Outcome:
    """Greedy verification: accept while the drafted token is the target's argmax.

    drafted: [k]; target_argmax: [k] argmax of the target logits at the same positions.
    """
    for j, (token, best) in enumerate(zip(drafted, target_argmax)):
        if token != best:
            return Outcome(accepted=j, recovered=int(best))
    return Outcome(accepted=len(drafted), recovered=None)


def top_k_sparse(p: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The paper's downlink: the k most likely tokens of p and their (unnormalised) probabilities.

    Returns (ids int64[k'] ascending, probs float64[k']) with k' = min(k, support of p).
    """
    k = min(k, int(np.count_nonzero(p)))
    top = np.argpartition(-p, k - 1)[:k]
    top.sort()
    return top.astype(np.int64), p[top].astype(np.float64)


def recover_from_top_k(
    top_ids: np.ndarray, top_probs: np.ndarray, q: SparseDist, rng: np.random.Generator
) -> int:
    """The paper's edge-side recovery: sample from norm(max(0, p_topK - q)) on the top-K support.

    Approximate by construction: mass of p outside the top-K is lost. When the residual is empty
    on that support, the most likely target token is taken.
    """
    r = top_probs - np.array([q.prob(int(t)) for t in top_ids])
    np.maximum(r, 0.0, out=r)
    if r.sum() <= 0:
        return int(top_ids[int(np.argmax(top_probs))])
    return int(top_ids[sample_dense(r, rng)])
