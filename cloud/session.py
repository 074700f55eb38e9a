"""One edge device's verification state on the cloud: committed prefix, KV cache, epoch, RNG.

Invariant between passes (positions are absolute token indices):
  - `context` is the committed prefix (prompt + committed output);
  - the target's cache holds context[:cache_len] with cache_len == len(context) - 1 (the last
    committed token, a recovered or bonus one, is not fed yet) or cache_len == len(context), in
    which case `pending_row` holds the target's logits for position len(context): kept from the
    last row of a pass that was accepted whole, it verifies the next block's first token without
    any extra forward pass.

A pass takes a block of queued drafted tokens, feeds [unfed committed] + [forced] + drafted in ONE
forward pass and runs the accept / recover rule. A rejection bumps the epoch: every queued draft of
the old epoch is stale and is dropped.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch

from sampling import (
    SamplingParams,
    SparseDist,
    Outcome,
    sample_dense,
    target_probs,
    top_k_sparse,
    verify_block,
    verify_block_greedy,
    verify_token,
)


class SessionError(Exception):
    """A protocol violation by the edge: closes that session only."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass
class Block:
    """Drafted tokens taken from the queue for one pass.

    pos: absolute position of ids[0]; forced: ids the edge already decided (the paper variant's
    recovered token), committed without a test; dists / q_scalar: one per drafted id, or None.
    """

    epoch: int
    pos: int
    ids: list[int]
    dists: list[SparseDist] | None = None
    q_scalar: list[float] | None = None
    forced: list[int] = field(default_factory=list)
    wait: bool = False
    seq: int = 0


@dataclass
class PassResult:
    """What one verify pass decided, before it is applied to the session."""

    accepted: int
    token: int | None
    kind: str  # "" (accepted whole), "recovered", "bonus", "rejected" (paper variant)
    top_ids: list[int] | None
    top_probs: list[float] | None
    pending_row: torch.Tensor | None
    keep_cache: int
    verify_s: float


