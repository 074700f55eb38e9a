"""Tests of PicoSpec's pure sampling math (sampling/core.py).

What a user would notice if any of this broke:
  * greedy output that differs from the target model's greedy output;
  * top-k / top-p / temperature that keep the wrong tokens;
  * a drafted distribution that is not the one the edge sampled from (exactness lost);
  * runs that are not reproducible under a seed;
  * and above all: sampled output whose distribution is not the target's. The statistical tests
    at the bottom drive the real `sample_sparse` + `verify_block` pipeline and compare the
    empirical distribution of committed tokens with the target's p, with negative controls that
    show the check is sharp enough to catch the classic mistakes.
"""
from __future__ import annotations

import math
import os
import sys

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

# `python -m pytest` from the repo root puts the root on sys.path; plain `pytest` does not.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import sampling.core as core  # noqa: E402
from sampling.core import (  # noqa: E402
    DRAFT_RESOLUTION,
    SamplingParams,
    SparseDist,
    Outcome,
    draft_dist,
    recover_from_top_k,
    residual_probs,
    sample_dense,
    sample_sparse,
    softmax,
    target_probs,
    top_k_sparse,
    truncate_probs,
    verify_block,
    verify_block_greedy,
    verify_token,
)

SAMPLED = SamplingParams(temperature=1.0)


def sparse(ids, weights) -> SparseDist:
    return SparseDist(np.asarray(ids, dtype=np.int64), np.asarray(weights, dtype=np.int64))


def one_hot(v: int, i: int) -> np.ndarray:
    p = np.zeros(v)
    p[i] = 1.0
    return p


def kept(p: np.ndarray) -> set[int]:
    return {int(i) for i in np.flatnonzero(p)}


# --------------------------------------------------------------------------------------------
# Statistical machinery
# --------------------------------------------------------------------------------------------
# Let c be the counts of N iid draws from a distribution p over V outcomes and TV = 1/2 sum_i
# |c_i/N - p_i|.
#   * Mean: E|c_i/N - p_i| <= sqrt(Var(c_i/N)) = sqrt(p_i (1 - p_i) / N)   (Jensen), hence
#         E[TV] <= 1/2 sum_i sqrt(p_i (1 - p_i) / N) <= 1/2 sqrt(V / N)     (Cauchy-Schwarz).
#   * Tail: TV is a function of N independent draws and changing one draw moves it by at most 1/N,
#     so McDiarmid gives P(TV >= E[TV] + t) <= exp(-2 N t^2). With t = sqrt(ln(1/delta) / (2N))
#     and delta = 1e-9, a correct sampler exceeds the bound below for fewer than one seed in 10^9.
# For N = 100k and V = 8 that is <= 0.0045 + 0.0102 ~ 0.015: about three times the mean bound.
# (The seeds are fixed, so each test is deterministic anyway; the bound says it is not lucky.)
# The negative controls below sit at 0.17 - 0.5, i.e. 10x - 30x above it.
DELTA = 1e-9


def tv(a: np.ndarray, b: np.ndarray) -> float:
    return 0.5 * float(np.abs(np.asarray(a, float) - np.asarray(b, float)).sum())


def tv_bound(p: np.ndarray, n: int, delta: float = DELTA) -> float:
    p = np.asarray(p, dtype=np.float64).ravel()
    mean_bound = 0.5 * float(np.sqrt(p * (1.0 - p) / n).sum())
    return mean_bound + math.sqrt(math.log(1.0 / delta) / (2.0 * n))


def assert_matches(counts: np.ndarray, p: np.ndarray, label: str) -> float:
    n = int(counts.sum())
    d, bound = tv(counts / n, p), tv_bound(p, n)
    print(f"[{label}] N={n} TV={d:.4f} bound={bound:.4f}")
    assert d <= bound, f"{label}: TV {d:.4f} > bound {bound:.4f} (N={n})"
    return d


def assert_differs(counts: np.ndarray, p: np.ndarray, label: str) -> float:
    n = int(counts.sum())
    d, bound = tv(counts / n, p), tv_bound(p, n)
    print(f"[{label}] N={n} TV={d:.4f} bound={bound:.4f}")
    assert d > 3 * bound, f"{label} should be caught: TV {d:.4f} vs bound {bound:.4f}"
    return d


def single_position_counts(p: np.ndarray, q: SparseDist, n: int, seed: int) -> np.ndarray:
    """Committed-token counts over n one-token rounds: draft x ~ q, verify, commit."""
    rng = np.random.default_rng(seed)
    counts = np.zeros(len(p), dtype=np.int64)
    qs, ps = [q], [p]
    for _ in range(n):
        x = sample_sparse(q, rng)
        v = verify_block([x], qs, ps, rng)
        counts[x if v.accepted == 1 else v.recovered] += 1
    return counts


# --------------------------------------------------------------------------------------------
# 1. Hand-built cases with exact outputs
# --------------------------------------------------------------------------------------------
def test_greedy_target_probs_is_one_hot_on_argmax():
    p = target_probs(np.array([0.1, 2.0, -1.0, 1.5]), SamplingParams(temperature=0.0))
    np.testing.assert_array_equal(p, one_hot(4, 1))


def test_greedy_ties_go_to_lowest_token_id():
    logits = np.array([0.0, 3.0, 1.0, 3.0, 3.0])
    np.testing.assert_array_equal(target_probs(logits, SamplingParams()), one_hot(5, 1))
    assert draft_dist(logits, SamplingParams()) == sparse([1], [1])


def test_greedy_ignores_top_k_and_top_p():
    logits = np.array([0.0, 1.0, 5.0, 2.0])
    params = SamplingParams(temperature=0.0, top_k=1, top_p=0.1)
    np.testing.assert_array_equal(target_probs(logits, params), one_hot(4, 2))
    assert draft_dist(logits, params) == sparse([2], [1])


def test_greedy_draft_dist_is_single_token_argmax():
    q = draft_dist(np.array([-1.0, 0.5, 4.0, 3.9]), SamplingParams())
    assert q == sparse([2], [1])
    assert q.prob(2) == 1.0 and q.prob(3) == 0.0


def test_greedy_verify_accepts_prefix_and_recovers_target_argmax_at_first_mismatch():
    assert verify_block_greedy([4, 7, 1, 9], [4, 7, 2, 9]) == Outcome(accepted=2, recovered=2)


