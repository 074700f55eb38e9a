"""The cloud's round on the tiny model, without sockets: the Prefilled token, the verify step
(accepted whole, recovered, bonus, the paper variant's forced token), the cache invariant, the
draft queue, bubble filling and the Generate cap; then the same rules over a real server."""
from __future__ import annotations

import asyncio

import pytest
import torch

import codec
from cloud.draft_queue import Block, DraftQueue
from cloud.engine import TargetEngine
from cloud.errors import SessionError
from cloud.session import VerifySession
from cloud.verify import apply_pass, verify_pass
from codec import VerdictKind
from sampling import SamplingParams
from tests.tiny import VOCAB, tiny_model
from tests.tiny_edge import Verifier, hello_frame, raw_session, reference

PROMPT = [5, 9, 11]
GREEDY = SamplingParams()


@pytest.fixture(scope="module")
def target():
    return tiny_model(0)


@pytest.fixture(scope="module")
def ref(target):
    return reference(target, PROMPT, 30)


IMPLS = ["numpy", "torch"]  # where the rule runs (cloud/rule_impl.py): both must keep the invariants


def start(target, max_new_tokens=20, params=GREEDY, variant="exact", fill=False, prompt=PROMPT, impl="numpy"):
    s = VerifySession(TargetEngine(target), params, variant, paper_top_k=1, rule_impl=impl)
    rest = s.begin_prompt(prompt, max_new_tokens)
    token = s.end_prompt(prompt, max_new_tokens, s.engine.forward(rest)[-1], fill=fill)
    return s, token


def run_pass(s: VerifySession, ids, pos=None, forced=0, wait=False, q=None):
    pos = len(s.committed) if pos is None else pos
    assert s.add_draft(Block(s.epoch, pos, list(ids), forced, q_scalar=q, wait=wait))
    block = s.take_block(16)
    result = verify_pass(s, block)
    return block, result, apply_pass(s, block, result)


@pytest.mark.parametrize("impl", IMPLS)
def test_the_prompt_commits_the_answers_first_token_from_the_prefill(target, ref, impl):
    s, token = start(target, impl=impl)
    assert token == ref[0] and s.committed == PROMPT + ref[:1] and s.epoch == 1
    assert s.engine.cache_len == len(PROMPT) and s.pending_row is None  # the token is not fed yet
    s0, none = start(target, max_new_tokens=0, impl=impl)
    assert none is None and s0.committed == PROMPT and s0.pending_row is not None


@pytest.mark.parametrize("impl", IMPLS)
def test_a_block_accepted_whole_keeps_its_last_row_and_the_next_block_needs_no_extra_pass(target, ref, impl):
    s, _ = start(target, impl=impl)
    block, r, epoch = run_pass(s, ref[1:4])
    assert (r.accepted, r.kind, r.token, r.fed, epoch) == (3, VerdictKind.ACCEPTED, None, 4, 1)
    assert s.committed == PROMPT + ref[:4] and s.engine.cache_len == len(s.committed)
    passes = s.engine.forward_passes
    _, r, _ = run_pass(s, ref[4:6])
    assert r.accepted == 2 and r.fed == 2 and s.engine.forward_passes == passes + 1


@pytest.mark.parametrize("impl", IMPLS)
def test_a_rejection_recovers_the_targets_token_and_starts_a_new_epoch(target, ref, impl):
    s, _ = start(target, impl=impl)
    wrong = (ref[2] + 1) % VOCAB
    block, r, epoch = run_pass(s, [ref[1], wrong, 7])
    assert (r.accepted, r.kind, r.token) == (1, VerdictKind.RECOVERED, ref[2])
    assert block.pos == len(PROMPT) + 1 and epoch == 2 == s.epoch
    assert s.committed == PROMPT + ref[:3] and s.engine.cache_len == len(s.committed) - 1
    assert not s.add_draft(Block(1, len(s.committed), [1]))  # the old epoch's drafts are stale


@pytest.mark.parametrize("impl", IMPLS)
def test_a_waiting_edge_gets_a_bonus_token_within_the_budget_only(target, ref, impl):
    s, _ = start(target, max_new_tokens=5, impl=impl)
    _, r, _ = run_pass(s, ref[1:3], wait=True)
    assert (r.kind, r.token) == (VerdictKind.BONUS, ref[3])
    _, r, _ = run_pass(s, ref[4:5], wait=True)  # the fifth token: the budget is spent
    assert r.kind == VerdictKind.ACCEPTED and s.generated == 5


