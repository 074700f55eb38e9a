"""EdgeMeters: phase accounting, TTFT, per-token latency percentiles, with a fake clock."""
from __future__ import annotations

import random
import time

import numpy as np
import pytest

from edge_app.meters import PHASES, EdgeMeters, latency_summary_ms, peak_rss_mib, percentile


class FakeClock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += seconds


@pytest.fixture
def clocks():
    wall, cpu = FakeClock(), FakeClock()
    meters = EdgeMeters(clock=wall, cpu_clock=cpu, rss_mib=lambda: 123.0)
    return meters, wall, cpu


def test_percentile_matches_numpy_linear_interpolation():
    rng = random.Random(7)
    for n in (1, 2, 3, 10, 101):
        values = sorted(rng.uniform(0, 100) for _ in range(n))
        for q in (0, 1, 50, 95, 99, 100):
            assert percentile(values, q) == pytest.approx(np.percentile(values, q))


def test_percentile_of_nothing_is_none_and_q_is_checked():
    assert percentile([], 50) is None
    assert latency_summary_ms([]) == {"p50": None, "p95": None, "p99": None, "mean": None}
    with pytest.raises(ValueError):
        percentile([1.0], 101)


def test_nested_phases_do_not_double_count(clocks):
    meters, wall, _ = clocks
    with meters.phase("draft"):
        wall.advance(1.0)
        with meters.phase("network_wait"):
            wall.advance(2.0)
        wall.advance(0.5)
    wall.advance(0.25)  # outside any phase
    snap = meters.snapshot()
    assert snap["phases_s"]["draft"] == pytest.approx(1.5)
    assert snap["phases_s"]["network_wait"] == pytest.approx(2.0)
    assert snap["phase_counts"]["draft"] == 1 and snap["phase_counts"]["network_wait"] == 1
    assert snap["wall_s"] == pytest.approx(3.75)
    assert sum(snap["phases_s"].values()) <= snap["wall_s"]


def test_phases_accumulate_over_repeated_entries_and_every_known_phase_is_reported(clocks):
    meters, wall, _ = clocks
    for _ in range(3):
        with meters.phase("draft"):
            wall.advance(0.1)
        with meters.phase("rollback"):
            wall.advance(0.01)
    snap = meters.snapshot()
    assert set(PHASES) <= set(snap["phases_s"])
    assert snap["phases_s"]["draft"] == pytest.approx(0.3)
    assert snap["phases_s"]["rollback"] == pytest.approx(0.03)
    assert snap["phase_counts"]["draft"] == 3
    assert snap["phases_s"]["idle"] == 0.0


def test_snapshot_includes_the_running_part_of_an_open_phase(clocks):
    meters, wall, _ = clocks
    meters.enter("prefill")
    wall.advance(0.4)
    assert meters.snapshot()["phases_s"]["prefill"] == pytest.approx(0.4)
    wall.advance(0.1)
    meters.exit("prefill")
    assert meters.snapshot()["phases_s"]["prefill"] == pytest.approx(0.5)


def test_exiting_the_wrong_phase_is_an_error(clocks):
    meters, _, _ = clocks
    meters.enter("draft")
    with pytest.raises(RuntimeError):
        meters.exit("network_wait")


def test_ttft_is_measured_from_start_and_only_once(clocks):
    meters, wall, _ = clocks
    wall.advance(0.3)
    meters.mark_first_token()
    wall.advance(1.0)
    meters.mark_first_token()
    assert meters.snapshot()["ttft_s"] == pytest.approx(0.3)


def test_tokens_committed_together_share_the_gap(clocks):
    meters, wall, _ = clocks
    wall.advance(0.5)
    meters.tokens_committed(1)  # first commit: sets TTFT, no per-token sample
    wall.advance(0.2)
    meters.tokens_committed(4)  # four tokens after 200 ms: 50 ms each
    wall.advance(0.1)
    meters.tokens_committed(1)  # one token after 100 ms
    meters.tokens_committed(0)  # ignored
    snap = meters.snapshot()
    assert snap["ttft_s"] == pytest.approx(0.5)
    assert snap["tokens"] == 6
    tpot = snap["tpot_ms"]
    assert tpot["p50"] == pytest.approx(50.0)
    assert tpot["p99"] == pytest.approx(98.0)  # rank 3.96 of [50, 50, 50, 50, 100]
    # the mean is the usual TPOT: (t_last - t_first) / tokens after the first commit
    assert tpot["mean"] == pytest.approx((0.8 - 0.5) / 5 * 1e3)


def test_cpu_time_rss_and_restart(clocks):
    meters, wall, cpu = clocks
    cpu.advance(2.5)
    wall.advance(1.0)
    meters.tokens_committed(3)
    snap = meters.snapshot()
    assert snap["cpu_s"] == pytest.approx(2.5)
    assert snap["peak_rss_mib"] == 123.0
    meters.start()
    snap = meters.snapshot()
    assert snap["cpu_s"] == 0.0 and snap["wall_s"] == 0.0 and snap["tokens"] == 0
    assert snap["ttft_s"] is None


def test_peak_rss_units_per_platform():
    assert peak_rss_mib(2048, platform="linux") == pytest.approx(2.0)
    assert peak_rss_mib(3 * 1024 * 1024, platform="darwin") == pytest.approx(3.0)
    assert peak_rss_mib() > 1.0  # this Python process is bigger than 1 MiB


def test_real_clocks_snapshot_has_the_keys():
    meters = EdgeMeters()
    with meters.phase("draft"):
        sum(range(1000))
    meters.tokens_committed(1)
    snap = meters.snapshot()
    assert set(snap) >= {"phases_s", "ttft_s", "tpot_ms", "cpu_s", "peak_rss_mib", "wall_s", "tokens"}
    assert set(snap["tpot_ms"]) == {"p50", "p95", "p99", "mean"}


def test_cheap_enough_to_call_per_token():
    meters = EdgeMeters()
    n = 20_000
    began = time.perf_counter()
    for _ in range(n):
        with meters.phase("draft"):
            pass
        meters.tokens_committed(1)
    per_token_us = (time.perf_counter() - began) / n * 1e6
    assert per_token_us < 50  # a draft step costs tens of milliseconds
