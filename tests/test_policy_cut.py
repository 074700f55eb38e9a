"""The confidence that cuts a block short (edge_app.policy.token_confidence / cuts_block)."""
from __future__ import annotations

import numpy as np

from edge_app.policy import cuts_block, token_confidence


def _softmax(logits: np.ndarray, temperature: float) -> np.ndarray:
    z = logits.astype(np.float64) / temperature
    e = np.exp(z - z.max())
    return e / e.sum()


def test_confidence_is_the_draft_models_probability_of_the_token():
    rng = np.random.default_rng(3)
    logits = (rng.standard_normal(151_936) * 4).astype(np.float32)
    for token in (int(logits.argmax()), int(logits.argmin()), 17):
        for temperature in (1.0, 0.7):
            assert np.isclose(token_confidence(logits, token, temperature), _softmax(logits, temperature)[token],
                              rtol=1e-5, atol=1e-30)


def test_a_lower_temperature_makes_the_top_token_surer():
    logits = np.array([2.0, 1.5, 0.0, -1.0], dtype=np.float32)
    assert token_confidence(logits, 0, 0.5) > token_confidence(logits, 0, 1.0) > token_confidence(logits, 0, 2.0)


def test_a_token_far_below_the_top_has_confidence_near_zero_not_nan():
    logits = np.array([200.0, 0.0, -200.0], dtype=np.float32)
    assert token_confidence(logits, 0) == 1.0
    assert 0.0 <= token_confidence(logits, 2) < 1e-30


def test_a_block_is_cut_below_the_threshold_only():
    assert cuts_block(0.3, 0.5) and not cuts_block(0.5, 0.5) and not cuts_block(0.9, 0.5)
    assert not cuts_block(0.0, 0.0)  # 0 turns cutting off