def test_greedy_verify_rejects_first_token():
    assert verify_block_greedy([5, 7], [3, 7]) == Outcome(accepted=0, recovered=3)


def test_greedy_verify_whole_block_accepted_has_no_recovered_token():
    assert verify_block_greedy([4, 7, 1], [4, 7, 1]) == Outcome(accepted=3, recovered=None)


def test_greedy_verify_empty_block():
    assert verify_block_greedy([], []) == Outcome(accepted=0, recovered=None)
    assert verify_block([], [], [], np.random.default_rng(0)) == Outcome(0, None)


def test_sampled_path_at_temperature_zero_agrees_with_greedy_verify():
    """verify_block on greedy one-hot p and q gives exactly the greedy verdict, for any seed."""
    rng = np.random.default_rng(7)
    greedy = SamplingParams()
    for trial in range(200):
        v, k = 6, int(rng.integers(1, 5))
        target_logits = [rng.normal(size=v) for _ in range(k)]
        # draft logits agree with the target most of the time so accepts and rejects both occur
        draft_logits = [t + rng.normal(size=v) * 0.5 for t in target_logits]
        qs = [draft_dist(d, greedy) for d in draft_logits]
        drafted = [int(q.ids[0]) for q in qs]
        ps = [target_probs(t, greedy) for t in target_logits]
        want = verify_block_greedy(drafted, [int(np.argmax(t)) for t in target_logits])
        got = verify_block(drafted, qs, ps, np.random.default_rng(trial))
        assert got == want


def test_drafted_token_with_zero_target_prob_is_rejected_and_target_token_recovered():
    p = one_hot(6, 2)
    q = sparse([5], [1])
    for seed in range(50):
        assert verify_block([5], [q], [p], np.random.default_rng(seed)) == Outcome(0, 2)


def test_block_accepts_prefix_then_recovers_from_residual_with_certainty():
    v = 6
    p_rows = [one_hot(v, 1), one_hot(v, 4), one_hot(v, 0)]
    qs = [sparse([1], [3]), sparse([4], [7]), sparse([3], [1])]
    for seed in range(50):
        got = verify_block([1, 4, 3], qs, p_rows, np.random.default_rng(seed))
        assert got == Outcome(accepted=2, recovered=0)


def test_first_token_rejected_stops_the_block():
    p_rows = [one_hot(4, 0), one_hot(4, 2)]
    qs = [sparse([3], [1]), sparse([2], [1])]
    assert verify_block([3, 2], qs, p_rows, np.random.default_rng(0)) == Outcome(0, 0)


def test_whole_block_accepted_gives_recovered_none():
    p_rows = [one_hot(5, 3), one_hot(5, 1), one_hot(5, 4)]
    qs = [sparse([3], [1]), sparse([1], [9]), sparse([4], [2])]
    assert verify_block([3, 1, 4], qs, p_rows, np.random.default_rng(0)) == Outcome(3, None)


def test_block_is_always_accepted_when_p_equals_q():
    rng = np.random.default_rng(11)
    for seed in range(100):
        qs, ps, drafted = [], [], []
        for _ in range(4):
            q = draft_dist(rng.normal(size=10) * 2, SAMPLED)
            qs.append(q)
            ps.append(q.dense(10))
            drafted.append(sample_sparse(q, rng))
        assert verify_block(drafted, qs, ps, np.random.default_rng(seed)) == Outcome(4, None)


def test_token_where_p_exceeds_q_is_always_accepted():
    p = np.array([0.1, 0.6, 0.3])
    q = sparse([0, 1, 2], [5, 2, 3])  # q(1) = 0.2 < p(1)
    for seed in range(50):
        assert verify_token(1, q.prob(1), p, np.random.default_rng(seed))


def test_verify_token_refuses_a_token_the_draft_could_not_have_sampled():
    with pytest.raises(ValueError):
        verify_token(3, 0.0, np.array([0.25] * 4), np.random.default_rng(0))
    with pytest.raises(ValueError):
        verify_block([3], [sparse([0, 1], [1, 1])], [np.array([0.25] * 4)], np.random.default_rng(0))


class _UniformGrid:
    """A stand-in rng whose random() walks an evenly spaced grid of [0, 1)."""

    def __init__(self, m: int):
        self.m, self.i = m, 0

    def random(self) -> float:
        u = (self.i + 0.5) / self.m
        self.i += 1
        return u


def test_verify_token_accepts_with_probability_p_over_q():
    p = np.array([0.1, 0.2, 0.7])
    q_x = 0.5  # p(0)/q = 0.2, p(1)/q = 0.4
    m = 10_000
    for token, ratio in [(0, 0.2), (1, 0.4)]:
        rng = _UniformGrid(m)
        acc = sum(verify_token(token, q_x, p, rng) for _ in range(m))
        assert abs(acc / m - ratio) <= 1.0 / m


def test_residual_is_positive_part_of_p_minus_q_normalised():
    p = np.array([0.5, 0.25, 0.125, 0.125, 0.0])
    q = sparse([0, 1, 4], [1, 2, 1])  # 0.25, 0.5, 0.25
    np.testing.assert_allclose(residual_probs(p, q), [0.5, 0.0, 0.25, 0.25, 0.0])


def test_residual_of_identical_p_and_q_falls_back_to_p():
    q = sparse([0, 2], [1, 3])
    p = q.dense(4)
    np.testing.assert_array_equal(residual_probs(p, q), p)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.integers(2, 12).flatmap(
        lambda v: st.tuples(
            st.lists(st.floats(-8, 8), min_size=v, max_size=v),
            st.lists(st.floats(-8, 8), min_size=v, max_size=v),
        )
    )
)
def test_accept_plus_residual_reconstructs_p_exactly(logit_pair):
    """The algebra behind exactness: min(p, q) + P(reject) * residual == p, for any p and q."""
    p = softmax(np.array(logit_pair[0]))
    q = draft_dist(np.array(logit_pair[1]), SAMPLED)
    qd = q.dense(len(p))
    accepted = np.minimum(p, qd)
    out = accepted + (1.0 - accepted.sum()) * residual_probs(p, q)
    np.testing.assert_allclose(out, p, atol=1e-12)


