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


def token_prob(logits: np.ndarray, token: int, temperature: float = 1.0) -> float:
    """softmax(logits / temperature)[token] for one token of a [V] row, without the whole softmax
    (float32 until the sum: ~0.4 ms on a 152k row where `softmax` takes ~2 ms; the drafter asks
    it once per drafted token)."""
    z = (logits - logits[token]) * np.float32(1.0 / max(temperature, 1e-6))
    np.minimum(z, 80.0, out=z)  # float32 exp overflows past 88; beyond 80 the token's share is ~0 anyway
    return float(1.0 / np.exp(z, out=z).sum(dtype=np.float64))


def truncate_probs(probs: np.ndarray, top_k: int = 0, top_p: float = 1.0,
                   out: np.ndarray | None = None) -> np.ndarray:
    """Keep the top-k tokens, then the smallest set whose mass reaches top_p; renormalise.

    probs: float64[V]. Returns float64[V] with zeros outside the kept set, written into `out` when
    given (it may be probs itself), else a new array. Ties are broken by token id (stable sort), so
    both sides keep the same set for the same numbers.
    """
    if top_k <= 0 and top_p >= 1.0:
        return probs
    ids, kept_p = _truncate_sparse(probs, top_k, top_p)
    if out is None:
        out = np.zeros_like(probs)
    else:
        out.fill(0.0)
    out[ids] = kept_p
    return out


def _truncate_sparse(probs: np.ndarray, top_k: int, top_p: float) -> tuple[np.ndarray, np.ndarray]:
    """The kept token ids, ascending, and their renormalised probabilities: `truncate_probs`
    without the dense output.

    The definition is the textbook chain on `order`, a stable sort of -probs: keep order[:top_k];
    then keep each token whose running mass before it, np.cumsum(kept_p) - kept_p, is below
    top_p * total; divide by kept_p.sum(). Both sums see the values in descending order, where
    equal values are interchangeable, so the sorted values alone give the same numbers
    (np.sort: 4x cheaper than np.argsort, 15x cheaper than a stable one). The kept tokens are a
    prefix of `order` (the mass before a token never decreases: fl is monotone, so
    fl(fl(C + b) - b) >= fl(C - a) for a >= b >= 0), i.e. the n largest values, ties at the n-th
    value v going to the lowest ids: every id above v and the lowest ids at v, found in
    ascending id order without sorting ids at all.
    """
    head, values, n, v, norm = _kept_head(probs, top_k, top_p)
    pick = values > v
    tied = np.flatnonzero(values == v)
    pick[tied[: n - np.count_nonzero(pick)]] = True
    at = np.flatnonzero(pick)  # then gather: 8x cheaper than indexing by the boolean mask
    kept_p = values[at]
    kept_p /= norm
    return head[at], kept_p


def _kept_head(
    probs: np.ndarray, top_k: int, top_p: float
) -> tuple[np.ndarray, np.ndarray, int, float, float]:
    """(head, values, n, v, norm): ascending ids of a head of the vocabulary that holds every
    kept token (and every token tied with its smallest value), their probabilities, how many
    tokens are kept, the n-th largest value and the sum of the n largest in descending order.
    The sorted copies are dropped on return, before the caller allocates the result."""
    if top_k > 0:
        whole = 4 * max(top_k, _CANDIDATES) >= len(probs)
        head = np.arange(len(probs)) if whole else _head(probs, top_k)
        values = probs if whole else probs[head]
        desc = _sorted_descending(values)[:top_k]
        n = len(desc)
        if top_p < 1.0:
            # mass is measured within the top-k set, as the usual sampler chain does
            n = _kept_count(np.cumsum(desc), desc, top_p * desc.sum())
    else:
        total = probs.sum()
        head, values, desc, running = _nucleus_head(probs, total, top_p * total)
        n = _kept_count(running, desc, top_p * total)
    return head, values, n, desc[n - 1], desc[:n].sum()


def _kept_count(running: np.ndarray, desc: np.ndarray, mass: float) -> int:
    """How many of the descending values `desc` top-p keeps: those whose running mass before
    them (running: np.cumsum(desc), overwritten) is below `mass`, and at least one."""
    mass_before = np.subtract(running, desc, out=running)
    return max(1, int(np.searchsorted(mass_before, mass)))  # non-decreasing (see above)


def _sorted_descending(values: np.ndarray) -> np.ndarray:
    """A new contiguous float64 array of values sorted descending (probabilities: no -0.0)."""
    desc = np.negative(values)
    desc.sort()
    return np.negative(desc, out=desc)


