"""The protocol and the pipeline end to end, over a real server and real sockets, with tiny real
torch models (milliseconds a pass), so that the hard cases can be driven many times.

The invariant every test pins: greedy output is token for token what the target alone writes, no
matter how good or bad the draft, how slow either side, or how many blocks are in flight.
"""
from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest
import torch

import codec
from cloud.engine import TargetEngine, greedy_reference
from cloud.server import ServerConfig
from edge_app.link import CloudLink
from edge_app.pipeline import GenerateOptions, Pipeline
from sampling import SamplingParams, target_probs
from tests.tiny import EOS, ServerThread, SlowEngine, TinyDrafter, fingerprint, perturbed, tiny_model

PROMPTS = [[1, 2, 3], [5, 9, 11, 40, 2], [7], [60, 61, 3, 3, 3, 8, 21]]


@pytest.fixture(scope="module")
def target():
    return tiny_model(0)


@pytest.fixture(scope="module")
def server(target):
    with ServerThread(TargetEngine(target)) as s:
        yield s


def reference(target, prompt, n, stop=EOS):
    out, _ = greedy_reference(TargetEngine(target), prompt, n, stop)
    return out


async def _generate(url, drafter, prompt, options: GenerateOptions, link=None, on_commit=None, observer=None):
    own = link is None
    if own:
        link = CloudLink(url)
        p = options.params
        await link.connect(codec.Hello(fingerprint=fingerprint(), sampling={
            "temperature": p.temperature, "top_p": p.top_p, "top_k": p.top_k, "seed": p.seed},
            variant=options.variant, paper_top_k=options.paper_top_k))
        link.observer = observer
    try:
        return await Pipeline(drafter, link, options, on_commit).run(prompt)
    finally:
        if own:
            await link.close()


def generate(url, drafter, prompt, on_commit=None, observer=None, **kw):
    """on_commit(new, speculative) per commit; observer(direction, message) per message."""
    kw.setdefault("stop_ids", (EOS,))
    kw.setdefault("fill", False)  # the hard cases pin the draft/verify mechanics; fill is tested apart
    return asyncio.run(_generate(url, drafter, prompt, GenerateOptions(**kw), on_commit=on_commit,
                                 observer=observer))


@pytest.mark.parametrize("noise", [0.0, 0.5, 3.0])
@pytest.mark.parametrize("mode,fill", [("pipeline", True), ("pipeline", False), ("sync", False)])
def test_greedy_output_is_the_targets_whatever_the_draft(server, target, noise, mode, fill):
    drafter = TinyDrafter(perturbed(target, noise))
    for prompt in PROMPTS:
        ans = generate(server.url, drafter, prompt, max_new_tokens=40, mode=mode, block=4, fill=fill)
        assert ans.token_ids == reference(target, prompt, 40)
        if noise == 0.0:  # a perfect draft is never rejected: every token accepted (or filled)
            assert ans.stats.rejected == 0
            assert ans.stats.accepted + ans.stats.filled + ans.stats.bonus >= len(ans.token_ids)
        if not fill:  # only the answer's first token, which the cloud's prefill always brings
            assert ans.stats.filled == 1


@pytest.mark.parametrize("block", [1, 2, 7, 16])
def test_greedy_exact_for_any_block_size(server, target, block):
    drafter = TinyDrafter(perturbed(target, 1.0))
    ans = generate(server.url, drafter, PROMPTS[1], max_new_tokens=48, block=block, run_ahead=3 * block)
    assert ans.token_ids == reference(target, PROMPTS[1], 48)


def test_unrelated_draft_rejected_at_first_token_still_exact(server, target):
    drafter = TinyDrafter(tiny_model(seed=7))  # another random model: almost every first token wrong
    ans = generate(server.url, drafter, PROMPTS[0], max_new_tokens=30, block=3)
    assert ans.token_ids == reference(target, PROMPTS[0], 30)
    assert ans.stats.rejected > 0 and ans.stats.recovered == ans.stats.rejected