# --------------------------------------------------------------------------------------------
# 2. top-k / top-p / temperature / validation
# --------------------------------------------------------------------------------------------
def test_top_k_keeps_the_k_most_likely_and_renormalises():
    p = np.array([0.1, 0.4, 0.2, 0.3])
    np.testing.assert_allclose(truncate_probs(p, top_k=2), [0.0, 0.4 / 0.7, 0.0, 0.3 / 0.7])
    np.testing.assert_allclose(truncate_probs(p, top_k=1), [0.0, 1.0, 0.0, 0.0])


def test_top_k_at_or_above_vocab_keeps_everything():
    p = np.array([0.1, 0.4, 0.2, 0.3])
    np.testing.assert_allclose(truncate_probs(p, top_k=4), p)
    np.testing.assert_allclose(truncate_probs(p, top_k=100), p)


def test_top_k_ties_keep_lowest_ids():
    p = np.array([0.125, 0.5, 0.125, 0.25])
    np.testing.assert_allclose(truncate_probs(p, top_k=3), [0.125 / 0.875, 0.5 / 0.875, 0.0, 0.25 / 0.875])
    assert kept(truncate_probs(np.full(5, 0.2), top_k=2)) == {0, 1}


def test_top_p_keeps_smallest_set_reaching_the_mass():
    # dyadic numbers so the cumulative sums are exact
    p = np.array([0.125, 0.5, 0.125, 0.25])  # sorted: 1 (.5), 3 (.25), 0 (.125), 2 (.125)
    assert kept(truncate_probs(p, top_p=0.5)) == {1}
    assert kept(truncate_probs(p, top_p=0.75)) == {1, 3}  # reaches .75 exactly: stop there
    assert kept(truncate_probs(p, top_p=0.76)) == {1, 3, 0}  # tie with 2 goes to lower id
    assert kept(truncate_probs(p, top_p=0.875)) == {1, 3, 0}
    assert kept(truncate_probs(p, top_p=0.9)) == {0, 1, 2, 3}
    np.testing.assert_allclose(truncate_probs(p, top_p=0.75), [0.0, 2 / 3, 0.0, 1 / 3])


def test_top_p_always_keeps_at_least_one_token():
    p = np.array([0.2, 0.3, 0.5])
    np.testing.assert_array_equal(truncate_probs(p, top_p=1e-9), [0.0, 0.0, 1.0])
    np.testing.assert_array_equal(truncate_probs(np.full(4, 0.25), top_p=0.01), one_hot(4, 0))


def test_top_p_ties_keep_lowest_ids():
    assert kept(truncate_probs(np.full(8, 0.125), top_p=0.375)) == {0, 1, 2}


def test_top_p_mass_is_measured_within_the_top_k_set():
    p = np.array([0.5, 0.25, 0.125, 0.125])
    # top_k=2 leaves {0: 2/3, 1: 1/3}; top_p=0.6 of that is reached by token 0 alone
    np.testing.assert_allclose(truncate_probs(p, top_k=2, top_p=0.6), one_hot(4, 0))
    np.testing.assert_allclose(truncate_probs(p, top_k=2, top_p=0.7), [2 / 3, 1 / 3, 0, 0])


def test_no_truncation_returns_the_distribution_unchanged():
    p = np.array([0.1, 0.4, 0.2, 0.3])
    np.testing.assert_array_equal(truncate_probs(p), p)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.floats(-10, 10), min_size=1, max_size=40),
    st.integers(0, 50),
    st.floats(0.01, 1.0),
)
def test_truncation_keeps_a_renormalised_head_of_the_sorted_order(logits, top_k, top_p):
    p = softmax(np.array(logits))
    out = truncate_probs(p, top_k=top_k, top_p=top_p)
    assert abs(out.sum() - 1.0) < 1e-9
    keep = np.flatnonzero(out)
    assert 1 <= len(keep) <= (top_k if top_k > 0 else len(p))
    order = np.argsort(-p, kind="stable")
    assert set(order[: len(keep)].tolist()) == set(keep.tolist())  # a prefix of the sorted order
    np.testing.assert_allclose(out[keep], p[keep] / p[keep].sum(), rtol=1e-12)


def test_temperature_exact_values():
    logits = np.array([0.0, math.log(2.0)])
    np.testing.assert_allclose(softmax(logits, 1.0), [1 / 3, 2 / 3])
    np.testing.assert_allclose(softmax(logits, 0.5), [1 / 5, 4 / 5])
    r2 = math.sqrt(2.0)
    np.testing.assert_allclose(softmax(logits, 2.0), [1 / (1 + r2), r2 / (1 + r2)])


def test_low_temperature_sharpens_high_temperature_flattens():
    logits = np.array([1.0, 3.0, 0.5, 2.0, -1.0])

    def entropy(p):
        return float(-(p * np.log(p)).sum())

    ps = [target_probs(logits, SamplingParams(temperature=t)) for t in (0.25, 0.5, 1.0, 2.0, 8.0)]
    tops = [p[1] for p in ps]
    ents = [entropy(p) for p in ps]
    assert tops == sorted(tops, reverse=True)
    assert ents == sorted(ents)
    assert ps[0][1] > 0.98  # near-greedy
    assert np.abs(ps[-1] - 0.2).max() < 0.1  # near-uniform


def test_softmax_is_stable_for_huge_logits():
    p = softmax(np.array([1000.0, 999.0, -1000.0]))
    assert np.all(np.isfinite(p))
    np.testing.assert_allclose(p[:2], [1 / (1 + math.exp(-1)), math.exp(-1) / (1 + math.exp(-1))])


def test_target_probs_applies_temperature_then_top_k_then_top_p():
    logits = np.log(np.array([0.05, 0.4, 0.1, 0.3, 0.15]))
    got = target_probs(logits, SamplingParams(temperature=1.0, top_k=3, top_p=0.8))
    # top-3 = {1: .4, 3: .3, 4: .15} (mass .85); 80% of .85 = .68 reached by {1, 3} (.7)
    np.testing.assert_allclose(got, [0.0, 0.4 / 0.7, 0.0, 0.3 / 0.7, 0.0])


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=-0.1),
        SamplingParams(temperature=float("nan")),
        SamplingParams(temperature=float("inf")),
        SamplingParams(temperature=1.0, top_p=0.0),
        SamplingParams(temperature=1.0, top_p=-0.5),
        SamplingParams(temperature=1.0, top_p=1.01),
        SamplingParams(temperature=1.0, top_p=float("nan")),
        SamplingParams(temperature=1.0, top_k=-1),
    ],
    ids=["neg-temp", "nan-temp", "inf-temp", "top_p-0", "neg-top_p", "top_p>1", "nan-top_p", "neg-top_k"],
)
def test_validate_rejects_bad_settings(params):
    with pytest.raises(ValueError):
        params.validate()


