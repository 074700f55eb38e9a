"""bench.calibration's arithmetic: the draft's top probability and the target token's rank."""
from __future__ import annotations

import numpy as np

from bench.calibration import format_table, position_rows, summarize


def test_position_rows_read_the_top_probability_and_the_targets_rank():
    logits = np.log(np.array([[0.6, 0.3, 0.1, 0.0001], [0.2, 0.5, 0.25, 0.05], [0.1, 0.2, 0.3, 0.4]]))
    rows = position_rows(logits, [0, 2, 0])
    assert [r for _, r in rows] == [0, 1, 3]  # top, runner-up, below the top three
    assert np.allclose([p for p, _ in rows], [0.6 / 1.0001, 0.5, 0.4])


def test_summary_buckets_and_categories():
    rows = [("chat", 0.4, 0), ("chat", 0.45, 1), ("chat", 0.42, 2), ("chat", 0.99, 0), ("code", 0.97, 0)]
    s = summarize(rows)
    low = next(b for b in s["buckets"] if b["from"] == 0.3)
    assert low["positions"] == 3 and np.isclose(low["kept"], 1 / 3)
    top = s["buckets"][-1]
    assert top["positions"] == 2 and top["kept"] == 1.0 and top["to"] == 1.0
    chat = s["categories"]["chat"]
    assert (chat["positions"], chat["missed"], chat["runner_up_when_missed"], chat["third_when_missed"]) == (4, 2, 0.5, 0.5)
    assert s["categories"]["code"]["runner_up_when_missed"] is None
    assert "runner-up|missed" in format_table(s)