def test_rejection_with_several_blocks_in_flight(target):
    """Slow cloud, fast edge, deep run-ahead: verdicts land while later blocks are queued."""
    engine = SlowEngine(target)
    engine.delay_s = 0.05
    with ServerThread(engine) as slow:
        drafter = TinyDrafter(perturbed(target, 1.0))
        ans = generate(slow.url, drafter, PROMPTS[3], max_new_tokens=40, block=2, run_ahead=12)
    assert ans.token_ids == reference(target, PROMPTS[3], 40)
    assert ans.stats.stale_drafts > 0  # blocks were in flight when a rejection came back


def test_slow_edge_still_exact(server, target):
    drafter = TinyDrafter(perturbed(target, 1.0), step_delay_s=0.01)
    ans = generate(server.url, drafter, PROMPTS[2], max_new_tokens=24, block=3)
    assert ans.token_ids == reference(target, PROMPTS[2], 24)


class SlowPrefillDrafter(TinyDrafter):
    """An edge whose own prefill takes longer than the verifier's (a Pi beside a GPU)."""

    def __init__(self, model, prefill_s: float):
        super().__init__(model)
        self.prefill_s, self.prefilled_at = prefill_s, None

    def prefill(self, ids):
        time.sleep(self.prefill_s)
        super().prefill(ids)
        self.prefilled_at = time.perf_counter()


@pytest.mark.parametrize("mode", ["pipeline", "sync"])
def test_the_first_token_shows_when_the_cloud_has_it_not_when_a_slow_edge_has_prefilled(server, target, mode):
    drafter = SlowPrefillDrafter(perturbed(target, 0.5), prefill_s=1.5)
    commits: list[tuple[float, list[int]]] = []
    ans = generate(server.url, drafter, PROMPTS[1], max_new_tokens=12, mode=mode,
                   on_commit=lambda new, speculative: commits.append((time.perf_counter(), list(new))))
    first_at = next(t for t, new in commits if new)
    assert drafter.prefilled_at - first_at > 1.0  # the tiny verifier prefills in milliseconds
    assert ans.token_ids == reference(target, PROMPTS[1], 12)  # and drafting after it stays exact
    assert ans.stats.accepted > 0


@pytest.mark.parametrize("mode,fill,busy", [("pipeline", True, False), ("pipeline", True, True),
                                            ("sync", False, False)])
def test_the_first_block_goes_up_while_the_cloud_prefills_and_is_verified_when_it_ends(target, mode, fill, busy):
    """A verifier whose prefill takes 0.3 s: the edge sends its first block (its guess at the first
    token, then more) before Prefilled comes down, in the epoch the Prompt gives, and the cloud
    verifies it as soon as the prefill ends, without the round trip. A guess that misses the
    cloud's first token makes the block stale and the answer goes on. busy: a verifier too shared
    to fill bubbles (the Prompt's fill refused) takes the early block just the same."""
    engine = SlowEngine(target)
    engine.delay_s = 0.3
    config = ServerConfig(port=0, fill_max_sessions=0 if busy else 2)
    early_verified = 0
    with ServerThread(engine, config) as s:
        drafter = TinyDrafter(perturbed(target, 0.5))
        for prompt in PROMPTS[:3]:
            events: list[tuple[str, object]] = []
            ans = generate(s.url, drafter, prompt, max_new_tokens=8, mode=mode, block=3, fill=fill,
                           observer=lambda direction, msg: events.append((direction, msg)))
            assert ans.token_ids == reference(target, prompt, 8)
            kinds = [type(m).__name__ for _, m in events]
            first_draft = next(m for _, m in events if isinstance(m, codec.Draft))
            assert kinds.index("Draft") < kinds.index("Prefilled")
            assert (first_draft.epoch, first_draft.pos) == (1, len(prompt))
            verdict = next(m for _, m in events if isinstance(m, codec.Verdict))
            early_verified += verdict.epoch == 1 and verdict.pos == len(prompt) + 1  # right after the first token
    assert early_verified > 0