def test_validate_accepts_good_settings_and_returns_self():
    for params in [
        SamplingParams(),
        SamplingParams(temperature=0.7, top_p=1.0, top_k=0, seed=3),
        SamplingParams(temperature=1.3, top_p=0.01, top_k=40),
    ]:
        assert params.validate() is params
    assert SamplingParams().greedy and SamplingParams(temperature=0.0).greedy
    assert not SamplingParams(temperature=0.1).greedy


# --------------------------------------------------------------------------------------------
# 3. Quantised drafted distribution, SparseDist, sample_sparse
# --------------------------------------------------------------------------------------------
@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.floats(-20, 20), min_size=1, max_size=60),
    st.floats(0.05, 5.0),
    st.integers(0, 20),
    st.floats(0.05, 1.0),
)
def test_draft_dist_is_a_well_formed_quantisation(logits, temperature, top_k, top_p):
    logits = np.array(logits)
    params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p)
    q = draft_dist(logits, params)
    p = target_probs(logits, params)
    assert q.ids.dtype == np.int64 and q.weights.dtype == np.int64
    assert np.all(np.diff(q.ids) > 0), "ids ascending and unique"
    assert np.all(q.weights > 0), "zero weights dropped"
    # the most likely token of p (lowest id on a tie) is always draftable; note a tie in p can
    # pick a different id than argmax(logits) when logits differ by less than float resolution
    assert int(np.argmax(p)) in q.ids.tolist(), "argmax always draftable"
    assert set(q.ids.tolist()) <= kept(p), "never drafts a token the truncation removed"
    # each rint is off by <= 1/2; forcing the argmax to weight 1 adds at most 1 more
    assert abs(q.total - DRAFT_RESOLUTION) <= len(logits) / 2 + 1
    # so q_i = w_i / total is within (|w_i - R p_i| + |total - R|) / total of p_i
    slack = len(logits) / 2 + 1
    np.testing.assert_allclose(q.dense(len(logits)), p, atol=(1 + slack) / (DRAFT_RESOLUTION - slack))


def test_draft_dist_exact_weights_on_a_small_case():
    logits = np.log(np.array([0.5, 0.25, 0.125, 0.125]))
    q = draft_dist(logits, SAMPLED, resolution=16)
    assert q == sparse([0, 1, 2, 3], [8, 4, 2, 2])
    assert draft_dist(logits, SamplingParams(temperature=1.0, top_k=2), resolution=12) == sparse([0, 1], [8, 4])


def test_draft_dist_drops_tokens_that_round_to_zero():
    logits = np.log(np.array([0.7, 1e-6, 0.3 - 1e-6]))
    q = draft_dist(logits, SAMPLED)
    assert q.ids.tolist() == [0, 2]
    assert q.prob(1) == 0.0


def test_draft_dist_keeps_the_argmax_even_when_everything_rounds_to_zero():
    v = 20_000  # every probability ~5e-5 -> rint(5e-5 * 4096) = 0
    logits = np.zeros(v)
    logits[1234] = 1e-3
    q = draft_dist(logits, SAMPLED)
    assert q == sparse([1234], [1])


def test_sparse_dist_prob_and_dense():
    q = sparse([1, 4, 7], [1, 2, 5])
    assert q.total == 8
    assert [q.prob(t) for t in range(9)] == [0, 1 / 8, 0, 0, 2 / 8, 0, 0, 5 / 8, 0]
    np.testing.assert_array_equal(q.dense(9), [0, 1 / 8, 0, 0, 2 / 8, 0, 0, 5 / 8, 0])
    assert q.dense(9).dtype == np.float64


def test_sparse_dist_equality_and_hash_follow_the_integers():
    a, b, c = sparse([1, 4], [1, 2]), sparse([1, 4], [1, 2]), sparse([1, 4], [2, 4])
    assert a == b and hash(a) == hash(b)
    assert a != c  # same q, different integers: both sides must hold the same integers
    np.testing.assert_array_equal(a.dense(5), c.dense(5))


class _CountingIntegers:
    """A stand-in rng whose integers(n) walks 0, 1, ..., n - 1 and around again."""

    def __init__(self):
        self.i = 0

    def integers(self, n: int) -> int:
        r = self.i % n
        self.i += 1
        return r


def test_sample_sparse_maps_integer_draws_exactly_onto_the_weights():
    q = sparse([2, 5, 9, 30], [3, 1, 7, 5])
    rng = _CountingIntegers()
    drawn = [sample_sparse(q, rng) for _ in range(q.total)]
    assert {t: drawn.count(t) for t in set(drawn)} == {2: 3, 5: 1, 9: 7, 30: 5}


def test_sample_sparse_frequencies_match_the_weights():
    q = sparse([3, 5, 9, 20], [1, 2, 3, 10])
    rng = np.random.default_rng(123)
    n = 40_000
    draws = np.array([sample_sparse(q, rng) for _ in range(n)])
    assert set(np.unique(draws).tolist()) <= {3, 5, 9, 20}
    obs = np.array([(draws == t).sum() for t in (3, 5, 9, 20)])
    exp = n * q.weights / q.total
    chi2 = float(((obs - exp) ** 2 / exp).sum())
    # chi-square with 3 degrees of freedom: P(chi2 > 30.7) ~ 1e-6
    assert chi2 < 30.7, chi2


def test_sample_sparse_reaches_a_weight_one_token_at_its_rate():
    q = sparse([0, 1], [1, 1023])
    rng = np.random.default_rng(5)
    n = 50_000
    hits = sum(sample_sparse(q, rng) == 0 for _ in range(n))
    # binomial(50k, 1/1024): mean 48.8, sd 7.0
    assert 20 <= hits <= 80


def test_sample_dense_never_picks_a_zero_probability_token():
    p = np.array([0.0, 0.3, 0.0, 0.7, 0.0])
    rng = np.random.default_rng(1)
    assert {sample_dense(p, rng) for _ in range(5000)} == {1, 3}


