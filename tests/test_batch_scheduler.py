"""Cross-session batching in the verifier: many sessions' passes in one forward pass per tick, each
answer what that session alone would get, fair to everyone, and a bad item costs only itself."""
from __future__ import annotations

import asyncio

import numpy as np
import pytest
import torch

import codec
from cloud.engine import TargetEngine, greedy_reference
from cloud.scheduler import Scheduler, Work, run_tick
from cloud.server import ServerConfig
from edge_app.link import CloudLink
from edge_app.pipeline import GenerateOptions, Pipeline
from sampling import SamplingParams, target_probs
from tests.tiny import EOS, ServerThread, TinyDrafter, fingerprint, perturbed, tiny_model

PROMPTS = [[1, 2, 3], [5, 9, 11, 40, 2], [7], [60, 61, 3, 3, 3, 8, 21], [4, 4, 4, 4], [33, 2]]


@pytest.fixture(scope="module")
def target():
    return tiny_model(0)


async def _answer(url, drafter, prompt, params: SamplingParams, max_new: int, block: int = 3):
    link = CloudLink(url)
    await link.connect(codec.Hello(fingerprint=fingerprint(), sampling={
        "temperature": params.temperature, "top_p": params.top_p, "top_k": params.top_k, "seed": params.seed}))
    try:
        opts = GenerateOptions(max_new_tokens=max_new, params=params, block=block, stop_ids=(EOS,) if params.greedy else (),
                               fill=False, mode="pipeline")
        return await Pipeline(drafter, link, opts).run(prompt)
    finally:
        await link.close()


def _histogram(server, name):
    return server.server.metrics.histogram_counts(name)


def test_many_greedy_sessions_at_once_each_get_the_targets_own_answer(target):
    drafters = [TinyDrafter(perturbed(target, noise, seed=i)) for i, noise in enumerate([0.0, 0.5, 2.0, 5.0] * 3)]
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(len(drafters))]
    with ServerThread(TargetEngine(target), ServerConfig(port=0, max_sessions_per_token=0)) as s:
        async def run():
            return await asyncio.gather(*[_answer(s.url, d, p, SamplingParams(temperature=0.0), 24)
                                          for d, p in zip(drafters, prompts)])
        answers = asyncio.run(run())
        sizes = _histogram(s, "picospec_batch_sessions")
    for ans, p in zip(answers, prompts):
        want, _ = greedy_reference(TargetEngine(target), p, 24, EOS)
        assert ans.token_ids == want
    assert sum(c for b, c in sizes.items() if b != "1") > 0, sizes  # passes were shared


def _second_token_marginal(target, prompt, params):
    def p(ids):
        with torch.inference_mode():
            return target_probs(target(input_ids=torch.tensor([ids])).logits[0, -1].double().numpy(), params)
    p0 = p(prompt)
    return sum(p0[t] * p(prompt + [int(t)]) for t in np.flatnonzero(p0))


@pytest.mark.parametrize("together", [1, 4])
def test_sampled_answers_follow_the_target_whatever_the_batch_size(target, together):
    """1200 two-token answers from `together` sessions at once: the drafted second token's empirical
    distribution matches the target's marginal (TV under twice an exact sampler's expectation)."""
    params = SamplingParams(temperature=1.0, top_p=0.95)
    rounds = 1200
    prompt = PROMPTS[1]
    with ServerThread(TargetEngine(target), ServerConfig(port=0, max_sessions_per_token=0)) as s:
        async def worker(w):
            drafter = TinyDrafter(perturbed(target, 2.0))
            out = []
            for i in range(w, rounds, together):
                ans = await _answer(s.url, drafter, prompt, SamplingParams(1.0, 0.95, 0, seed=i), 2, block=2)
                out.append(ans.token_ids[1])
            return out

        async def run():
            return await asyncio.gather(*[worker(w) for w in range(together)])
        tokens = [t for part in asyncio.run(run()) for t in part]
        sizes = _histogram(s, "picospec_batch_sessions")
    emp = np.bincount(tokens, minlength=target.config.vocab_size) / rounds
    p = _second_token_marginal(target, prompt, params)
    tv = 0.5 * np.abs(emp - p).sum()
    bound = 2 * 0.5 * np.sqrt(int((p > 0).sum()) / rounds)
    assert tv < bound, (tv, bound)
    if together > 1:
        assert sum(c for b, c in sizes.items() if b != "1") > 0, sizes


class _Session:
    def __init__(self, engine):
        self.engine = engine


def _work(kind, engine, feed, finish=lambda rows: rows):
    w = Work(kind, _Session(engine), feed, finish)
    return w


