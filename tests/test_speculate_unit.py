"""The edge's round against a scripted cloud: epochs come from the cloud's messages; the only guess
is the one for the first blocks, sent while the cloud prefills, and Prefilled settles it.

Pure logic (no model, no socket): a counting drafter and a fake link whose replies the test writes.
The real path (real server, real sockets, real models) is covered by test_pipeline_tiny.py and
test_real_models.py.
"""
from __future__ import annotations

import asyncio

import numpy as np

import codec
from codec import VerdictKind
from edge_app.answer import AnswerState, GenerateOptions, GenerationStats
from edge_app.draft_model import TokenListDrafter
from edge_app.meters import EdgeMeters
from edge_app.policy import Estimates
from edge_app.speculate import SpeculativeLoop
from edge_app.variants import ExactVariant

V = 50


class CountingDrafter(TokenListDrafter):
    """Drafts last token + 1 (mod V), greedily."""

    def logits(self):
        out = np.zeros(V, dtype=np.float32)
        out[(self._tokens[-1] + 1) % V] = 10.0
        return out


class ScriptedLink:
    """Records what the edge sends; `reply(sent_msg, link)` decides what the cloud answers."""

    def __init__(self, reply):
        self.sent: list = []
        self.inbox: asyncio.Queue = asyncio.Queue()
        self.reply = reply
        self.bytes_up = self.bytes_down = 0
        self.epoch = 0  # the newest epoch the session has heard (edge_app.link.CloudLink.epoch)

    async def send(self, msg):
        self.sent.append(msg)
        for answer in self.reply(msg, self) or ():
            self.inbox.put_nowait(answer)

    async def recv(self, timeout=None):
        return await asyncio.wait_for(self.inbox.get(), 5.0)

    def poll(self):
        out = []
        while not self.inbox.empty():
            out.append(self.inbox.get_nowait())
        return out

    def drafts(self):
        return [m for m in self.sent if isinstance(m, codec.Draft)]


def run_loop(link, prompt, max_new=8, block=2):
    opts = GenerateOptions(max_new_tokens=max_new, block=block, run_ahead=block, mode="pipeline", stop_ids=())
    answer = AnswerState(prompt, opts, GenerationStats(mode="pipeline"), EdgeMeters())
    loop = SpeculativeLoop(answer, CountingDrafter(), link, Estimates(), ExactVariant(),
                           np.random.default_rng(0), "pipeline")
    asyncio.run(loop.run())
    return answer, loop


def accepted_whole(draft: codec.Draft) -> codec.Verdict:
    """The verdict on a Draft accepted whole, in its own epoch."""
    return codec.Verdict(epoch=draft.epoch, pos=draft.pos, accepted=len(draft.ids), token=None,
                         kind=VerdictKind.ACCEPTED, new_epoch=draft.epoch, seq=draft.seq)


def accept_all(epoch_of_prefill):
    """A cloud that accepts every block whole and keeps its epoch."""

    def reply(msg, link):
        if isinstance(msg, codec.Prompt):
            return [codec.Prefilled(committed_len=len(msg.ids) + 1, epoch=epoch_of_prefill, prefill_s=0.0,
                                    token=(msg.ids[-1] + 1) % V)]
        if isinstance(msg, codec.Draft):
            return [accepted_whole(msg)]
        return []

    return reply


def test_drafts_carry_the_epoch_from_prefilled_and_start_after_the_clouds_first_token():
    answer, _ = run_loop(ScriptedLink(accept_all(epoch_of_prefill=7)), [1, 2, 3], max_new=7)
    assert answer.committed == [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]
    assert answer.stats.accepted == 6  # the first token came from the cloud's prefill, not a draft


def test_first_draft_is_sent_only_after_prefilled_and_in_its_epoch():
    link = ScriptedLink(accept_all(epoch_of_prefill=7))
    run_loop(link, [1, 2, 3], max_new=5)
    drafts = link.drafts()
    assert drafts and all(d.epoch == 7 for d in drafts)
    assert drafts[0].pos == 4  # after the prompt and the cloud's first token
    assert drafts[0].ids[0] == 5