# --------------------------------------------------------------------------------------------
# 4. Seeded determinism
# --------------------------------------------------------------------------------------------
def _seeded_run(seed: int, blocks: int = 300):
    """A run of drafted blocks on fixed logits; returns drafted tokens and verdicts."""
    world = np.random.default_rng(99)  # the 'models': fixed for every seed
    v, k = 12, 4
    target = [world.normal(size=v) * 2 for _ in range(k)]
    draft = [t + world.normal(size=v) for t in target]
    params = SamplingParams(temperature=0.9, top_p=0.95)
    qs = [draft_dist(d, params) for d in draft]
    ps = [target_probs(t, params) for t in target]
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(blocks):
        drafted = [sample_sparse(q, rng) for q in qs]
        out.append((tuple(drafted), verify_block(drafted, qs, ps, rng)))
    return out


def test_same_seed_gives_same_drafts_and_verdicts():
    assert _seeded_run(2024) == _seeded_run(2024)


def test_different_seeds_give_different_drafts_and_verdicts():
    a, b = _seeded_run(1), _seeded_run(2)
    assert [d for d, _ in a] != [d for d, _ in b]
    assert [v for _, v in a] != [v for _, v in b]


def test_same_seed_same_recovered_tokens_from_sample_sparse_and_verify():
    q = sparse([0, 1, 2, 3], [1, 1, 1, 1])
    p = np.array([0.7, 0.1, 0.1, 0.1])
    runs = []
    for seed in (5, 5, 6):
        rng = np.random.default_rng(seed)
        runs.append([verify_block([sample_sparse(q, rng)], [q], [p], rng) for _ in range(200)])
    assert runs[0] == runs[1]
    assert runs[0] != runs[2]


# --------------------------------------------------------------------------------------------
# 5. The statistical test: committed tokens follow the target's distribution
# --------------------------------------------------------------------------------------------
N_ROUNDS = 100_000
N_CONTROL = 50_000  # the controls miss by 10x or more; half the rounds is plenty


@pytest.fixture(scope="module")
def single_position_case():
    """V=8; p from random logits, q a real quantised SparseDist from other random logits.

    The draft assigns weight 0 to the target's favourite token, so that token can only ever come
    out through recovery; elsewhere q over- and under-shoots p.
    """
    rng = np.random.default_rng(0)
    v = 8
    p = softmax(rng.normal(size=v) * 1.5)
    draft_logits = rng.normal(size=v) * 1.5
    star = int(np.argmax(p))
    draft_logits[star] = -30.0
    q = draft_dist(draft_logits, SAMPLED)
    qd = q.dense(v)
    assert q.prob(star) == 0.0 and p[star] > 0.3
    assert np.any(qd > 2 * p) and np.any((qd < p / 2) & (qd > 0))
    assert tv(p, qd) > 0.3  # a poor draft: recoveries are frequent
    return p, q


def test_committed_token_follows_target_distribution(single_position_case):
    p, q = single_position_case
    counts = single_position_counts(p, q, N_ROUNDS, seed=1)
    assert_matches(counts, p, "exact single position")


def test_control_always_accepting_the_draft_is_caught(single_position_case, monkeypatch):
    p, q = single_position_case
    monkeypatch.setattr(core, "verify_token", lambda *a, **k: True)
    counts = single_position_counts(p, q, N_CONTROL, seed=1)
    assert_differs(counts, p, "control: always accept")


def test_control_recovering_from_p_instead_of_residual_is_caught(single_position_case, monkeypatch):
    p, q = single_position_case
    monkeypatch.setattr(core, "residual_probs", lambda p_row, q_dist: p_row)
    counts = single_position_counts(p, q, N_CONTROL, seed=1)
    assert_differs(counts, p, "control: recover from p")


N_TWO = 40_000


def test_two_position_blocks_follow_the_target_joint_distribution():
    """Two-token blocks where both models condition the second token on the first.

    Rounds: draft x1 ~ q1, x2 ~ q2[x1]; verify the block. If x1 is rejected the block ends at the
    recovered token a, and the second token comes from a fresh one-token round in context a
    (as the next block would). The committed pair must follow p1(a) * p2[a](b) exactly; and the
    pairs committed from the *same* block (x1 accepted) must follow
    min(p1, q1)(a) * p2[a](b) / acceptance rate: the second position is exact given the first.
    """
    rng = np.random.default_rng(42)
    v = 6
    p1 = softmax(rng.normal(size=v) * 1.5)
    q1 = draft_dist(rng.normal(size=v) * 1.5, SAMPLED)
    p2 = [softmax(rng.normal(size=v) * 1.5) for _ in range(v)]
    q2 = [draft_dist(rng.normal(size=v) * 1.5, SAMPLED) for _ in range(v)]
    assert tv(p1, q1.dense(v)) > 0.2

    joint = np.zeros((v, v), dtype=np.int64)
    same_block = np.zeros((v, v), dtype=np.int64)
    rng = np.random.default_rng(43)
    for _ in range(N_TWO):
        x1 = sample_sparse(q1, rng)
        x2 = sample_sparse(q2[x1], rng)
        verdict = verify_block([x1, x2], [q1, q2[x1]], [p1, p2[x1]], rng)
        if verdict.accepted == 0:
            a = verdict.recovered
            y = sample_sparse(q2[a], rng)
            v2 = verify_block([y], [q2[a]], [p2[a]], rng)
            b = y if v2.accepted == 1 else v2.recovered
        else:
            a = x1
            b = x2 if verdict.accepted == 2 else verdict.recovered
            same_block[a, b] += 1
        joint[a, b] += 1

    want_joint = p1[:, None] * np.array(p2)
    assert_matches(joint.ravel(), want_joint.ravel(), "two positions: joint")

    acc = np.minimum(p1, q1.dense(v))
    want_same = acc[:, None] * np.array(p2) / acc.sum()
    assert_matches(same_block.ravel(), want_same.ravel(), "two positions: same block")
    # the first token alone, too
    assert_matches(joint.sum(axis=1), p1, "two positions: first token")


