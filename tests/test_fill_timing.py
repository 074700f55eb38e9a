"""Bubble filling's timing (cloud/fill.py): after a correction the verifier fills only while a
filled token's pass can end before the edge's next block is due, waits for the block otherwise,
and fills after all when the block is late. Pure logic on a fake clock; the filled tokens
themselves are tested in tests/test_cloud_round.py."""
from __future__ import annotations

import pytest

from cloud.fill import LATE, BubbleFill, FillTiming, FillTimings, NoFill


class Clock:
    def __init__(self, t: float = 100.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def test_after_a_correction_it_fills_only_while_a_pass_ends_before_the_block_is_due():
    clock = Clock()
    fill = BubbleFill(FillTiming(turnaround=0.30, pass_s=0.25), clock)
    assert fill.hold_s() == 0.0  # the prompt's bubble: the edge may still be prefilling, fill
    fill.open_bubble()  # a correction at t = 100
    assert fill.hold_s() == 0.0  # a pass ends at 100.25, the block is due at 100.30
    clock.t = 100.1  # a second pass would end at 100.35: after the block is due
    assert fill.hold_s() == pytest.approx(0.30 + LATE * 0.25 - 0.1)
    clock.t = 100.30 + LATE * 0.25 + 0.01  # the block is late: fill after all
    assert fill.hold_s() == 0.0


@pytest.mark.parametrize("first_block, fills", [(0.12, False), (4.0, True)])
def test_the_prompts_bubble_fills_only_for_an_edge_that_is_still_prefilling(first_block, fills):
    """An edge that prefills faster than the verifier has its first block on the way when Prefilled
    goes down (0.12 s: a round trip): a fill pass would only delay that block's verify pass. One
    that prefills more slowly (4 s: a Pi beside a GPU) leaves a bubble worth filling."""
    clock = Clock()
    fill = BubbleFill(FillTiming(first_block=first_block, pass_s=0.3), clock)
    assert (fill.hold_s() == 0.0) is fills
    if not fills:  # it waits for the block, and fills after all if the block is late
        assert fill.hold_s() == pytest.approx(0.12 + LATE * 0.3)
        clock.t += 0.12 + LATE * 0.3 + 0.01
        assert fill.hold_s() == 0.0


def test_without_measurements_it_fills_at_once():
    clock = Clock()
    for timing in (FillTiming(), FillTiming(turnaround=0.3), FillTiming(pass_s=0.3)):
        fill = BubbleFill(timing, clock)
        fill.open_bubble()
        clock.t += 0.2
        assert fill.hold_s() == 0.0
    assert NoFill().hold_s() == 0.0


def test_the_turnaround_runs_from_a_correction_to_the_arrival_of_the_next_fresh_block():
    clock = Clock()
    timing = FillTiming()
    fill = BubbleFill(timing, clock)
    fill.close_bubble(arrived_at=105.0)  # the prompt's bubble is timed apart
    assert timing.turnaround is None and timing.first_block == pytest.approx(5.0)
    fill.open_bubble()
    clock.t = 100.5  # the loop notices late (it was in a pass): the arrival time counts
    fill.close_bubble(arrived_at=100.4)
    assert timing.turnaround == pytest.approx(0.4)
    fill.close_bubble(arrived_at=101.0)  # no bubble open: nothing
    assert timing.turnaround == pytest.approx(0.4)
    fill.open_bubble()
    fill.close_bubble(arrived_at=100.5 + 0.2)
    assert 0.2 < timing.turnaround < 0.4  # a moving average
    fill.observe_pass(0.3)
    fill.observe_pass(0.2)
    assert 0.2 < timing.pass_s < 0.3


def test_a_devices_sessions_share_one_timing_and_the_store_is_bounded():
    """A one-shot answer opens a fresh session: it starts from what its device (a token's or a peer
    address's sessions) measured before, not from nothing."""
    store = FillTimings(kept=2)
    pi = store.of("peer:10.0.0.7")
    pi.observe_first_block(3.5)
    assert store.of("peer:10.0.0.7") is pi and pi.first_block == pytest.approx(3.5)
    assert store.of("token#0") is not pi
    assert store.of(None) is not store.of(None)  # no device to remember
    store.of("peer:10.0.0.7")  # seen again: the least recently seen is now token#0
    store.of("peer:10.0.0.8")
    assert set(store.by_key) == {"peer:10.0.0.7", "peer:10.0.0.8"}
