"""bench/batch_sweep.py: the capacity sweep runs end to end on the tiny preset on the CPU."""
from __future__ import annotations

import json

from bench import batch_sweep
from cloud.server import ServerConfig


def test_default_tick_budget_is_the_servers():
    assert batch_sweep.SERVER_TOKENS_PER_TICK == ServerConfig.batch_max_tokens


def test_tiny_sweep_reports_every_session_count(tmp_path, capsys):
    out = tmp_path / "sweep.json"
    assert batch_sweep.main(["--preset", "tiny", "--sessions", "1,2", "--passes", "2", "--context", "16",
                             "--block", "4", "--json", str(out), "--no-plot"]) == 0
    r = json.loads(out.read_text())
    assert r["batched"] and r["device"] == "cpu" and r["preset"] == "tiny"
    assert [s["sessions"] for s in r["sweeps"]] == [1, 2]
    for s in r["sweeps"]:
        assert len(s["round_s_all"]) == 2 and all(t > 0 for t in s["round_s_all"])
        assert s["rows_per_s"] > 0 and s["ticks_per_round"] == 1  # 2 x 5 ids fit in one tick
        assert s["rows_per_tick"] == s["sessions"] * 5  # block + the unfed committed id, per session
    assert r["sweeps"][0]["rows_per_s_x1"] == 1.0
    assert "goal" not in capsys.readouterr().out  # no 64-session row, no verdict on the goal


def test_a_small_tick_budget_splits_a_round_into_ticks(tmp_path):
    out = tmp_path / "sweep.json"
    batch_sweep.main(["--preset", "tiny", "--layers", "1", "--sessions", "3", "--passes", "1", "--context", "8",
                      "--block", "4", "--tokens-per-tick", "10", "--json", str(out), "--no-plot"])
    (s,) = json.loads(out.read_text())["sweeps"]
    assert s["ticks_per_round"] == 2 and s["tick_sizes"] == [[1, 5], [2, 10]]  # (sessions, fed ids)
    assert s["rows_per_s_x1"] is None  # N = 1 was not swept