def test_a_tick_takes_the_oldest_first_and_fills_the_token_budget_in_age_order(target):
    async def run():
        sched = Scheduler(batch=True, max_tokens=10)
        loop = asyncio.get_running_loop()
        engine = TargetEngine(target)
        items = [_work("verify", engine, [1] * n) for n in (12, 4, 7, 3, 2)]
        for w in items:
            w.future = loop.create_future()
            sched.ready.append(w)
        items[3].future.cancel()  # its session went away: never runs
        first = sched.pull()
        second = sched.pull()
        third = sched.pull()
        return items, first, second, third
    items, first, second, third = asyncio.run(run())
    assert first == [items[0]]  # the oldest runs even past the budget
    assert second == [items[1], items[4]]  # 4 + 2 fit in 10; 7 would not (4 + 7 > 10)
    assert third == [items[2]]


def test_a_tick_takes_one_prompt_chunk_and_every_verify_pass(target):
    async def run():
        sched = Scheduler(batch=True, max_tokens=256)
        loop = asyncio.get_running_loop()
        engine = TargetEngine(target)
        items = [_work(kind, engine, [1] * n) for kind, n in
                 (("prefill", 64), ("prefill", 64), ("verify", 5), ("fill", 1), ("prefill", 30), ("verify", 9))]
        for w in items:
            w.future = loop.create_future()
            sched.ready.append(w)
        return items, sched.pull(), sched.pull(), sched.pull()
    items, first, second, third = asyncio.run(run())
    assert first == [items[0], items[2], items[3], items[5]]
    assert second == [items[1]] and third == [items[4]]


def test_a_long_prompt_is_chunked_so_verify_passes_join_every_tick(target):
    engine = TargetEngine(target)
    config = ServerConfig(port=0, prefill_chunk=32, max_sessions_per_token=0)
    long_prompt = [(i * 7) % 60 for i in range(300)]
    with ServerThread(engine, config) as s:
        async def run():
            short = _answer(s.url, TinyDrafter(perturbed(target, 1.0)), PROMPTS[0], SamplingParams(0.0), 30, block=2)
            long = _answer(s.url, TinyDrafter(target), long_prompt, SamplingParams(0.0), 4)
            return await asyncio.gather(short, long)
        short, long = asyncio.run(run())
        tokens = _histogram(s, "picospec_batch_tokens")
    assert short.token_ids == greedy_reference(TargetEngine(target), PROMPTS[0], 30, EOS)[0]
    assert long.token_ids == greedy_reference(TargetEngine(target), long_prompt, 4, EOS)[0]
    # the 300-id prompt went in 32-id chunks, one a tick: a pass holds at most one chunk plus the
    # short session's 3-id block (35 ids, bucket "64"); an unchunked prompt would land in "512"
    assert sum(c for b, c in tokens.items() if b in ("128", "256", "512", "+Inf")) == 0, tokens
    assert sum(tokens.values()) >= 300 // 32, tokens


def test_a_failing_item_costs_only_itself_and_its_pass_is_undone_for_the_others(target):
    good = [TargetEngine(target) for _ in range(3)]
    for e in good:
        e.prefill([1, 2, 3])
    bad = TargetEngine(target)
    bad.prefill([4, 5])

    def boom(rows):
        raise ValueError("a bad block")

    # an id past the vocabulary makes the shared forward pass fail part way
    works = [_work("verify", good[0], [7, 8]), _work("verify", bad, [9999]), _work("decode", good[1], [3]),
             _work("verify", good[2], [6], boom)]
    results = run_tick(works)
    assert results[0][0] and results[2][0]
    assert not results[1][0] and not results[3][0] and isinstance(results[3][1], ValueError)
    assert [e.cache_len for e in good] == [5, 4, 4] and bad.cache_len == 2
    # the good sessions' rows are what their own forward pass gives
    ref = TargetEngine(target)
    ref.prefill([1, 2, 3])
    assert torch.allclose(results[0][1], ref.forward([7, 8]), atol=1e-5)


def test_metrics_show_batch_size_and_tokens_per_pass_histograms(target):
    with ServerThread(TargetEngine(target)) as s:
        asyncio.run(_answer(s.url, TinyDrafter(target), PROMPTS[0], SamplingParams(0.0), 6))
        text = s.server.metrics.render()
    assert '# TYPE picospec_batch_sessions_bucket counter' in text
    assert 'picospec_batch_sessions_bucket{le="1"}' in text and 'picospec_batch_tokens_bucket{le="+Inf"}' in text
    assert "picospec_batch_tokens_count" in text and '# TYPE picospec_batch_sessions summary' in text
