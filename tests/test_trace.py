"""bench.trace's summary of one answer's message timeline."""
from __future__ import annotations

import pytest

from bench.trace import Event, summarize


def ev(t, direction, msg_type, ids=0, **fields):
    return Event(t, direction, msg_type, fields, ids)


def test_turnaround_is_from_a_correction_to_the_first_draft_of_its_new_epoch():
    events = [
        ev(0.0, "up", "Prompt", 50),
        ev(3.0, "down", "Prefilled", epoch=1),
        ev(3.0, "up", "Draft", 8, epoch=1, pos=51),
        ev(3.6, "down", "Verdict", epoch=1, new_epoch=2, kind="recovered", verify_s=0.5),
        ev(3.65, "up", "Draft", 3, epoch=1, pos=59),  # stale: drafted before the verdict came
        ev(3.8, "up", "Draft", 4, epoch=2, pos=54),
        ev(4.3, "down", "Verdict", epoch=2, new_epoch=2, kind="accepted", verify_s=0.4),
    ]
    s = summarize(events)
    assert s["corrections"] == 1 and s["turnaround_ms"] == [200] and s["block_after_correction"] == [4]
    assert s["verdicts"] == {"recovered": 1, "accepted": 1}
    assert s["decode_s"] == pytest.approx(1.3) and s["busy"] == pytest.approx(0.9 / 1.3)


def test_an_answer_without_corrections_has_no_turnaround():
    s = summarize([ev(0.0, "up", "Prompt", 5), ev(1.0, "down", "Prefilled", epoch=1)])
    assert s["corrections"] == 0 and s["turnaround_ms_median"] is None