def test_committed_tokens_follow_truncated_tempered_target():
    """Target and draft logits both go through the user's temperature / top-k / top-p."""
    rng = np.random.default_rng(0)
    v = 12
    params = SamplingParams(temperature=0.7, top_k=8, top_p=0.85)
    target_logits = rng.normal(size=v)
    draft_logits = target_logits + rng.normal(size=v)
    p = target_probs(target_logits, params)
    q = draft_dist(draft_logits, params)
    # the two truncations disagree: the draft proposes tokens the target never keeps, and misses
    # some the target does keep
    assert set(q.ids.tolist()) - kept(p) and kept(p) - set(q.ids.tolist())

    counts = single_position_counts(p, q, 40_000, seed=4)
    assert counts[p == 0].sum() == 0, "a token removed by top-k / top-p was committed"
    assert_matches(counts, p, "truncated + tempered")
    # sharp enough to tell the truncated target from the raw softmax, or an untempered one
    n = counts.sum()
    raw = tv(counts / n, softmax(target_logits, 0.7))
    untempered = tv(counts / n, truncate_probs(softmax(target_logits), 8, 0.85))
    print(f"[truncated + tempered] vs raw softmax TV={raw:.4f}, vs untempered TV={untempered:.4f}")
    assert raw > 3 * tv_bound(p, n) and untempered > 3 * tv_bound(p, n)


# --------------------------------------------------------------------------------------------
# 6. The paper's top-K downlink variant
# --------------------------------------------------------------------------------------------
def test_top_k_sparse_returns_the_k_most_likely_ids_ascending():
    p = np.array([0.05, 0.3, 0.0, 0.25, 0.1, 0.3])
    ids, probs = top_k_sparse(p, 3)
    assert ids.tolist() == [1, 3, 5] and ids.dtype == np.int64
    np.testing.assert_array_equal(probs, [0.3, 0.25, 0.3])
    ids, probs = top_k_sparse(p, 100)  # capped at the support of p
    assert ids.tolist() == [0, 1, 3, 4, 5]
    np.testing.assert_array_equal(probs, p[[0, 1, 3, 4, 5]])


def _paper_counts(p: np.ndarray, q: SparseDist, k: int, n: int, seed: int) -> np.ndarray:
    """Draft x ~ q, accept with min(1, p/q), else recover on the edge from p's top-K."""
    rng = np.random.default_rng(seed)
    top_ids, top_probs = top_k_sparse(p, k)
    counts = np.zeros(len(p), dtype=np.int64)
    for _ in range(n):
        x = sample_sparse(q, rng)
        if verify_token(x, q.prob(x), p, rng):
            counts[x] += 1
        else:
            counts[recover_from_top_k(top_ids, top_probs, q, rng)] += 1
    return counts


# p's residual over q sits outside p's top-2: a small-K downlink cannot recover it.
PAPER_P = np.array([0.3, 0.25, 0.15, 0.15, 0.1, 0.05])
PAPER_Q = sparse([0, 1, 2, 3, 4, 5], [9, 7, 1, 1, 1, 1])  # .45 .35 .05 .05 .05 .05


def test_paper_recovery_is_exact_when_k_covers_the_support():
    counts = _paper_counts(PAPER_P, PAPER_Q, k=len(PAPER_P), n=30_000, seed=8)
    assert_matches(counts, PAPER_P, "paper top-K, K = V")


def test_paper_recovery_draws_from_the_residual_when_k_covers_the_support():
    rng = np.random.default_rng(9)
    ids, probs = top_k_sparse(PAPER_P, 6)
    n = 15_000
    counts = np.bincount([recover_from_top_k(ids, probs, PAPER_Q, rng) for _ in range(n)], minlength=6)
    assert_matches(counts, residual_probs(PAPER_P, PAPER_Q), "paper recovery vs residual")


def test_paper_recovery_is_biased_when_k_is_small():
    counts = _paper_counts(PAPER_P, PAPER_Q, k=2, n=20_000, seed=8)
    # every rejection collapses onto token 0; expected output [.55, .25, .05, .05, .05, .05]
    d = assert_differs(counts, PAPER_P, "paper top-K, K = 2")
    assert d > 0.2
    # the exact pipeline on the same p, q is not biased
    assert_matches(single_position_counts(PAPER_P, PAPER_Q, 20_000, seed=8), PAPER_P, "exact on paper case")


def test_large_vocabulary_truncation_matches_a_full_sort():
    """The partial sort used for 152k vocabularies keeps exactly what a full stable sort keeps."""
    import sampling.core as core

    rng = np.random.default_rng(11)
    for _ in range(10):
        p = core.softmax(rng.normal(size=151_936) * rng.uniform(0.5, 8))
        for top_k, top_p in [(0, 0.9), (50, 0.95), (0, 0.999), (2000, 0.99), (3, 1.0)]:
            fast = core.truncate_probs(p, top_k, top_p)
            order = np.argsort(-p, kind="stable")
            kept = order[:top_k] if top_k else order
            before = np.cumsum(p[kept]) - p[kept]
            kept = kept[before < top_p * p[kept].sum()] if top_p < 1 else kept
            assert set(np.flatnonzero(fast)) == set(kept.tolist())


# --------------------------------------------------------------------------------------------
# The fast sampling rows are the old ones, bit for bit
# --------------------------------------------------------------------------------------------
# The implementation before the fast rows (commit e32d7b1), kept verbatim as the reference.
def _reference_softmax(logits, temperature=1.0):
    z = np.asarray(logits, dtype=np.float64) / temperature
    z = z - z.max()
    e = np.exp(z)
    return e / e.sum()


def _reference_truncate_probs(probs, top_k=0, top_p=1.0):
    if top_k <= 0 and top_p >= 1.0:
        return probs
    order = _reference_descending(probs, top_k, top_p)
    if top_k > 0:
        order = order[:top_k]
    kept_p = probs[order]
    if top_p < 1.0:
        mass_before = np.cumsum(kept_p) - kept_p
        total = kept_p.sum() if top_k > 0 else probs.sum()
        keep = mass_before < top_p * total
        keep[0] = True
        order = order[keep]
        kept_p = kept_p[keep]
    out = np.zeros_like(probs)
    out[order] = kept_p / kept_p.sum()
    return out


def _reference_descending(probs, top_k, top_p):
    need = top_k if top_k > 0 else 1024
    if len(probs) <= 4 * max(need, 1024):
        return np.argsort(-probs, kind="stable")
    threshold = np.partition(probs, len(probs) - need)[len(probs) - need]
    head = np.flatnonzero(probs >= threshold)
    if top_k <= 0 and probs[head].sum() < top_p * probs.sum():
        return np.argsort(-probs, kind="stable")
    return head[np.lexsort((head, -probs[head]))]