def test_cloud_fills_bubbles_with_its_own_tokens_and_stays_exact(target):
    """A slow edge after each correction: the idle cloud commits target tokens of its own, the
    edge keeps the drafts that match them, and the text is still the target's."""
    engine = SlowEngine(target)
    engine.delay_s = 0.05
    with ServerThread(engine) as s:
        drafter = TinyDrafter(perturbed(target, 0.5), step_delay_s=0.01)
        ans = generate(s.url, drafter, PROMPTS[1], max_new_tokens=40, block=3, fill=True)
        assert ans.token_ids == reference(target, PROMPTS[1], 40)
        assert ans.stats.filled > 0 and ans.stats.accepted > 0


def test_a_fresh_session_starts_from_the_bubbles_its_device_measured_before(target):
    """Every generate() here opens a fresh session, as a one-shot answer does. The verifier times
    the prompt's bubble per device (peer address), so a new session knows how soon this edge's
    first block comes and fills that bubble only if it is long; the text stays the target's."""
    engine = SlowEngine(target)
    engine.delay_s = 0.02
    with ServerThread(engine) as s:
        drafter = TinyDrafter(perturbed(target, 0.5))
        for prompt in PROMPTS[:2]:
            ans = generate(s.url, drafter, prompt, max_new_tokens=16, block=3, fill=True)
            assert ans.token_ids == reference(target, prompt, 16)
        (key, timing), = s.server.fill_timings.by_key.items()
        assert key.startswith("peer:") and timing.first_block is not None and timing.pass_s is not None


def test_sampled_answers_with_bubble_filling_follow_the_target(server, target):
    """Filled tokens are sampled from p by the cloud: the second token's distribution (drafted,
    filled or recovered, whichever came first) stays the target's."""
    params = SamplingParams(temperature=1.0, top_p=0.95, seed=0)
    emp = _empirical(server, target, "exact", params, 600, fill=True, position=1)
    p = _second_token_marginal(target, PROMPTS[1], params)
    bound = 2 * 0.5 * np.sqrt(int((p > 0).sum()) / 600)
    assert 0.5 * np.abs(emp - p).sum() < bound


def test_jittery_link_still_exact(server, target):
    from bench.linkproxy import LinkConfig, ThreadedLinkProxy

    with ThreadedLinkProxy("127.0.0.1", server.port, LinkConfig(delay_ms=10, jitter_ms=8, seed=3)) as proxy:
        url = f"ws://127.0.0.1:{proxy.port}/ws"
        drafter = TinyDrafter(perturbed(target, 1.0))
        for prompt in PROMPTS[:2]:
            ans = generate(url, drafter, prompt, max_new_tokens=32)
            assert ans.token_ids == reference(target, prompt, 32)


def test_stop_token_inside_a_block_ends_the_answer_there(server, target):
    ref = reference(target, PROMPTS[1], 40, stop=None)
    stop = ref[5]
    first = ref.index(stop)
    drafter = TinyDrafter(perturbed(target, 0.0))
    ans = generate(server.url, drafter, PROMPTS[1], max_new_tokens=40, block=8, stop_ids=(stop,))
    assert ans.token_ids == ref[: first + 1]
    assert ans.finish_reason == "stop"


@pytest.mark.parametrize("n", [1, 5, 9])
def test_max_tokens_inside_a_block_is_respected(server, target, n):
    drafter = TinyDrafter(perturbed(target, 0.0))
    ans = generate(server.url, drafter, PROMPTS[0], max_new_tokens=n, block=4, stop_ids=(-1,))
    assert ans.token_ids == reference(target, PROMPTS[0], n, stop=None)
    assert ans.finish_reason == "length"


def test_cloud_mode_is_the_target_alone(server, target):
    drafter = TinyDrafter(perturbed(target, 1.0))
    ans = generate(server.url, drafter, PROMPTS[1], max_new_tokens=20, mode="cloud")
    assert ans.token_ids == reference(target, PROMPTS[1], 20)
    assert ans.stats.drafted == 0


