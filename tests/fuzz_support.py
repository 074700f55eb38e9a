"""What the server fuzz tests draw and send (see test_fuzz_server.py).

Three kinds of input:
  frames     random bytes and valid frames with bytes flipped, cut, inserted or overwritten
  sequences  valid messages in hostile orders, sent all at once (queued work, merges, stale drafts,
             a Close with work pending)
  edge       an interactive hostile edge: it reads the verdicts and keeps its drafts on the
             committed prefix (often the target's own tokens, so blocks get accepted and sessions
             go deep), then now and then breaks one rule: a wrong epoch or position, a forced id
             at the wrong time, missing distributions, an empty draft, a run past the context
hypothesis leans to the first option of a sampled_from and to small numbers: the first option is
always the well-formed one, so that inputs get past the first check.
"""
from __future__ import annotations

import asyncio
import collections
import os
import time

import aiohttp
import numpy as np
import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

import codec
from sampling import SparseDist
from tests.tiny import VOCAB, fingerprint

KNOWN_CODES = set(codec.CODES) | {"timeout", "unauthorized", "overloaded", "model_mismatch", "rate_limited",
                                  "idle_timeout"}
FUZZ = settings(max_examples=300, deadline=None, database=None,
                derandomize=os.environ.get("PICOSPEC_FUZZ_RANDOM") is None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                       HealthCheck.data_too_large])
TRIED: collections.Counter = collections.Counter()
SENTINEL = codec.encode(codec.Prompt(ids=[3, 1, 4], max_new_tokens=0))
MAX_CONTEXT = 128  # the fuzz server's context limit: a huge Generate streams ~100 tokens, not 500
WINDOW_S = 10.0  # a safety net only: an exchange ends when its sentinel (or last reply) arrives
SAMPLINGS = [
    {"temperature": 0.0, "top_p": 1.0, "top_k": 0, "seed": None},
    {"temperature": 1.0, "top_p": 0.9, "top_k": 0, "seed": 1},
    {"temperature": 1e-300, "top_p": 1.0, "top_k": 0, "seed": 2},  # extreme but legal settings
    {"temperature": 1e300, "top_p": 1e-9, "top_k": 10 ** 9, "seed": 3},
]


def count(replies: list, kind: str) -> list[str]:
    """Tally an input and its replies; the error codes it got."""
    TRIED[f"input:{kind}"] += 1
    for m in replies:
        TRIED[f"reply:{type(m).__name__}"] += 1
    codes = [m.code for m in replies if isinstance(m, codec.Error)]
    for code in codes:
        TRIED[f"error:{code}"] += 1
    return codes


# -- frames ----------------------------------------------------------------------------------
def valid_frames() -> list[bytes]:
    return [codec.encode(m) for m in (
        codec.Prompt(ids=[1, 2, 3], max_new_tokens=8), codec.Prompt(ids=list(range(40)), max_new_tokens=4),
        codec.Draft(epoch=1, pos=3, ids=[5, 6, 7, 8], seq=1, wait=True), codec.Generate(max_new_tokens=3),
        codec.Draft(epoch=1, pos=3, ids=[9], forced=1), codec.Close(reason="bye"),
        codec.Hello(fingerprint=fingerprint(), sampling=SAMPLINGS[1]),
    )]


@st.composite
def mutated(draw) -> bytes:
    frame = bytearray(draw(st.sampled_from(valid_frames())))
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "cut", "insert", "set"]))
        i = draw(st.integers(0, max(0, len(frame) - 1)))
        if op == "flip" and frame:
            frame[i] ^= 1 << draw(st.integers(0, 7))
        elif op == "cut":
            del frame[i:i + draw(st.integers(1, 8))]
        elif op == "insert":
            frame[i:i] = draw(st.binary(min_size=1, max_size=8))
        elif frame:
            frame[i] = draw(st.sampled_from([0x00, 0x01, 0x7F, 0x80, 0xC1, 0xFF]))
    return bytes(frame)