def _reference_target_probs(logits, params):
    if params.greedy:
        p = np.zeros(len(logits), dtype=np.float64)
        p[int(np.argmax(logits))] = 1.0
        return p
    return _reference_truncate_probs(
        _reference_softmax(logits, params.temperature), params.top_k, params.top_p
    )


def _reference_draft_dist(logits, params, resolution=DRAFT_RESOLUTION):
    if params.greedy:
        top = int(np.argmax(logits))
        return SparseDist(np.array([top], dtype=np.int64), np.array([1], dtype=np.int64))
    p = _reference_target_probs(logits, params)
    weights = np.rint(p * resolution).astype(np.int64)
    weights[int(np.argmax(p))] = max(1, int(weights[int(np.argmax(p))]))
    ids = np.flatnonzero(weights).astype(np.int64)
    return SparseDist(ids, weights[ids])


BIG_V = 151_936
ROW_SETTINGS = [
    (0.7, 0, 0.9), (0.8, 0, 0.95), (1.0, 0, 0.9), (1.0, 40, 0.95), (0.7, 50, 1.0), (1.0, 0, 1.0),
    (0.9, 1, 0.9), (1.0, 2000, 0.99), (1.3, 0, 0.5), (0.0, 0, 0.9), (1e-4, 0, 0.9), (50.0, 0, 0.95),
    (1.0, 0, 0.999), (1.0, BIG_V, 0.9), (0.5, 100_000, 1.0), (1.0, 0, 1e-9),
]


def lm_like_row(rng: np.random.Generator, v: int, dtype=np.float32) -> np.ndarray:
    """A row shaped like a language model's: a Gaussian bulk, a few tokens far above it, and
    exact ties (float32 and bf16-like rounding make them common in real logits)."""
    x = rng.normal(size=v) * rng.uniform(1.0, 3.5)
    top = rng.choice(v, size=min(v, int(rng.integers(1, 30))), replace=False)
    x[top] += rng.uniform(4, 20) * rng.random(len(top))
    if rng.random() < 0.5:
        x = np.round(x * 64) / 64  # coarse values: many ties
    return x.astype(dtype)


def adversarial_rows(v: int) -> list[np.ndarray]:
    rng = np.random.default_rng(v)
    rows = [
        np.zeros(v, dtype=np.float32),  # flat: everything tied
        np.full(v, 3.25),
        np.where(np.arange(v) % 2 == 0, 1.0, 0.0),  # two tied levels
        np.r_[np.zeros(v - 1), 1e4],  # one huge logit, last id
        np.r_[1e4, np.zeros(v - 1)],  # one huge logit, first id
        np.r_[np.full(max(v - 3, 0), -np.inf), [2.0, 2.0, 1.0]][-v:],  # masked tokens
        (rng.normal(size=v) * 2.5).astype(np.float32),  # flat Gaussian: a huge nucleus
        np.round(rng.normal(size=v) * 0.01, 2),  # nearly uniform with ties
        np.linspace(0.0, 1.0, v)[::-1].copy(),  # strictly ordered by id, descending
        np.repeat(np.arange(v // 8 + 1, dtype=np.float64), 8)[:v],  # blocks of 8 ties
    ]
    ladder = [2.0 ** -j for j in range(1, 12)]  # exactly representable probabilities
    rows.append(np.log(np.r_[ladder, np.full(max(v - 11, 0), 2.0 ** -40)][:v]))
    rows.append(np.log(np.r_[np.full(max(v - 11, 0), 2.0 ** -40), ladder][-v:]))
    return rows


def assert_rows_match(logits: np.ndarray, params: SamplingParams) -> None:
    want_p = _reference_target_probs(logits, params)
    got_p = target_probs(logits, params)
    assert got_p.dtype == np.float64 and got_p.shape == want_p.shape
    assert np.array_equal(got_p, want_p, equal_nan=True), params
    want_q, got_q = _reference_draft_dist(logits, params), draft_dist(logits, params)
    assert got_q.ids.dtype == np.int64 and got_q.weights.dtype == np.int64
    assert np.array_equal(got_q.ids, want_q.ids), params
    assert np.array_equal(got_q.weights, want_q.weights), params


def test_softmax_is_bit_for_bit_the_textbook_form():
    rng = np.random.default_rng(20)
    for dtype in (np.float32, np.float64, np.float16, np.int32):
        for t in (0.3, 0.7, 1.0, 1.7):
            x = (rng.normal(size=5000) * 4).astype(dtype)
            assert np.array_equal(softmax(x, t), _reference_softmax(x, t))
    assert np.array_equal(softmax([1, 2, 3]), _reference_softmax([1, 2, 3]))


@pytest.mark.parametrize("temperature,top_k,top_p", ROW_SETTINGS)
def test_fast_rows_equal_the_reference_on_a_152k_vocabulary(temperature, top_k, top_p):
    params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p)
    rng = np.random.default_rng(int(temperature * 1000) + top_k + int(top_p * 100))
    for i in range(4):
        assert_rows_match(lm_like_row(rng, BIG_V, np.float32 if i % 2 else np.float64), params)


@pytest.mark.parametrize("temperature,top_k,top_p", ROW_SETTINGS[:10])
def test_fast_rows_equal_the_reference_on_adversarial_152k_rows(temperature, top_k, top_p):
    params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p)
    for logits in adversarial_rows(BIG_V):
        assert_rows_match(logits, params)


def test_fast_rows_equal_the_reference_on_small_vocabularies():
    rng = np.random.default_rng(21)
    for v in (1, 2, 3, 7, 64, 1000, 4097, 5000, 20_000):
        for logits in adversarial_rows(v) + [lm_like_row(rng, v) for _ in range(3)]:
            for temperature, top_k, top_p in ROW_SETTINGS:
                assert_rows_match(logits, SamplingParams(temperature, top_p, top_k))


