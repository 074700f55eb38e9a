"""One definition of acceptance and of the rates every report shows (edge_app.stats)."""
from __future__ import annotations

import pytest

from edge_app.stats import SUMMED, acceptance_rate, merge_stats


def test_acceptance_is_accepted_over_verified_drafts():
    assert acceptance_rate(3, 1) == 0.75
    assert acceptance_rate(0, 4) == 0.0
    assert acceptance_rate(5, 0) == 1.0
    assert acceptance_rate(0, 0) is None  # nothing verified (cloud-only, edge-only): no rate, not 0


def answer(**counts) -> dict:
    return {**{k: 0 for k in SUMMED}, "mode": "pipeline", "ttft_s": None, **counts}


def test_merged_rates_come_from_the_totals_not_the_mean_of_rates():
    a = answer(accepted=9, rejected=1, rounds=3, new_tokens=12, wall_s=2.0, bytes_up=120, ttft_s=0.5)
    b = answer(accepted=1, rejected=9, rounds=5, new_tokens=8, wall_s=2.0, bytes_up=80, ttft_s=1.5)
    total = merge_stats([a, b])
    assert total["acceptance_rate"] == pytest.approx(10 / 20)
    assert total["mean_accepted_per_round"] == pytest.approx(10 / 8)
    assert total["tokens_per_s"] == pytest.approx(20 / 4.0)
    assert total["bytes_up_per_token"] == pytest.approx(200 / 20)
    assert total["ttft_s"] == pytest.approx(1.0) and total["mode"] == "pipeline"


def test_merging_answers_without_drafts_or_time():
    total = merge_stats([answer(mode="cloud")])
    assert total["acceptance_rate"] is None and total["tokens_per_s"] is None
    assert merge_stats([])["mode"] is None