_CANDIDATES = 1024
# A head whose running mass exceeds top_p * total by this much decides the top-p cut for every
# token after it (see _nucleus_head); far above the few ulps (~1e-16) rounding can move it.
_HEAD_MARGIN = 1e-12
# Shares of the tail mass that top-p drops (total - mass) that a head is sized to leave out,
# from the guess on every 64th value; the whole vocabulary is the last resort.
_TAIL_SHARES = (0.75, 0.25)


def _nucleus_head(
    probs: np.ndarray, total: float, mass: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(head, values, desc, running): ascending ids of every token at or above a threshold,
    their probabilities, those sorted descending and np.cumsum of that, with the head long
    enough to decide top-p at `mass` = top_p * total (total: probs.sum()).

    The head's sorted values are a prefix of the whole vocabulary's (every token tied with its
    smallest value is in it), and np.cumsum is sequential, so every token inside gets the
    running mass a full sort gives it. Once the head's running mass C reaches
    mass + _HEAD_MARGIN, every later token j has running mass before it
    fl(C_j - p_j) >= C - 2 ulp(2) > mass (C_j only grows, C_j < 2): dropped, as a full sort
    drops it. So any threshold whose head reaches that mass gives the same truncation.

    The threshold is guessed from every 64th value (x 64 they estimate the mass below each
    value) so that the head leaves out 3/4 of the tail that top-p drops: a nucleus of 30k tokens
    costs one pass over the vocabulary and a sort of ~35k values (a full sort costs 1.5 ms, the
    stable argsort the definition names 17 ms). Never fewer than ~1024 tokens (cheap to sort,
    and the usual nucleus fits). A guess that falls short (~1 row in 500) costs another pass.
    """
    cut = mass + _HEAD_MARGIN
    if len(probs) > 4 * _CANDIDATES:
        sample = np.sort(probs[::64])
        below = np.cumsum(sample) * 64.0
        for share in _TAIL_SHARES:
            at = int(np.searchsorted(below, share * (total - cut)))
            head = np.flatnonzero(probs >= sample[min(at, len(sample) - 16)])
            values = probs[head]
            # any summation order is within len * 2^-52 of the sorted running sum (all terms
            # <= 1, their sum ~1): skip sorting a head that provably falls short
            if values.sum() + len(head) * 2.0**-51 < cut:
                continue
            desc = _sorted_descending(values)
            running = np.cumsum(desc)
            if running[-1] >= cut:
                return head, values, desc, running
    desc = _sorted_descending(probs)
    return np.arange(len(probs)), probs, desc, np.cumsum(desc)


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


def target_probs(logits: np.ndarray, params: SamplingParams) -> np.ndarray:
    """The sampling distribution p for one position. logits: [V]. Returns float64[V].

    Greedy is the one-hot distribution on the argmax (lowest id on a tie).
    """
    if params.greedy:
        p = np.zeros(len(logits), dtype=np.float64)
        p[int(np.argmax(logits))] = 1.0
        return p
    probs = softmax(logits, params.temperature)
    # into the softmax's own buffer: a second fresh 1.2 MB array costs more in page faults than
    # all the arithmetic when the allocator has given memory back
    return truncate_probs(probs, params.top_k, params.top_p, out=probs)


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
        top = int(ids[np.argmax(kept_p)])  # argmax of the dense p: ids ascend, the lowest wins
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


def prob_of(p: np.ndarray, token: int) -> float:
    """p(token) from a dense distribution; 0 for an id outside it."""
    return float(p[token]) if 0 <= token < len(p) else 0.0


def accepts(token: int, q_token: float, p_token: float, u: float) -> bool:
    """The accept test of one drafted token with the uniform u in [0, 1): p >= q, or u q < p, i.e.
    probability min(1, p/q). q_token must be > 0: the token was sampled from q."""
    if not q_token > 0.0:
        raise ValueError(f"drafted token {token} has q = {q_token}: it cannot have been sampled")
    return p_token >= q_token or u * q_token < p_token


def verify_token(token: int, q_token: float, p: np.ndarray, rng: np.random.Generator) -> bool:
    """Accept a drafted token with probability min(1, p(token) / q(token)).

    q_token must be > 0: the token was sampled from q. No randomness is spent when p >= q (keeps
    seeded runs aligned with greedy-like cases).
    """
    p_token = prob_of(p, token)
    return accepts(token, q_token, p_token, 0.0 if p_token >= q_token else rng.random())


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
        if not accepts(token, q.prob(token), prob_of(p, token), uniforms[j]):
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