frames = st.lists(st.one_of(st.binary(max_size=200), mutated()), min_size=1, max_size=4)


def prompts_in(frames: list[bytes]) -> int:
    n = 0
    for frame in frames:
        try:
            n += isinstance(codec.decode(frame, vocab_size=VOCAB), codec.Prompt)
        except codec.CodecError:
            break  # the server refuses here: nothing after it is handled
    return n


async def exchange(url: str, frames: list[bytes], hello: bytes | None) -> list:
    """Send hello + frames + a sentinel Prompt, and collect the replies until the server refuses
    or closes, or the sentinel's Prefilled arrives: the server handles a session's messages in
    order, so by then it has handled everything before it (every pass, every streamed token)."""
    expect = prompts_in(frames) + 1
    got = []
    async with aiohttp.ClientSession() as http:
        async with http.ws_connect(url, max_msg_size=codec.MAX_FRAME * 2) as ws:
            for frame in ([hello] if hello is not None else []) + frames + [SENTINEL]:
                try:
                    await ws.send_bytes(frame)
                except (ConnectionError, RuntimeError):
                    break
            end = time.monotonic() + WINDOW_S
            while (left := end - time.monotonic()) > 0 and expect:
                try:
                    msg = await ws.receive(timeout=left)
                except asyncio.TimeoutError:
                    break
                if msg.type != aiohttp.WSMsgType.BINARY:
                    break
                got.append(codec.decode(msg.data))  # a reply that does not decode fails the test
                expect -= isinstance(got[-1], codec.Prefilled)
    return got


# -- sequences -------------------------------------------------------------------------------
ids = st.lists(st.integers(0, VOCAB - 1), min_size=0, max_size=12)
counts = st.one_of(st.integers(0, 8), st.sampled_from([1 << 20, 1 << 40, (1 << 63) - 1]))


@st.composite
def support(draw, token: int) -> SparseDist:
    """A draft distribution that holds `token` (what the codec insists on)."""
    others = draw(st.sets(st.integers(0, VOCAB - 1), max_size=6)) | {token}
    ids_ = np.array(sorted(others), dtype=np.int64)
    return SparseDist(ids_, np.array([draw(st.integers(1, 4096)) for _ in ids_], dtype=np.int64))


@st.composite
def message(draw, pos: int):
    """One message; a draft is usually the one that would come next (epoch 1, at `pos`), else
    something near it: stale epochs, wrong positions, forced ids, missing distributions."""
    kind = draw(st.sampled_from(["draft", "draft", "prompt", "generate", "draft", "hello", "long"]))
    if kind == "prompt":
        return codec.Prompt(ids=draw(ids.filter(bool)), max_new_tokens=draw(counts))
    if kind == "long":  # past the context limit
        return codec.Prompt(ids=[1] * draw(st.integers(MAX_CONTEXT - 20, 2000)),
                            max_new_tokens=draw(st.integers(0, 300)))
    if kind == "draft":
        draft = draw(st.one_of(ids.filter(bool), ids))
        carry = draw(st.sampled_from(["none", "dists", "q", "none"]))  # what sampling drafts carry
        return codec.Draft(epoch=draw(st.sampled_from([1, 1, 0, 2, 3])),
                           pos=max(0, pos + draw(st.sampled_from([0, 0, -1, 1, 4]))), ids=draft,
                           dists=[draw(support(t)) for t in draft] if carry == "dists" else None,
                           q_scalar=[draw(st.floats(1e-9, 1.0)) for _ in draft] if carry == "q" else None,
                           forced=draw(st.sampled_from([0, 0, 1])) if draft else 0,
                           wait=draw(st.booleans()), seq=draw(st.integers(0, 5)))
    if kind == "generate":
        return codec.Generate(max_new_tokens=draw(counts))
    return codec.Hello(fingerprint=fingerprint(), sampling=SAMPLINGS[0])


