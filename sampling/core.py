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
    """float64[V] softmax of logits / temperature, computed stably.

    The same IEEE operations as the textbook form ``e = exp(x / T - max); e / e.sum()`` on the same
    contiguous float64 array (so bit for bit the same numbers), done in place in one buffer: the
    temporaries of the textbook form cost more than the arithmetic on a 152k vocabulary.
    """
    x = np.asarray(logits)
    if x.dtype not in (np.float32, np.float64):
        x = x.astype(np.float64)
    z = np.empty(x.shape, dtype=np.float64)
    np.divide(x, temperature, out=z, dtype=np.float64)  # float64(x) / T, as np.asarray(x, f8) / T
    np.subtract(z, z.max(), out=z)
    np.exp(z, out=z)
    np.divide(z, z.sum(), out=z)
    return z


def truncate_probs(probs: np.ndarray, top_k: int = 0, top_p: float = 1.0) -> np.ndarray:
    """Keep the top-k tokens, then the smallest set whose mass reaches top_p; renormalise.

    probs: float64[V]. Returns float64[V] with zeros outside the kept set. Ties are broken by
    token id (stable sort), so both sides keep the same set for the same numbers.
    """
    if top_k <= 0 and top_p >= 1.0:
        return probs
    ids, kept_p = _truncate_sparse(probs, top_k, top_p)
    out = np.zeros_like(probs)
    out[ids] = kept_p
    return out


def _truncate_sparse(probs: np.ndarray, top_k: int, top_p: float) -> tuple[np.ndarray, np.ndarray]:
    """The kept token ids (by descending probability, ties by ascending id) and their
    renormalised probabilities: `truncate_probs` without the dense output."""
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
    return order, kept_p / kept_p.sum()


_CANDIDATES = 1024
# A head whose running mass exceeds top_p * total by this much decides the top-p cut for every
# token after it (see _descending); far above the few ulps (~1e-16) that rounding can move it.
_HEAD_MARGIN = 1e-12


def _descending(probs: np.ndarray, top_k: int, top_p: float) -> np.ndarray:
    """Token ids by descending probability, ties by ascending id: all of them, or a head long
    enough for the truncation asked for.

    Sorting a 152k vocabulary takes ~10-20 ms; the head that top-k / top-p keep is almost always
    in the 1024 most likely tokens, so only those are sorted (every token tied with the smallest
    of them is included, so the result does not depend on how a partial sort breaks ties).

    A flat distribution whose 1024-head holds less than top_p of the mass once sorted the whole
    vocabulary. A longer head gives the same truncation, which is all callers use: the head is a
    prefix of the full order, `np.cumsum` is sequential, so every token inside it gets the same
    running mass and the same keep / drop decision; and once the head's running mass C reaches
    top_p * total + _HEAD_MARGIN, every later token j has running mass before it
    fl(C_j - p_j) >= C - 2 ulp(2) > top_p * total (C_j only grows, C_j < 2), so it is dropped,
    as the full sort drops it. The head grows 4x at a time; the full sort remains the last resort.
    """
    need = top_k if top_k > 0 else _CANDIDATES
    if len(probs) <= 4 * max(need, _CANDIDATES):
        return _by_descending(probs, np.arange(len(probs)))
    head = _head(probs, need)
    if top_k > 0 or not probs[head].sum() < top_p * probs.sum():
        return _by_descending(probs, head)
    cut = top_p * probs.sum() + _HEAD_MARGIN
    while need * 4 < len(probs):
        need *= 4
        head = _head(probs, need)
        # any summation order is within len * 2^-52 of the sorted running sum (all terms <= 1,
        # their sum ~1): skip sorting a head that provably falls short
        if probs[head].sum() + len(head) * 2.0**-51 < cut:
            continue
        order = _by_descending(probs, head)
        if np.cumsum(probs[order])[-1] >= cut:
            return order
    return _by_descending(probs, np.arange(len(probs)))  # nearly uniform: the head is not enough