def test_edge_mode_is_the_draft_alone(target):
    draft = perturbed(target, 3.0)
    ans = asyncio.run(Pipeline(TinyDrafter(draft), None, GenerateOptions(
        max_new_tokens=12, mode="edge", stop_ids=(EOS,))).run(PROMPTS[0]))
    assert ans.token_ids == reference(draft, PROMPTS[0], 12)


def test_kv_cache_reused_across_turns(server, target):
    """A second turn that extends the first re-sends the whole context; both sides compute only
    what is new (counted: the drafter's fed ids, the verifier's prefilled tokens)."""
    drafter = TinyDrafter(perturbed(target, 0.5))
    fed: list[int] = []
    feed = drafter.feed
    drafter.feed = lambda ids: (fed.append(len(ids)), feed(ids))[1]
    counters = server.server.metrics._counters

    def prefilled() -> float:
        return counters[("picospec_prefill_tokens_total", ())]

    async def two_turns():
        link = CloudLink(server.url)
        await link.connect(codec.Hello(fingerprint=fingerprint(), sampling={
            "temperature": 0.0, "top_p": 1.0, "top_k": 0, "seed": None}))
        opts = GenerateOptions(max_new_tokens=10, stop_ids=(EOS,), mode="sync")
        first = await Pipeline(drafter, link, opts).run(PROMPTS[1])
        second_prompt = PROMPTS[1] + first.token_ids + [4, 4]
        fed.clear()
        cloud_before = prefilled()
        second = await Pipeline(drafter, link, opts).run(second_prompt)
        await link.close()
        return first, second, second_prompt, prefilled() - cloud_before

    first, second, prompt2, cloud_prefilled = asyncio.run(two_turns())
    assert first.token_ids == reference(target, PROMPTS[1], 10)
    assert second.token_ids == reference(target, prompt2, 10)
    new_tokens = len(prompt2) - len(PROMPTS[1]) - len(first.token_ids) + 1  # + the unfed last token
    assert fed[0] <= new_tokens, (fed[0], new_tokens)  # the drafter's prefill of turn two
    assert cloud_prefilled <= new_tokens, (cloud_prefilled, new_tokens)


DRAFT_NOISE = 2.0


def _empirical(server, target, variant: str, params: SamplingParams, rounds: int, top_k: int = 8,
               fill: bool = False, position: int = 0):
    """Empirical distribution of the answer's token at `position` over `rounds` answers."""
    drafter = TinyDrafter(perturbed(target, DRAFT_NOISE))
    prompt = PROMPTS[1]

    async def run():
        link = CloudLink(server.url)
        await link.connect(codec.Hello(fingerprint=fingerprint(), sampling={
            "temperature": params.temperature, "top_p": params.top_p, "top_k": params.top_k,
            "seed": params.seed}, variant=variant, paper_top_k=top_k))
        tokens = []
        for i in range(rounds):
            opts = GenerateOptions(max_new_tokens=position + 1, params=SamplingParams(
                params.temperature, params.top_p, params.top_k, seed=i), variant=variant,
                paper_top_k=top_k, block=2, stop_ids=(), fill=fill, mode="pipeline")
            ans = await Pipeline(drafter, link, opts).run(prompt)
            tokens.append(ans.token_ids[position])
        await link.close()
        return tokens

    tokens = asyncio.run(run())
    return np.bincount(tokens, minlength=target.config.vocab_size) / rounds


def _target_p(target, ids, params):
    with torch.inference_mode():
        logits = target(input_ids=torch.tensor([ids])).logits[0, -1].double().numpy()
    return target_probs(logits, params)


def _second_token_marginal(target, prompt, params):
    """P(second answer token = t) = sum over t0 of p(t0 | prompt) p(t | prompt, t0)."""
    p0 = _target_p(target, prompt, params)
    out = np.zeros_like(p0)
    for t0 in np.flatnonzero(p0):
        out += p0[t0] * _target_p(target, prompt + [int(t0)], params)
    return out