def test_a_recovered_token_moves_the_edge_to_the_epoch_the_verdict_names():
    state = {"rejected": False}

    def reply(msg, link):
        if isinstance(msg, codec.Prompt):
            return [codec.Prefilled(committed_len=len(msg.ids) + 1, epoch=3, prefill_s=0.0, token=(msg.ids[-1] + 1) % V)]
        if isinstance(msg, codec.Draft):
            if not state["rejected"]:  # reject the first block's first token, jump to epoch 40
                state["rejected"] = True
                return [codec.Verdict(epoch=msg.epoch, pos=msg.pos, accepted=0, token=30,
                                      kind=VerdictKind.RECOVERED, new_epoch=40, seq=msg.seq)]
            return [accepted_whole(msg)]
        return []

    link = ScriptedLink(reply)
    answer, _ = run_loop(link, [1, 2, 3], max_new=6)
    assert answer.committed == [1, 2, 3, 4, 30, 31, 32, 33, 34]
    epochs = [d.epoch for d in link.drafts()]
    assert epochs[0] == 3 and set(epochs[1:]) == {40}  # a guess of 4 would be refused by the cloud
    assert answer.stats.rejected == 1 and answer.stats.recovered == 1


def test_a_filled_token_that_contradicts_sent_drafts_holds_sending_until_a_newer_epoch():
    """The cloud filled position 4 with 20 while our drafts for it (5, 6) were in flight: the edge
    drops them, sends nothing more in epoch 2, and resumes in the epoch the next filled token names."""
    log = []

    def reply(msg, link):
        log.append(msg)
        if isinstance(msg, codec.Prompt):
            return [codec.Prefilled(committed_len=len(msg.ids), epoch=2, prefill_s=0.0, token=None)]
        if isinstance(msg, codec.Draft) and msg.epoch == 2:
            # the cloud had committed 20 at position 3 before this draft arrived: stale; then it
            # fills 21 in epoch 3 (its epoch moved when it saw the stale draft)
            return [codec.Tokens(pos=3, ids=[20], done=False, epoch=2),
                    codec.Tokens(pos=4, ids=[21], done=False, epoch=3)]
        if isinstance(msg, codec.Draft):
            return [accepted_whole(msg)]
        return []

    link = ScriptedLink(reply)
    answer, _ = run_loop(link, [1, 2, 3], max_new=6)
    assert answer.committed == [1, 2, 3, 20, 21, 22, 23, 24, 25]
    drafts = link.drafts()
    assert drafts[0].epoch == 2 and all(d.epoch == 3 for d in drafts[1:])
    assert drafts[1].pos == 5 and drafts[1].ids[0] == 22
    assert answer.stats.filled == 2


def test_a_filled_token_that_matches_the_draft_keeps_the_rest_of_the_block():
    def reply(msg, link):
        if isinstance(msg, codec.Prompt):
            return [codec.Prefilled(committed_len=len(msg.ids), epoch=1, prefill_s=0.0, token=None),
                    codec.Tokens(pos=len(msg.ids), ids=[(msg.ids[-1] + 1) % V], done=False, epoch=1)]
        if isinstance(msg, codec.Draft):
            return [accepted_whole(msg)]
        return []

    link = ScriptedLink(reply)
    answer, _ = run_loop(link, [1, 2, 3], max_new=5)
    assert answer.committed == [1, 2, 3, 4, 5, 6, 7, 8]
    assert answer.stats.stale_drafts == 0 and answer.stats.filled == 1


def test_messages_left_over_from_an_earlier_answer_are_ignored_until_prefilled():
    def reply(msg, link):
        if isinstance(msg, codec.Prompt):
            return [codec.Verdict(epoch=0, pos=0, accepted=2, token=None, kind=VerdictKind.ACCEPTED,
                                  new_epoch=0, seq=99),
                    codec.Tokens(pos=0, ids=[9], done=False, epoch=0),
                    codec.Prefilled(committed_len=len(msg.ids) + 1, epoch=5, prefill_s=0.0, token=4)]
        return accept_all(5)(msg, link)

    answer, _ = run_loop(ScriptedLink(reply), [1, 2, 3], max_new=3)
    assert answer.committed == [1, 2, 3, 4, 5, 6]


def prefill_after_first_draft(epoch_of_prefill, first_token, then=lambda draft: []):
    """A cloud that is still prefilling when the edge's first block goes up: Prefilled comes down
    after that Draft (with `then`: what the cloud says about the early block), later blocks are
    accepted whole in the epoch they name."""
    state = {"prefilled": False}

    def reply(msg, link):
        if isinstance(msg, codec.Draft) and not state["prefilled"]:
            state["prefilled"] = True
            prompt = next(m for m in link.sent if isinstance(m, codec.Prompt))
            return [codec.Prefilled(committed_len=len(prompt.ids) + 1, epoch=epoch_of_prefill, prefill_s=0.0,
                                    token=first_token), *then(msg)]
        if isinstance(msg, codec.Draft):
            return [accepted_whole(msg)]
        return []

    return reply


