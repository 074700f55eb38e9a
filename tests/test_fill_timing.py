"""Bubble filling's timing (cloud/fill.py): after a correction the verifier fills only while a
filled token's pass can end before the edge's next block is due, waits for the block otherwise,
and fills after all when the block is late. Pure logic on a fake clock; the filled tokens
themselves are tested in tests/test_cloud_round.py."""
from __future__ import annotations

import pytest

from cloud.fill import LATE, BubbleFill, FillTiming, NoFill


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
    fill.close_bubble(arrived_at=105.0)  # the prompt's bubble measures nothing
    assert timing.turnaround is None
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
