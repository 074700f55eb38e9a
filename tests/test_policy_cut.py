"""The probability that cuts a block short (sampling.token_prob, edge_app.policy.cuts_block)."""
from __future__ import annotations

import numpy as np

from edge_app.policy import cuts_block
from sampling import softmax, token_prob


def test_token_prob_is_the_softmax_probability_of_the_token():
    rng = np.random.default_rng(3)
    logits = (rng.standard_normal(151_936) * 4).astype(np.float32)
    for token in (int(logits.argmax()), int(logits.argmin()), 17):
        for temperature in (1.0, 0.7):
            assert np.isclose(token_prob(logits, token, temperature), softmax(logits, temperature)[token],
                              rtol=1e-5, atol=1e-30)


def test_a_lower_temperature_makes_the_top_token_surer():
    logits = np.array([2.0, 1.5, 0.0, -1.0], dtype=np.float32)
    assert token_prob(logits, 0, 0.5) > token_prob(logits, 0, 1.0) > token_prob(logits, 0, 2.0)


def test_a_token_far_below_the_top_has_confidence_near_zero_not_nan():
    logits = np.array([200.0, 0.0, -200.0], dtype=np.float32)
    assert token_prob(logits, 0) == 1.0
    assert 0.0 <= token_prob(logits, 2) < 1e-30


def test_a_block_is_cut_below_the_threshold_only():
    assert cuts_block(0.3, 0.5) and not cuts_block(0.5, 0.5) and not cuts_block(0.9, 0.5)
    assert not cuts_block(0.0, 0.0)  # 0 turns cutting off