@pytest.mark.parametrize("impl", IMPLS)
def test_paper_variant_sends_top_k_down_and_takes_the_recovered_token_as_the_forced_first_id(target, impl):
    params = SamplingParams(temperature=1.0, seed=3)
    s, _ = start(target, params=params, variant="paper", impl=impl)
    for _ in range(50):  # q(x) = 1 for a token p finds unlikely: rejected sooner or later
        row = s.pending_row
        if row is None:  # peek at p for the next position, then put the cache back
            row = s.engine.forward(s.committed[-1:])[-1]
            s.engine.rollback(len(s.committed) - 1)
        x = int(torch.argmin(row))
        block, r, epoch = run_pass(s, [x], q=[1.0])
        if r.kind is VerdictKind.RECOVER_ON_EDGE:
            break
    assert r.kind is VerdictKind.RECOVER_ON_EDGE and r.token is None and len(r.top_ids) == 1
    forced_at = len(s.committed)
    with pytest.raises(SessionError, match="recovered token first"):
        s.add_draft(Block(s.epoch, forced_at, [4], q_scalar=[0.5]))
    block, r, _ = run_pass(s, [r.top_ids[0], 4], forced=1, q=[1.0, 1.0])
    assert block.pos == forced_at and s.committed[forced_at] == block.ids[0]  # pos: the forced id's


def test_queued_blocks_merge_up_to_max_block_and_a_long_one_is_verified_in_pieces():
    q = DraftQueue(max_entries=100)
    q.push(Block(1, 10, [1, 2]), committed_len=10, max_context=100)
    q.push(Block(1, 12, [3, 4], seq=2), committed_len=10, max_context=100)
    q.push(Block(1, 14, [5, 6, 7, 8, 9, 10], wait=True, seq=3), committed_len=10, max_context=100)
    with pytest.raises(SessionError, match="expected 20"):
        q.push(Block(1, 19, [7]), committed_len=10, max_context=100)
    first = q.take(max_block=4)
    assert (first.pos, first.ids, first.seq) == (10, [1, 2, 3, 4], 2)
    head = q.take(max_block=4)
    assert (head.pos, head.ids, head.wait) == (14, [5, 6, 7, 8], False)  # the edge waits for the tail
    tail = q.take(max_block=4)
    assert (tail.pos, tail.ids, tail.wait, tail.seq) == (18, [9, 10], True, 3) and q.entries == 0


@pytest.mark.parametrize("impl", IMPLS)
def test_filled_tokens_drop_matching_drafts_and_a_mismatch_makes_them_stale(target, ref, impl):
    s, _ = start(target, fill=True, impl=impl)
    assert s.wants_fill()
    for _ in range(2):  # the cloud fills two tokens while the edge drafts
        s.prepare_next_token()
        s.commit_fill()
    assert s.committed == PROMPT + ref[:3] and s.epoch == 1  # filling alone keeps the epoch
    assert s.add_draft(Block(1, len(PROMPT) + 1, ref[1:5]))  # two ids filled already, two queued
    block = s.take_block(16)
    assert block.pos == len(PROMPT) + 3 and block.ids == ref[3:5] and not s.wants_fill()
    s2, _ = start(target, fill=True, impl=impl)
    s2.prepare_next_token()
    s2.commit_fill()
    assert not s2.add_draft(Block(1, len(PROMPT) + 1, [(ref[1] + 1) % VOCAB]))
    assert s2.epoch == 2 and s2.wants_fill()  # stale: the next filled Tokens carry epoch 2


def test_a_session_times_its_bubbles_across_answers(target, ref):
    """The correction-to-block turnaround measured in one answer decides the next answer's filling."""
    s, _ = start(target, fill=True)
    block, result, _ = run_pass(s, [(ref[1] + 1) % VOCAB])  # rejected: a correction opens a bubble
    assert result.accepted == 0 and s.wants_fill()
    assert s.add_draft(Block(s.epoch, len(s.committed), ref[2:4]), arrived_at=s.fill.opened_at + 0.25)
    assert s.fill_timing.turnaround == pytest.approx(0.25)
    s.end_prompt(PROMPT, 20, s.engine.forward([ref[0]])[-1], fill=True)  # the next answer, same session
    assert s.fill.timing is s.fill_timing and s.fill.timing.turnaround == pytest.approx(0.25)


def test_generate_never_runs_past_the_prompts_budget(target):
    s, _ = start(target, max_new_tokens=5)
    assert s.generate_limit(100) == 4 and s.generate_limit(2) == 2