def test_the_first_block_goes_up_during_the_prefill_in_the_epoch_the_prompt_will_give():
    """The session has heard epoch 4, so this Prompt's answer drafts in 5: the first block (the
    draft's guess at the first token, then one more) goes up before Prefilled; the cloud drops the
    guess that matches its own first token and verifies the rest."""
    def then(draft):  # the cloud verified [5] (the 4 it committed itself was stripped)
        return [codec.Verdict(epoch=5, pos=4, accepted=1, token=None, kind=VerdictKind.ACCEPTED,
                              new_epoch=5, seq=draft.seq)]

    link = ScriptedLink(prefill_after_first_draft(5, first_token=4, then=then))
    link.epoch = 4
    answer, _ = run_loop(link, [1, 2, 3], max_new=5)
    first = link.drafts()[0]
    assert (first.epoch, first.pos, first.ids) == (5, 3, [4, 5])  # sent before Prefilled came down
    assert answer.committed == [1, 2, 3, 4, 5, 6, 7, 8]
    assert all(d.epoch == 5 for d in link.drafts()) and answer.stats.accepted == 4


def test_early_blocks_in_an_epoch_the_cloud_had_left_go_up_again():
    """The cloud had moved the epoch in a message still on its way (6, not the 5 predicted): it
    dropped the early block without a word, so after Prefilled the edge sends it again in 6."""
    link = ScriptedLink(prefill_after_first_draft(6, first_token=4, then=lambda draft: []))
    link.epoch = 4
    answer, _ = run_loop(link, [1, 2, 3], max_new=5)
    drafts = link.drafts()
    assert drafts[0].epoch == 5 and drafts[1].epoch == 6 and drafts[1].pos == 4 and drafts[1].ids[0] == 5
    assert answer.committed == [1, 2, 3, 4, 5, 6, 7, 8]


def test_an_early_block_after_a_wrong_guess_at_the_first_token_waits_for_the_next_epoch():
    """The cloud's first token (20) is not the draft's guess (4): the early block is stale; the
    cloud moves the epoch and says so (an empty Tokens), and the edge drafts on after 20 in it."""
    def then(draft):
        return [codec.Tokens(pos=4, ids=[], done=False, epoch=6)]

    link = ScriptedLink(prefill_after_first_draft(5, first_token=20, then=then))
    link.epoch = 4
    answer, _ = run_loop(link, [1, 2, 3], max_new=5)
    drafts = link.drafts()
    assert drafts[0].epoch == 5 and all(d.epoch == 6 for d in drafts[1:])
    assert drafts[1].pos == 4 and drafts[1].ids[0] == 21
    assert answer.committed == [1, 2, 3, 20, 21, 22, 23, 24]


def test_auto_hands_the_answer_to_cloud_only_after_two_rounds_with_nothing_in_flight():
    from edge_app.speculate import SWITCH_TO_CLOUD

    link = ScriptedLink(accept_all(epoch_of_prefill=1))
    opts = GenerateOptions(max_new_tokens=20, mode="auto", stop_ids=(), fill=False)
    answer = AnswerState([1, 2, 3], opts, GenerationStats(mode="auto"), EdgeMeters())
    est = Estimates(t_draft=5.0, t_rtt=0.01, acceptance=0.1, t_cloud=0.001)
    est.verify.observe(1, 0.001)
    loop = SpeculativeLoop(answer, CountingDrafter(), link, est, ExactVariant(), np.random.default_rng(0), "auto")
    assert asyncio.run(loop.run()) == SWITCH_TO_CLOUD
    assert answer.stats.rounds == 2 and loop.sent == 0 and answer.done_reason is None
    assert answer.stats.mode_switches == ["cloud"]