def test_sampling_through_the_server_follows_the_target_distribution(server, target):
    """1500 two-token answers: the first token comes from the cloud's prefill, the second is
    drafted and goes through the accept / recover rule; its empirical distribution matches the
    target's marginal (TV bound 0.5*sqrt(V/N)*2)."""
    params = SamplingParams(temperature=1.0, top_p=0.95, seed=0)
    emp = _empirical(server, target, "exact", params, 1500, position=1)
    p = _second_token_marginal(target, PROMPTS[1], params)
    tv = 0.5 * np.abs(emp - p).sum()
    support = int((p > 0).sum())
    bound = 2 * 0.5 * np.sqrt(support / 1500)  # twice the expected TV of an exact sampler
    assert tv < bound, (tv, bound)


def test_paper_variant_drifts_by_what_the_math_predicts(server, target):
    """The paper's top-K downlink (K=1) through the real server: the empirical distribution sits
    at the analytic drift TV(paper, p) from bench.drift, far from p, unlike the exact variant."""
    from bench.drift import committed_distribution, paper_recover
    from sampling import draft_dist

    params = SamplingParams(temperature=1.0, top_p=0.95, seed=0)
    emp = _empirical(server, target, "paper", params, 1500, top_k=1)
    p = _target_p(target, PROMPTS[1], params)
    with torch.inference_mode():
        q_logits = perturbed(target, DRAFT_NOISE)(input_ids=torch.tensor([PROMPTS[1]])).logits[0, -1].numpy()
    q = draft_dist(q_logits, params)
    predicted = committed_distribution(p, q, paper_recover(p, q, 1))
    noise = 2 * 0.5 * np.sqrt(int((p > 0).sum()) / 1500)
    assert 0.5 * np.abs(predicted - p).sum() > 2 * noise  # the drift is real and measurable
    assert 0.5 * np.abs(emp - predicted).sum() < noise  # and the server does what the math says


# -- auto: the mode chosen from measured numbers ---------------------------------------------------
async def _auto_answers(url, drafter, prompts, estimates, n=24, fill=True):
    from edge_app.policy import Estimates  # noqa: F401 (the type the pipeline carries)

    link = CloudLink(url)
    await link.connect(codec.Hello(fingerprint=fingerprint(), sampling={
        "temperature": 0.0, "top_p": 1.0, "top_k": 0, "seed": None}))
    out = []
    try:
        for prompt in prompts:
            opts = GenerateOptions(max_new_tokens=n, stop_ids=(EOS,), mode="auto", fill=fill)
            out.append(await Pipeline(drafter, link, opts, estimates=estimates).run(prompt))
    finally:
        await link.close()
    return out


@pytest.mark.parametrize("noise", [0.0, 3.0])
def test_auto_is_exact_and_learns_the_numbers_it_plans_with(server, target, noise):
    from edge_app.policy import Estimates

    est = Estimates()
    # without bubble filling, so that the tiny (fast) cloud does not write every token itself
    answers = asyncio.run(_auto_answers(server.url, TinyDrafter(perturbed(target, noise)), PROMPTS, est,
                                        fill=False))
    for prompt, ans in zip(PROMPTS, answers):
        assert ans.token_ids == reference(target, prompt, 24)
    assert est.t_draft
    assert est.verify and est.acceptance is not None
    if noise == 0.0:
        assert est.acceptance == 1.0


def test_auto_hands_answers_to_the_cloud_when_drafting_cannot_pay(server, target):
    """A draft step far slower than a cloud token and poor acceptance, and no bubble filling: auto
    streams from the cloud (the answer is still the target's), and after four such answers
    speculates once to re-measure."""
    from edge_app.policy import Estimates

    est = Estimates(t_draft=5.0, t_rtt=0.01, acceptance=0.1, t_cloud=0.002)
    est.verify.observe(1, 0.002)
    prompts = PROMPTS + [PROMPTS[0]]
    # without bubble filling: with it, the pipeline is never slower than cloud-only and auto keeps it
    answers = asyncio.run(_auto_answers(server.url, TinyDrafter(perturbed(target, 1.0)), prompts, est,
                                        fill=False))
    for prompt, ans in zip(prompts, answers):
        assert ans.token_ids == reference(target, prompt, 24)
    assert [a.stats.mode_switches for a in answers[:4]] == [["cloud"]] * 4
    assert all(a.stats.drafted == 0 for a in answers[:4])
    assert answers[4].stats.drafted > 0  # the fifth answer speculates again