@st.composite
def session(draw):
    """(sampling, variant, messages): a Prompt usually first; Close, if any, last (the server
    drops what is queued at a Close)."""
    prompt_len = draw(st.integers(1, 8))
    sampling, variant = draw(st.sampled_from(SAMPLINGS)), draw(st.sampled_from(["exact", "paper"]))
    msgs = []
    if draw(st.sampled_from([True, True, True, False])):
        msgs.append(codec.Prompt(ids=[7] * prompt_len, max_new_tokens=draw(st.integers(0, 30))))
    pos = prompt_len  # where the next draft goes if every earlier one were accepted
    for _ in range(draw(st.integers(1, 8))):
        msgs.append(draw(message(pos)))
        if isinstance(msgs[-1], codec.Draft):
            pos = msgs[-1].pos + len(msgs[-1].ids)
    if draw(st.integers(0, 4)) == 4:  # the edge leaves with work still queued
        msgs.append(codec.Close())
    return sampling, variant, msgs


# -- the interactive hostile edge --------------------------------------------------------------
# mostly well-formed steps, so that sessions get deep before one rule is broken
FAULTS = ["none"] * 8 + ["stale_epoch", "future_epoch", "pos", "forced", "no_dists", "empty", "past_context",
                         "frame"]


@st.composite
def edge_action(draw, well_formed: bool = False):
    kind = "draft" if well_formed else draw(st.sampled_from(["draft", "draft", "draft", "prompt", "generate"]))
    if kind == "draft":
        k = draw(st.integers(1, 10))
        return ("draft", "none" if well_formed else draw(st.sampled_from(FAULTS)),
                draw(st.booleans()),  # good: the target's own tokens (accepted), else random ones
                draw(st.lists(st.integers(0, VOCAB - 1), min_size=k, max_size=k)),
                draw(st.lists(st.integers(1, 4096), min_size=k, max_size=k)),  # a weight for the token
                draw(st.lists(st.floats(1e-6, 1.0), min_size=k, max_size=k)),  # q(token), paper variant
                draw(st.one_of(st.binary(max_size=40), mutated())))  # for the "frame" fault
    if kind == "prompt":
        return ("prompt", draw(st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=8)),
                draw(st.integers(0, 40)))
    return ("generate", draw(st.one_of(st.integers(0, 6), st.just(1 << 40))))


first_prompt = st.tuples(st.just("prompt"), st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=8),
                         st.integers(1, 60))
# a prompt, a few well-formed rounds, then anything (a fault, usually, sooner or later)
with_prompt = st.tuples(first_prompt, st.lists(edge_action(well_formed=True), min_size=1, max_size=6),
                        st.lists(edge_action(), min_size=0, max_size=8)).map(lambda t: [t[0]] + t[1] + t[2])
edge_script = st.tuples(st.sampled_from(SAMPLINGS), st.sampled_from(["exact", "paper"]),
                        st.one_of(with_prompt, with_prompt, with_prompt,  # usually a prompt first
                                  st.lists(edge_action(), min_size=1, max_size=6)))


_NEXT: dict = {}


def next_token(model, ctx: tuple[int, ...]) -> int:
    """The model's greedy next token after ctx, remembered (examples share their prefixes)."""
    if ctx not in _NEXT:
        if len(_NEXT) > 100_000:
            _NEXT.clear()
        with torch.inference_mode():
            _NEXT[ctx] = int(model(input_ids=torch.tensor([list(ctx)])).logits[0, -1].argmax())
    return _NEXT[ctx]