def test_flat_rows_take_the_long_head_and_still_equal_a_full_sort():
    """The flat-distribution path (heads of 4k, 16k, 64k tokens instead of a full sort)."""
    rng = np.random.default_rng(22)
    for scale in (0.5, 1.0, 2.0, 2.5, 3.0, 4.0, 6.0):
        logits = rng.normal(size=BIG_V) * scale
        for top_p in (0.5, 0.9, 0.95, 0.99):
            assert_rows_match(logits, SamplingParams(temperature=1.0, top_p=top_p))


def large_nucleus_row(rng: np.random.Generator, kind: str) -> np.ndarray:
    """A row whose top-p nucleus is thousands to ~100k tokens: a flat Gaussian bulk, a spread
    head a little above it, or coarse / half-precision values (exact ties everywhere, the cut
    value included)."""
    x = rng.normal(size=BIG_V) * rng.uniform(1.0, 3.0)
    if kind == "spread":
        top = rng.choice(BIG_V, size=20, replace=False)
        x[top] += 7.0 * rng.random(20)
    elif kind == "coarse":
        x = np.round(x * 4) / 4
    elif kind == "half":
        x = x.astype(np.float16)
    return x.astype(np.float32) if kind != "half" else x


@pytest.mark.parametrize("kind", ["flat", "spread", "coarse", "half"])
def test_large_nucleus_rows_equal_the_reference(kind):
    """Nuclei of 5k-100k tokens (the thresholded head, not the 1024-token one) across
    temperatures and top-k / top-p, ties included: bit for bit the reference's p and q."""
    rng = np.random.default_rng(["flat", "spread", "coarse", "half"].index(kind) + 30)
    settings_ = [(t, k, p) for t in (0.6, 1.0, 1.4) for k, p in
                 [(0, 0.8), (0, 0.95), (0, 0.99), (5000, 0.95), (60_000, 0.9), (20_000, 1.0)]]
    for i in range(4):
        logits = large_nucleus_row(rng, kind)
        for temperature, top_k, top_p in settings_[i::2]:
            assert_rows_match(logits, SamplingParams(temperature, top_p, top_k))


def test_any_head_threshold_gives_the_same_truncation(monkeypatch):
    """The head's size is only a guess: far too short (retried, then the whole vocabulary),
    ending just short of or just past the nucleus, or far too long, the kept tokens and their
    probabilities are the reference's."""
    rng = np.random.default_rng(31)
    tries = [(), (8.0,), (0.999, 0.0), (0.02,)] + [(s,) for s in np.linspace(0.9, 1.1, 41)]
    for kind, (temperature, top_p) in zip(["flat", "coarse", "spread"],
                                          [(1.0, 0.95), (0.8, 0.9), (1.2, 0.99)]):
        logits = large_nucleus_row(rng, kind)
        params = SamplingParams(temperature, top_p)
        want_p, want_q = _reference_target_probs(logits, params), _reference_draft_dist(logits, params)
        for shares in tries:
            monkeypatch.setattr(core, "_TAIL_SHARES", shares)
            assert np.array_equal(target_probs(logits, params), want_p), shares
            assert draft_dist(logits, params) == want_q, shares


def test_top_p_drops_a_token_whose_mass_before_it_is_exactly_top_p():
    """Exactly representable probabilities (1/2, 1/4, ... and zeros) on a 152k vocabulary: the
    running mass lands on top_p itself, and the token there is dropped (mass before < top_p)."""
    ladder = [2.0**-j for j in range(1, 12)] + [2.0**-11]
    probs = np.r_[ladder, np.zeros(BIG_V - len(ladder))]
    for top_p, kept_n in [(0.5, 1), (0.75, 2), (0.875, 3), (1 - 2.0**-11, 11), (0.8, 3)]:
        got = truncate_probs(probs, 0, top_p)
        assert np.count_nonzero(got) == kept_n, top_p
        assert np.array_equal(got, _reference_truncate_probs(probs, 0, top_p)), top_p
        for top_k in (2, 3, 12, 5000):
            want = _reference_truncate_probs(probs, top_k, top_p)
            assert np.array_equal(truncate_probs(probs, top_k, top_p), want), (top_k, top_p)


def test_a_strided_guess_that_misjudges_the_tail_still_equals_the_reference():
    """Every 64th token (the ones the head's size is guessed from) far above or below the rest."""
    rng = np.random.default_rng(32)
    for shift in (-30.0, -3.0, 3.0, 30.0):
        logits = rng.normal(size=BIG_V) * 2.0
        logits[::64] += shift
        for top_p in (0.5, 0.9, 0.99):
            assert_rows_match(logits, SamplingParams(1.0, top_p))


@settings(max_examples=300, deadline=None)
@given(
    logits=st.lists(st.sampled_from([-3.0, -1.0, 0.0, 0.0, 0.5, 1.0, 1.0, 2.0, 8.0]), min_size=1,
                    max_size=40),
    temperature=st.sampled_from([0.0, 0.01, 0.5, 1.0, 3.0]),
    top_k=st.integers(0, 45),
    top_p=st.sampled_from([0.1, 0.5, 0.9, 0.95, 1.0]),
)
def test_fast_rows_equal_the_reference_on_tie_heavy_rows(logits, temperature, top_k, top_p):
    assert_rows_match(np.array(logits), SamplingParams(temperature, top_p, top_k))


def test_verify_block_u_spends_one_uniform_per_test_and_one_for_the_draw():
    from sampling import inverse_cdf, verify_block_u

    p = np.array([0.5, 0.3, 0.2])
    q = sparse([0, 1], [1, 3])  # q = [0.25, 0.75, 0]
    # token 1: p/q = 0.4; u = 0.39 accepts (bonus drawn from row 1), u = 0.41 rejects and draws
    # from the residual norm([0.25, 0, 0.2]) = [5/9, 0, 4/9]
    assert verify_block_u([1], [q], [p, p], [0.39, 0.99]) == (Outcome(1, None), 2)
    assert verify_block_u([1], [q], [p, p], [0.41, 0.5]) == (Outcome(0, 0), None)
    assert verify_block_u([1], [q], [p, p], [0.41, 0.6]) == (Outcome(0, 2), None)
    assert verify_block_u([0], [q], [p], [0.999, 0.1]) == (Outcome(1, None), None)  # p >= q
    assert inverse_cdf(p, 0.5) == 1 and inverse_cdf(p, 0.0) == 0 and inverse_cdf(p, 0.8) == 2
    with pytest.raises(ValueError):
        verify_block_u([2], [q], [p], [0.5, 0.5])