def _head(probs: np.ndarray, need: int) -> np.ndarray:
    """Ascending ids of the `need` most likely tokens and of every token tied with the last.

    The need-th largest value v is found among candidates {p >= t} rather than by partitioning
    all V values (a 1.2 MB copy: page faults cost more than the arithmetic). t is a guess from
    every 64th value; when at least `need` values reach t, v >= t, so every value >= v is a
    candidate and v is the need-th largest candidate: exact whatever the guess. A bad guess
    (fewer than `need` candidates) only costs the full partition.
    """
    sample = probs[::64]
    rank = 2 * (need // 64) + 8  # ~2 need + 512 candidates expected
    if rank < len(sample):
        guess = np.partition(sample, len(sample) - rank)[len(sample) - rank]
        candidates = np.flatnonzero(probs >= guess)
        if len(candidates) >= need:
            values = probs[candidates]
            threshold = np.partition(values, len(values) - need)[len(values) - need]
            return candidates[values >= threshold]
    threshold = np.partition(probs, len(probs) - need)[len(probs) - need]
    return np.flatnonzero(probs >= threshold)


def _by_descending(probs: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """ids (ascending) ordered by (-probs, id): the order of a stable sort of -probs, built from
    a fast unstable sort (4x cheaper than numpy's stable one on float64) and a fix-up that puts
    each run of tied values back in id order through one sort of unique integer keys."""
    values = probs[ids]
    order = np.argsort(-values)
    ranked = values[order]
    tied = ranked[1:] == ranked[:-1]
    if tied.any():
        level = np.concatenate(([0], np.cumsum(~tied)))  # equal values share a level
        order = np.sort(level * len(ids) + order) % len(ids)
    return ids[order]


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

    Definition: with p = target_probs(logits, params), weights = rint(p * resolution), the
    weight of argmax(p) raised to at least 1, zeros dropped. Computed on the kept support only:
    p is zero elsewhere and rint(0) = 0; rint(x) != 0 exactly when x > 0.5 (half to even).
    """
    if params.greedy:
        top = int(np.argmax(logits))
        return SparseDist(np.array([top], dtype=np.int64), np.array([1], dtype=np.int64))
    probs = softmax(logits, params.temperature)
    if params.top_k <= 0 and params.top_p >= 1.0:
        top = int(np.argmax(probs))
        ids = np.flatnonzero(probs * resolution > 0.5)
        kept_p = probs[ids]
    else:
        ids, kept_p = _truncate_sparse(probs, params.top_k, params.top_p)
        # argmax of the dense p: the lowest id among the largest values
        top = int(ids[kept_p == kept_p.max()].min())
        ascending = np.argsort(ids)
        ids, kept_p = ids[ascending], kept_p[ascending]
    weights = np.rint(kept_p * resolution).astype(np.int64)
    at = int(np.searchsorted(ids, top))
    if at < len(ids) and ids[at] == top:
        weights[at] = max(1, int(weights[at]))
    else:  # everything rounded to zero, the argmax included
        ids = np.insert(ids, at, top)
        weights = np.insert(weights, at, 1)
    nonzero = weights != 0
    return SparseDist(ids[nonzero].astype(np.int64), weights[nonzero])


def sample_sparse(dist: SparseDist, rng: np.random.Generator) -> int:
    """Draw a token from exactly the integer weights of `dist`."""
    cum = np.cumsum(dist.weights)
    r = int(rng.integers(int(cum[-1])))
    return int(dist.ids[int(np.searchsorted(cum, r, side="right"))])


def sample_dense(p: np.ndarray, rng: np.random.Generator) -> int:
    """Draw a token from float64[V] probabilities p (need not sum exactly to one)."""
    return inverse_cdf(p, rng.random())


def inverse_cdf(p: np.ndarray, u: float) -> int:
    """The token a uniform u in [0, 1) picks from float64[V] probabilities p (need not sum to
    one): the first id, in ascending id order, whose running mass exceeds u * total."""
    cum = np.cumsum(p)
    i = int(np.searchsorted(cum, u * cum[-1], side="right"))
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


def verify_block_u(
    drafted: list[int],
    draft_dists: list[SparseDist],
    target_rows: list[np.ndarray],
    uniforms: np.ndarray,
) -> tuple[Outcome, int | None]:
    """`verify_block` with its randomness given as uniforms, so that any other implementation
    (sampling.torch_rule) can be checked against this one draw for draw.

    drafted: [n]; draft_dists: [n]; target_rows: [n] or [n + 1] float64[V] sampling
    distributions (row n, when given, is the bonus row); uniforms: float64[>= n + 1] in [0, 1).
    Convention: uniforms[j] tests drafted j (accepted iff p >= q or u_j q < p, i.e. with
    probability min(1, p/q)); uniforms[n] draws, by `inverse_cdf`, the recovered token from
    norm(max(0, p_j - q_j)) at the first rejection j, or the bonus token from row n after a
    block accepted whole. Returns (outcome, bonus token or None).
    """
    n = len(drafted)
    for j, (token, q, p) in enumerate(zip(drafted, draft_dists, target_rows)):
        q_token = q.prob(token)
        if not q_token > 0.0:
            raise ValueError(f"drafted token {token} has q = {q_token}: it cannot have been sampled")
        p_token = float(p[token]) if 0 <= token < len(p) else 0.0
        if not (p_token >= q_token or uniforms[j] * q_token < p_token):
            return Outcome(j, inverse_cdf(residual_probs(p, q), uniforms[n])), None
    bonus = inverse_cdf(target_rows[n], uniforms[n]) if len(target_rows) > n else None
    return Outcome(n, None), bonus


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