# -- branch pre-drafting ---------------------------------------------------------------------------
@pytest.mark.parametrize("noise", [0.5, 1.5])
def test_branch_predrafting_stays_exact_and_sometimes_foresees_the_recovered_token(target, noise):
    """A slow cloud keeps the edge waiting at its run-ahead: it drafts branches after the runner-up
    token of its least confident pending draft. Output is still the target's; some branches hit."""
    engine = SlowEngine(target)
    engine.delay_s = 0.03
    hits = branches = 0
    with ServerThread(engine) as s:
        drafter = TinyDrafter(perturbed(target, noise))
        for prompt in PROMPTS:
            ans = generate(s.url, drafter, prompt, max_new_tokens=40, block=3, run_ahead=3, branch=True)
            assert ans.token_ids == reference(target, prompt, 40)
            hits, branches = hits + ans.stats.branch_hits, branches + ans.stats.branches
    assert branches > 0 and 0 < hits <= branches


@pytest.mark.parametrize("fill", [False, True])
def test_branches_the_verifier_takes_are_verified_without_a_round_trip_and_stay_exact(target, fill):
    """Over a link with a real delay, the verifier holds the edge's branches: when a pass recovers
    a branch's root, the branch is verified next, before the edge could have sent anything, and the
    text is still the target's, token for token."""
    from bench.linkproxy import LinkConfig, ThreadedLinkProxy

    engine = SlowEngine(target)
    engine.delay_s = 0.08 if fill else 0.02  # (a faster pass would fill every bubble on its own)
    taken = sent = 0
    with ServerThread(engine) as s:
        with ThreadedLinkProxy("127.0.0.1", s.port, LinkConfig(delay_ms=30)) as proxy:
            drafter = TinyDrafter(perturbed(target, 1.0))
            for prompt in PROMPTS:
                ans = generate(f"ws://127.0.0.1:{proxy.port}/ws", drafter, prompt, max_new_tokens=40, block=3,
                               branch=True, fill=fill)
                assert ans.token_ids == reference(target, prompt, 40)
                taken, sent = taken + ans.stats.branches_taken, sent + ans.stats.branches_sent
    assert 0 < taken <= sent


def test_sampled_answers_draft_no_branches(server, target):
    """With sampling the recovered token comes from norm(max(0, p - q)), where the draft's
    runner-up has little mass: a branch after it would be drafting for nothing (none ever hit in
    170 tries on this model), so --branch only branches greedy answers."""
    drafter = TinyDrafter(perturbed(target, 1.0))
    for seed, prompt in enumerate(PROMPTS):
        ans = generate(server.url, drafter, prompt, max_new_tokens=24, block=3, branch=True,
                       params=SamplingParams(temperature=1.0, top_p=0.95, seed=seed))
        assert len(ans.token_ids) == 24 or ans.token_ids[-1] == EOS
        assert ans.stats.branches == ans.stats.branches_sent == 0 and ans.stats.rejected > 0


def test_auto_with_bubble_filling_keeps_the_pipeline_even_when_drafting_looks_slow(server, target):
    """With filling the pipeline cannot be slower than cloud-only: auto does not hand over."""
    from edge_app.policy import Estimates

    est = Estimates(t_draft=5.0, t_rtt=0.01, acceptance=0.1, t_cloud=0.002)
    est.verify.observe(1, 0.002)
    answers = asyncio.run(_auto_answers(server.url, TinyDrafter(perturbed(target, 1.0)), PROMPTS[:2], est))
    for prompt, ans in zip(PROMPTS[:2], answers):
        assert ans.token_ids == reference(target, prompt, 24)
        assert ans.stats.mode_switches == []