def test_over_the_wire_prefilled_token_and_tokens_carry_the_epoch(target, ref):
    with Verifier(TargetEngine(target)) as v:
        got = asyncio.run(raw_session(v.url, [
            codec.encode(codec.Prompt(ids=PROMPT, max_new_tokens=5)),
            codec.encode(codec.Generate(max_new_tokens=100))], hello=hello_frame(), wait_s=1.0))
    prefilled, tokens = got[1], got[2:]
    assert isinstance(prefilled, codec.Prefilled) and prefilled.token == ref[0]
    assert prefilled.committed_len == len(PROMPT) + 1
    assert [t.ids[0] for t in tokens] == ref[1:5] and tokens[-1].done
    assert [t.pos for t in tokens] == list(range(len(PROMPT) + 1, len(PROMPT) + 5))
    assert {t.epoch for t in tokens} == {prefilled.epoch}


# -- branches: drafts after the runner-up, verified without a round trip -----------------------
def _branch(s: VerifySession, root_pos: int, root: int, ids, seq: int, epoch=None) -> bool:
    return s.add_draft(Block(s.epoch if epoch is None else epoch, root_pos + 1, list(ids), seq=seq, root=root))


@pytest.mark.parametrize("impl", IMPLS)
def test_a_branch_after_the_recovered_token_is_verified_next_in_the_new_epoch(target, ref, impl):
    s, _ = start(target, impl=impl)
    wrong = (ref[2] + 1) % VOCAB
    pos2 = len(PROMPT) + 2  # where the rejection will be
    assert _branch(s, pos2, ref[2], ref[3:6], seq=9)  # foresaw the recovered token: taken
    assert _branch(s, pos2, (ref[2] + 5) % VOCAB, [1, 2], seq=10)  # another root there: dropped
    block, r, epoch = run_pass(s, [ref[1], wrong, 7])
    assert (r.kind, r.token, r.branch) == (VerdictKind.RECOVERED, ref[2], 9) and epoch == s.epoch == 2
    assert not s.branches  # the rest went with the old epoch
    nxt = s.take_block(16)  # the branch is the next pass's block, without any Draft from the edge
    assert (nxt.pos, nxt.ids, nxt.epoch, nxt.root, nxt.seq) == (pos2 + 1, ref[3:6], 2, None, 9)
    result = verify_pass(s, nxt)
    apply_pass(s, nxt, result)
    assert result.accepted == 3 and s.committed == PROMPT + ref[:6]


def test_a_branch_is_dropped_when_its_root_is_not_what_the_cloud_recovers(target, ref):
    s, _ = start(target)
    wrong = (ref[2] + 1) % VOCAB
    assert _branch(s, len(PROMPT) + 1, (ref[1] + 3) % VOCAB, [4, 4], seq=5)  # a root whose position is accepted
    block, r, _ = run_pass(s, [ref[1], wrong])
    assert r.branch == 0 and not s.queue and not s.branches


def test_a_late_or_stale_branch_is_ignored_and_a_bad_one_refused(target, ref):
    s, _ = start(target)
    run_pass(s, [ref[1], ref[2]])  # accepted whole: positions up to PROMPT + 3 are committed
    assert not _branch(s, len(PROMPT) + 1, 3, [4], seq=2)  # its root's position is decided already
    assert not _branch(s, len(s.committed), 3, [4], seq=3, epoch=s.epoch - 1)  # another epoch
    with pytest.raises(SessionError, match="context"):
        _branch(s, s.max_context - 1, 3, [4, 5], seq=4)
    paper, _ = start(target, variant="paper")
    with pytest.raises(SessionError, match="exact variant"):
        _branch(paper, len(paper.committed), 3, [4], seq=5)
    sampled, _ = start(target, params=SamplingParams(temperature=1.0, seed=0))
    with pytest.raises(SessionError, match="distributions"):
        _branch(sampled, len(sampled.committed), 3, [4], seq=6)


def test_a_session_holds_a_bounded_number_of_branches(target):
    from cloud.session import MAX_BRANCHES

    s, _ = start(target)
    for i in range(3 * MAX_BRANCHES):
        assert _branch(s, len(s.committed) + i, 3, [4], seq=i + 1)
    assert len(s.branches) == MAX_BRANCHES
    assert sorted(b.seq for b in s.branches.values()) == list(range(2 * MAX_BRANCHES + 1, 3 * MAX_BRANCHES + 1))