class HostileEdge:
    """Plays an edge that follows the protocol from the verdicts it reads, and breaks one rule
    when its script says so. `faulted`: whether it has broken one (before that, any Error is a
    false refusal by the server)."""

    def __init__(self, ws, target, sampling: dict, variant: str):
        self.ws, self.target, self.sampling, self.variant = ws, target, sampling, variant
        self.greedy = sampling["temperature"] <= 0
        self.committed: list[int] = []
        self.epoch = 0
        self.awaiting_forced = False
        self.faulted = False
        self.replies: list = []
        self.closed = False

    async def reply(self):
        msg = await self.ws.receive(timeout=WINDOW_S)
        if msg.type != aiohttp.WSMsgType.BINARY:
            self.closed = True
            return None
        m = codec.decode(msg.data)
        self.replies.append(m)
        if isinstance(m, codec.Error):
            self.closed = True
        return m

    async def send(self, msg_or_frame) -> None:
        frame = msg_or_frame if isinstance(msg_or_frame, bytes) else codec.encode(msg_or_frame)
        await self.ws.send_bytes(frame)

    async def run(self, actions) -> None:
        for action in actions:
            if self.closed:
                return
            await getattr(self, action[0])(*action[1:])

    async def prompt(self, ids: list[int], max_new: int) -> None:
        await self.send(codec.Prompt(ids=ids, max_new_tokens=max_new))
        m = await self.reply()
        if isinstance(m, codec.Prefilled):  # the answer's first token comes with it
            self.committed = list(ids) + ([m.token] if m.token is not None else [])
            self.epoch, self.awaiting_forced = m.epoch, False

    async def generate(self, n: int) -> None:
        await self.send(codec.Generate(max_new_tokens=n))
        self.faulted |= not self.committed  # before any prompt
        while (m := await self.reply()) is not None and isinstance(m, codec.Tokens):
            self.committed += m.ids
            if m.done:
                return

    def target_tokens(self, k: int) -> list[int]:
        """The target's greedy continuation of the committed prefix: drafts that get accepted."""
        out, ctx = [], list(self.committed)
        for _ in range(k):
            out.append(next_token(self.target, tuple(ctx)))
            ctx.append(out[-1])
        return out

    async def draft(self, fault, good, random_ids, weights, qs, frame) -> None:
        if fault == "frame":
            await self.send(frame)
            self.faulted = True
            return
        if not self.committed:
            fault = "before_prompt"
        ids = self.target_tokens(len(random_ids)) if good and self.committed else list(random_ids)
        forced = 1 if self.awaiting_forced else 0  # the paper variant's recovered token goes first
        epoch, pos = self.epoch, len(self.committed)
        dists = q = None
        if not self.greedy and self.variant == "exact":
            dists = [SparseDist(np.array([t]), np.array([w])) for t, w in zip(ids, weights)]
        elif not self.greedy:
            q = [1.0] * forced + list(qs[forced:])
        if fault == "stale_epoch":
            epoch = max(0, epoch - 1)
        elif fault == "future_epoch":
            epoch += 3
        elif fault == "pos":
            pos += 2
        elif fault == "forced":
            forced = 1 - forced
        elif fault == "no_dists":
            dists = q = None
        elif fault == "empty":
            ids, forced = [], 0
            dists, q = ([] if dists is not None else None), ([] if q is not None else None)
        elif fault == "past_context":
            pos = MAX_CONTEXT + 5
        if q is not None and len(q) != len(ids):
            q = [1.0] * len(ids)
        # faults the server must refuse (the others it drops or ignores without a word)
        self.faulted |= fault in ("pos", "forced", "empty", "past_context", "before_prompt") or (
            fault == "no_dists" and not self.greedy) or pos + len(ids) > MAX_CONTEXT
        await self.send(codec.Draft(epoch=epoch, pos=pos, ids=ids, dists=dists, q_scalar=q, forced=forced,
                                    wait=True))
        if epoch != self.epoch:
            return  # dropped without a reply, as a draft that crossed a rejection in flight is
        m = await self.reply()
        if isinstance(m, codec.Verdict):
            self.committed += ids[:forced] + ids[forced:][:m.accepted] + ([m.token] if m.token is not None else [])
            self.epoch, self.awaiting_forced = m.new_epoch, m.kind is codec.VerdictKind.RECOVER_ON_EDGE