def test_every_drafter_implements_the_draft_model_protocol():
    """The llama.cpp drafter, the load test's replay drafter and the tests' drafters all offer what
    the speculative loop calls (edge_app.draft_model.DraftModel), nothing duck-typed beyond it."""
    from bench.replay import ReplayDrafter
    from edge_app.draft_model import DraftModel
    from edge_app.drafter import Drafter
    from tests.tiny import TinyDrafter

    members = [name for name in vars(DraftModel) if not name.startswith("_")]
    assert set(members) == {"length", "tokens", "prefill", "feed", "rollback", "logits"}
    for cls in (Drafter, ReplayDrafter, TinyDrafter, CountingDrafter):
        missing = [m for m in members if not hasattr(cls, m)]
        assert not missing, (cls.__name__, missing)
    assert isinstance(CountingDrafter(), DraftModel)


def test_a_completed_block_goes_up_before_its_last_token_is_fed_to_the_drafter():
    """The last drafted token's feed is only needed for the token after it: the block must not
    wait for it (one draft forward pass less between a verdict and the next block)."""
    drafter_len_at_send = []

    class WatchedLink(ScriptedLink):
        async def send(self, msg):
            if isinstance(msg, codec.Draft):
                drafter_len_at_send.append((msg.pos + len(msg.ids), watched.length))
            await super().send(msg)

    watched = CountingDrafter()
    link = WatchedLink(accept_all(1))
    opts = GenerateOptions(max_new_tokens=9, block=2, run_ahead=2, mode="pipeline", stop_ids=())
    answer = AnswerState([1, 2, 3], opts, GenerationStats(mode="pipeline"), EdgeMeters())
    loop = SpeculativeLoop(answer, watched, link, Estimates(), ExactVariant(), np.random.default_rng(0), "pipeline")
    asyncio.run(loop.run())
    assert answer.committed == [1, 2, 3] + [4 + i for i in range(9)]
    assert drafter_len_at_send and all(fed == end - 1 for end, fed in drafter_len_at_send)


class UnsureDrafter(CountingDrafter):
    """Drafts last token + 1 like CountingDrafter, but is unsure (top probability ~0.35) of every
    token that is a multiple of 5."""

    def logits(self):
        out = super().logits()
        nxt = (self._tokens[-1] + 1) % V
        if nxt % 5 == 0:
            out[nxt] = 1.0
            out[(nxt + 7) % V] = 0.6  # a close rival
        return out


def _sent_blocks(mode: str, cut_below: float, block: int = 4) -> tuple[list[list[int]], AnswerState]:
    link = ScriptedLink(accept_all(1))
    opts = GenerateOptions(max_new_tokens=16, block=block, run_ahead=2 * block if mode == "pipeline" else block,
                           mode=mode, stop_ids=(), cut_below=cut_below)
    answer = AnswerState([1, 2, 3], opts, GenerationStats(mode=mode), EdgeMeters())
    loop = SpeculativeLoop(answer, UnsureDrafter(), link, Estimates(), ExactVariant(), np.random.default_rng(0), mode)
    asyncio.run(loop.run())
    return [list(m.ids) for m in link.drafts()], answer


def test_the_pipeline_sends_a_block_right_after_a_token_the_draft_model_is_unsure_of():
    """A rejection is likely at an unsure token: drafting on past it would only delay the pass that
    finds it. The block goes up at once; the tokens after it go up in the next block."""
    cut, answer = _sent_blocks("pipeline", cut_below=0.5)
    full, answer_full = _sent_blocks("pipeline", cut_below=0.0)
    assert answer.committed == answer_full.committed == [1, 2, 3] + list(range(4, 20))
    # the cloud's first token is 4; drafts start at 5 (unsure), then 6..9, 10 (unsure), ...
    assert cut[:3] == [[5], [6, 7, 8, 9], [10]]
    assert all(len(b) == 4 for b in full[:-1])  # off: full blocks only
    assert answer.stats.cut_blocks == sum(1 for b in cut if b[-1] % 5 == 0 and len(b) < 4) > 0
    assert answer_full.stats.cut_blocks == 0


def test_sync_keeps_its_fixed_blocks_whatever_the_draft_model_thinks():
    """Sync is the vanilla baseline: one block size, never cut."""
    blocks, answer = _sent_blocks("sync", cut_below=0.5)
    assert answer.committed == [1, 2, 3] + list(range(4, 20))
    assert all(len(b) == 4 for b in blocks[:-1]) and answer.stats.cut_blocks == 0


def test_cut_below_is_a_probability():
    import pytest

    with pytest.raises(ValueError, match="cut_below"):
        GenerateOptions(cut_below=1.5)