class VerifySession:
    """The cloud half of one edge session. Not thread-safe: one op at a time (the server's
    per-session work loop guarantees it); `compute_pass` may run on a worker thread."""

    def __init__(self, engine, params: SamplingParams, variant: str = "exact",
                 paper_top_k: int = 8, eos_id: int | None = None, max_context: int = 32768,
                 max_queued_entries: int = 1 << 21):
        self.engine = engine
        self.params = params
        self.variant = variant
        self.paper_top_k = paper_top_k
        self.eos_id = eos_id
        self.max_context = max_context
        # drafted ids plus their distributions' entries waiting in `queue`: what a hostile edge
        # could make this session hold beyond its KV cache
        self.max_queued_entries = max_queued_entries
        self.queued_entries = 0
        self.rng = np.random.default_rng(params.seed)
        self.context: list[int] = []
        self.pending_row: torch.Tensor | None = None
        self.awaiting_forced = False
        self.epoch = 0
        self.max_new_tokens = 0
        self.prompt_len = 0
        self.queue: list[Block] = []
        # bubble filling: after a correction, until fresh drafts arrive, the cloud commits target
        # tokens of its own (exact: sampled from p) so that the verifier never idles
        self.fill = False
        self.in_bubble = False
        self.extended = 0
        # counters for /metrics and stats
        self.drafted = 0
        self.accepted = 0
        self.passes = 0

    # -- the committed prefix ----------------------------------------------------------------
    def begin_prompt(self, ids: list[int], max_new_tokens: int) -> list[int]:
        """Check a new context and roll the cache back to the common prefix; returns the ids still
        to prefill (the server feeds them chunk by chunk, so other sessions' passes interleave)."""
        if not ids:
            raise SessionError("bad_message", "the prompt is empty")
        if len(ids) + max_new_tokens > self.max_context:
            raise SessionError("too_large", f"prompt {len(ids)} + {max_new_tokens} new tokens exceeds "
                                            f"the context limit {self.max_context}")
        keep = min(self.engine.common_prefix_keep(self.context, ids), len(ids) - 1)
        self.engine.rollback(keep)
        # the context is unknown until end_prompt: an interrupted prefill leaves nothing to reuse
        self.context, self.prompt_len, self.pending_row = [], 0, None
        return ids[keep:]

    def end_prompt(self, ids: list[int], max_new_tokens: int, last_row: torch.Tensor,
                   fill: bool = False) -> None:
        self.fill = fill and self.variant == "exact"
        self.in_bubble = self.fill  # the edge is drafting its first block: fill the wait
        self.context = list(ids)
        self.pending_row = last_row
        self.awaiting_forced = False
        self.epoch += 1
        self._clear_queue()
        self.prompt_len = len(ids)
        self.max_new_tokens = max_new_tokens

    def _clear_queue(self) -> None:
        self.queue.clear()
        self.queued_entries = 0

    @property
    def generated(self) -> int:
        return len(self.context) - self.prompt_len

    # -- the draft queue ---------------------------------------------------------------------
    def expected_pos(self) -> int:
        queued = sum(len(b.forced) + len(b.ids) for b in self.queue)
        return len(self.context) + queued

    def add_draft(self, block: Block) -> bool:
        """Queue a drafted block; False if it is stale (an older epoch), raises if malformed."""
        if block.epoch != self.epoch:
            return False
        if not self.prompt_len:
            raise SessionError("bad_message", "a draft arrived before any prompt")
        if block.pos < len(self.context) and not self.queue and self.fill and not block.forced:
            if not self._strip_filled(block):
                return False
            if not block.ids:
                return True
        self.in_bubble = False
        if block.pos != self.expected_pos():
            raise SessionError("bad_message", f"draft for position {block.pos}, expected {self.expected_pos()}")
        if self.awaiting_forced and not self.queue and not block.forced:
            raise SessionError("bad_message", "the paper variant expects the recovered token first")
        if block.forced and not (self.awaiting_forced and not self.queue):
            raise SessionError("bad_message", "a forced token is only allowed right after a rejection")
        if not self.params.greedy and self.variant == "exact" and block.dists is None and block.ids:
            raise SessionError("bad_message", "sampling drafts must carry their distributions")
        if not self.params.greedy and self.variant == "paper" and block.q_scalar is None and block.ids:
            raise SessionError("bad_message", "paper-variant drafts must carry q(x)")
        if not block.ids and not block.forced:
            raise SessionError("bad_message", "an empty draft")
        if self.expected_pos() + len(block.forced) + len(block.ids) > self.max_context:
            raise SessionError("too_large", "the draft runs past the context limit")
        entries = _entries(block)
        if self.queued_entries + entries > self.max_queued_entries:
            raise SessionError("overloaded", "too many drafted tokens waiting for verification")
        self.queued_entries += entries
        self.queue.append(block)
        return True

    def _strip_filled(self, block: Block) -> bool:
        """Drafts for positions the cloud has already filled: those that match are dropped from
        the block; a mismatch makes the rest stale (epoch bump), exactly as the edge decides when it
        sees the same filled tokens against the same sent drafts."""
        overlap = min(len(block.ids), len(self.context) - block.pos)
        if block.ids[:overlap] != self.context[block.pos:block.pos + overlap]:
            self._correct()
            return False
        block.ids = block.ids[overlap:]
        if block.dists is not None:
            block.dists = block.dists[overlap:]
        if block.q_scalar is not None:
            block.q_scalar = block.q_scalar[overlap:]
        block.pos += overlap
        return True

    def _correct(self) -> None:
        """The committed prefix now differs from the edge's drafts: they are all stale."""
        self.epoch += 1
        self._clear_queue()
        self.in_bubble = self.fill

    # -- bubble filling ----------------------------------------------------------------------
    def can_fill(self) -> bool:
        """Idle, asked to, and nothing fresh to verify: commit a target token of our own."""
        last = self.context[-1] if self.context else None
        return (self.fill and self.in_bubble and not self.queue and self.prompt_len > 0
                and self.generated < self.max_new_tokens and last != self.eos_id)

    def prepare_fill(self) -> None:
        """The forward pass a filled token needs (worker thread). Its row is kept as pending, so
        if a draft arrives meanwhile it verifies that draft's first token instead."""
        if self.pending_row is None:
            self.pending_row = self.engine.forward(self.context[self.engine.cache_len:])[-1]

    def commit_fill(self) -> int:
        """Sample the next token from the target's own distribution and commit it."""
        self.extended += 1
        return self._commit_sampled()

    def _commit_sampled(self) -> int:
        token = self._sample(self.pending_row)
        self.context.append(token)
        self.pending_row = None
        return token

    def take_block(self, max_block: int) -> Block | None:
        """Merge queued blocks (in order) into one pass of at most max_block drafted tokens."""
        if not self.queue:
            return None
        first = self.queue.pop(0)
        self.queued_entries -= _entries(first)
        merged = Block(first.epoch, first.pos + len(first.forced), list(first.ids),
                       list(first.dists) if first.dists is not None else None,
                       list(first.q_scalar) if first.q_scalar is not None else None,
                       list(first.forced), first.wait, first.seq)
        while self.queue and len(merged.ids) + len(self.queue[0].ids) <= max_block and not self.queue[0].forced:
            nxt = self.queue.pop(0)
            self.queued_entries -= _entries(nxt)
            merged.ids += nxt.ids
            if merged.dists is not None and nxt.dists is not None:
                merged.dists += nxt.dists
            if merged.q_scalar is not None and nxt.q_scalar is not None:
                merged.q_scalar += nxt.q_scalar
            merged.wait, merged.seq = nxt.wait, nxt.seq
        # a block longer than max_block is verified in pieces: put the tail back
        if len(merged.ids) > max_block:
            tail = Block(merged.epoch, merged.pos + max_block, merged.ids[max_block:],
                         merged.dists[max_block:] if merged.dists is not None else None,
                         merged.q_scalar[max_block:] if merged.q_scalar is not None else None,
                         [], merged.wait, merged.seq)
            merged.ids = merged.ids[:max_block]
            merged.dists = merged.dists[:max_block] if merged.dists is not None else None
            merged.q_scalar = merged.q_scalar[:max_block] if merged.q_scalar is not None else None
            merged.wait = False
            self.queue.insert(0, tail)
            self.queued_entries += _entries(tail)
        return merged

    # -- one verify pass ---------------------------------------------------------------------
    def compute_pass(self, block: Block) -> PassResult:
        """Feed [unfed committed] + forced + drafted in one forward pass; decide the verdict.

        Touches only the engine and the RNG, so it can run off the event loop.
        """
        t0 = time.perf_counter()
        cache_before = self.engine.cache_len
        unfed = self.context[cache_before:]
        feed = unfed + block.forced + block.ids
        rows = self.engine.forward(feed)  # [len(feed), V]
        base = len(unfed) + len(block.forced) - 1  # row predicting block.ids[0]

        def row(i: int) -> torch.Tensor:
            return rows[base + i] if base + i >= 0 else self.pending_row

        k = len(block.ids)
        committed_before = len(self.context) + len(block.forced)
        verdict = self._decide([row(i) for i in range(k)], block)
        n = verdict.accepted
        if n < k:  # rejected at position n: keep the cache up to the accepted prefix
            if self.variant == "paper" and not self.params.greedy:
                p = target_probs(row(n).double().numpy(), self.params)
                top_ids, top_probs = top_k_sparse(p, self.paper_top_k)
                return PassResult(n, None, "rejected", top_ids.tolist(), top_probs.tolist(), row(n),
                                  committed_before + n, time.perf_counter() - t0)
            return PassResult(n, verdict.recovered, "recovered", None, None, None,
                              committed_before + n, time.perf_counter() - t0)
        # accepted whole: the last row is the target's distribution for the next position
        next_row = rows[-1]
        room = self.generated + len(block.forced) + k < self.max_new_tokens
        last = (block.forced + block.ids)[-1:] or self.context[-1:]
        if block.wait and room and last != [self.eos_id]:
            bonus = self._sample(next_row)
            return PassResult(k, bonus, "bonus", None, None, None, committed_before + k,
                              time.perf_counter() - t0)
        return PassResult(k, None, "", None, None, next_row, committed_before + k, time.perf_counter() - t0)

    def _decide(self, target_rows: list[torch.Tensor], block: Block) -> Outcome:
        if not block.ids:
            return Outcome(0, None)
        if self.params.greedy:
            argmax = [int(torch.argmax(r)) for r in target_rows]
            return verify_block_greedy(block.ids, argmax)
        probs = [target_probs(r.double().numpy(), self.params) for r in target_rows]
        if self.variant == "paper":
            for j, (x, qx, p) in enumerate(zip(block.ids, block.q_scalar, probs)):
                if not verify_token(x, qx, p, self.rng):
                    return Outcome(j, None)
            return Outcome(len(block.ids), None)
        return verify_block(block.ids, block.dists, probs, self.rng)

    def _sample(self, logits: torch.Tensor) -> int:
        if self.params.greedy:
            return int(torch.argmax(logits))
        return sample_dense(target_probs(logits.double().numpy(), self.params), self.rng)

    def apply_pass(self, block: Block, result: PassResult) -> int:
        """Commit a pass's outcome; returns the epoch the edge must draft in from now on."""
        self.passes += 1
        self.drafted += len(block.ids)
        self.accepted += result.accepted
        self.context += block.forced + block.ids[: result.accepted]
        self.engine.rollback(result.keep_cache)
        self.pending_row = result.pending_row
        self.awaiting_forced = result.kind == "rejected"
        if result.token is not None:
            self.context.append(result.token)
        if result.kind:  # the edge's later drafts no longer follow the committed prefix
            self.in_bubble = self.fill
            self.epoch += 1
            self._clear_queue()
        return self.epoch

    # -- cloud-only decoding -----------------------------------------------------------------
    def next_target_token(self) -> int:
        """Cloud-only mode: sample (or argmax) one target token and commit it."""
        self.prepare_fill()
        return self._commit_sampled()


def _entries(block: Block) -> int:
    """Memory a queued block holds, in ids: its tokens and their distributions' supports."""
    return len(block.ids) + len(block.forced) + sum(len(d.ids) for d in block.dists or ())
