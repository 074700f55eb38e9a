"""`picospec load` with the tiny models: 16 concurrent sessions against one verifier, every answer
the same as the session's solo run, idle sessions evicted and resumed, memory bounded."""
from __future__ import annotations

import asyncio

from cloud.engine import TargetEngine
from bench.loadtest import LoadConfig, run_load, summary
from bench.replay import ReplayDrafter
from cloud.server import ServerConfig
from tests.tiny import tiny_model
from tests.tiny_edge import Verifier

PROMPTS = [[1, 2, 3], [5, 9, 11, 40, 2], [7], [60, 61, 3, 3, 3, 8, 21]]


def test_sixteen_concurrent_sessions_match_their_solo_runs():
    cfg = LoadConfig(sessions=16, max_new_tokens=24, idle_sessions=2, idle_timeout_s=0.5)
    config = ServerConfig(port=0, idle_timeout_s=cfg.idle_timeout_s, max_sessions_per_token=16)
    with Verifier(TargetEngine(tiny_model(0)), config) as v:
        r = asyncio.run(run_load(v.url, PROMPTS, cfg, log=lambda m: None))
        assert not v.server.sessions
    text = summary(r)
    assert r["identical_to_solo"], text
    assert r["solo_equal_to_target_alone"] == 16, text
    assert all(s["new_tokens"] > 0 for s in r["sessions"])
    assert r["kv_cache_tokens_after"] == 0 and r["rss_bounded"], text
    idle = r["idle"]
    assert idle["napped"] == idle["evicted"] == 2 and idle["reconnects"] >= 2, text
    assert idle["identical_to_solo"] and idle["kv_cache_tokens_after"] == 0, text
    assert r["round_trip_s"]["p50"] > 0 and r["throughput_tok_s"] > 0
    assert r["edge"].startswith("replay edge") and "replay edge" in text


def test_replay_drafter_misses_at_the_rate_asked_and_never_by_chance():
    ref = list(range(10, 60)) * 4
    d = ReplayDrafter([1, 2], ref, vocab_size=64, miss_rate=0.2, seed=3)
    proposals = [d.propose(2 + j, ref[j - 1] if j else 2) for j in range(len(ref))]
    misses = sum(p != r for p, r in zip(proposals, ref))
    assert 0.1 < misses / len(ref) < 0.3
    assert proposals == [d.propose(2 + j, ref[j - 1] if j else 2) for j in range(len(ref))]  # reproducible
    assert all(ReplayDrafter([1], ref, 64, miss_rate=0.0).propose(1 + j, 0) == r for j, r in enumerate(ref))
    d.prefill([1, 2])
    assert int(d.logits().argmax()) == proposals[0] and d.logits().sum() == 1.0


def test_the_sweep_reports_a_row_per_session_count_and_checks_every_answer(tmp_path):
    from bench.loadtest import run_sweep, save_plot, sweep_table

    cfg = LoadConfig(sessions=8, max_new_tokens=16, idle_sessions=1, idle_timeout_s=0.5)
    config = ServerConfig(port=0, idle_timeout_s=cfg.idle_timeout_s, max_sessions_per_token=8)
    with Verifier(TargetEngine(tiny_model(0)), config) as v:
        r = asyncio.run(run_sweep(v.url, PROMPTS, [1, 4, 8], cfg, log=lambda m: None))
        assert not v.server.sessions
    text = sweep_table(r)
    assert [s["sessions"] for s in r["sweeps"]] == [1, 4, 8], text
    assert r["identical_to_solo"] and all(not s["differences"] for s in r["sweeps"]), text
    assert all(s["throughput_tok_s"] > 0 and s["round_trip_s"]["p99"] > 0 for s in r["sweeps"])
    assert r["sweeps"][0]["x_throughput"] == 1.0 and r["sweeps"][0]["sessions_per_pass"] == 1.0
    assert r["sweeps"][2]["sessions_per_pass"] > 1.0, text  # eight sessions shared passes
    assert r["idle"]["identical_to_solo"] and r["idle"]["evicted"] >= 1, text
    assert "tok/s together" in text and "rt p99 ms" in text
    save_plot(r, str(tmp_path / "load.png"))
    assert (tmp_path / "load.png").stat().st_size > 1000
