"""One edge device's state on the verifier: committed prefix, KV cache, epoch, RNG, draft queue.

The session owns the state and the rules for changing it; the pieces plug in:
  cloud/verify.py         the verify step (one pass: accept / recover, apply, roll back)
  cloud/draft_queue.py    drafted blocks waiting for a pass
  cloud/paper_variant.py  the paper's variant of the accept / recover rule
  cloud/fill.py           bubble filling
The server's per-session work loop (cloud/work_loop.py) makes every call, one at a time; only the
forward passes (and the decisions on their rows) run on the scheduler's worker thread.

Epochs: the cloud decides them. Every message that changes the committed prefix (Prefilled,
Verdict, Tokens) carries the epoch the edge drafts in from then on; a Draft of another epoch is
stale and dropped without a word.
"""
from __future__ import annotations

import numpy as np
import torch

from cloud.draft_queue import Block, DraftQueue, strip_committed
from cloud.errors import SessionError
from cloud.fill import BubbleFill, FillTiming, NoFill
from cloud.paper_variant import PaperRule
from cloud.prefix_cache import PrefixStore
from cloud.verify import ExactRule
from sampling import SamplingParams

NO_FILL = NoFill()
MAX_BRANCHES = 4  # branches a session holds for its current epoch; a newer one replaces the oldest


def make_rule(variant: str, params: SamplingParams, paper_top_k: int = 8, impl: str = "numpy") -> ExactRule:
    """The accept / recover rule of a Hello's variant ("exact" or "paper"); impl: where its math
    runs, "numpy" or "torch" (cloud/rule_impl.py)."""
    if variant == "paper":
        return PaperRule(params, paper_top_k, impl)
    if variant == "exact":
        return ExactRule(params, impl)
    raise SessionError("bad_message", f"unknown variant {variant!r}; use 'exact' or 'paper'")


class VerifySession:
    """The cloud half of one edge session. Not thread-safe: one call at a time.
    rule_impl: "numpy" or "torch", where the rule's math runs (cloud/rule_impl.resolve_rule)."""

    def __init__(self, engine, params: SamplingParams, variant: str = "exact", paper_top_k: int = 8,
                 eos_id: int | None = None, max_context: int = 32768, max_queued_entries: int = 1 << 21,
                 rule_impl: str = "numpy", fill_timing: FillTiming | None = None):
        self.engine = engine
        self.params = params
        self.rule = make_rule(variant, params, paper_top_k, rule_impl)
        self.eos_id = eos_id
        self.max_context = max_context
        self.rng = np.random.default_rng(params.seed)
        self.committed: list[int] = []  # prompt + answer so far, as both sides agree
        self.prompt_len = 0  # 0 until a prompt is prefilled
        self.max_new_tokens = 0  # the Prompt's answer budget
        self.pending_row: torch.Tensor | None = None  # [V] on the target's device; see cloud/verify.py
        self.epoch = 0
        self.queue = DraftQueue(max_queued_entries)
        # branches of the current epoch, by (position, root): see add_branch / take_branch
        self.branches: dict[tuple[int, int], Block] = {}
        self.branches_taken = 0
        self.fill: NoFill = NO_FILL
        # bubbles measured on this session (and its device's earlier ones), for every answer's filling
        self.fill_timing = fill_timing if fill_timing is not None else FillTiming()
        # counters for /metrics and the close log
        self.drafted = 0
        self.accepted = 0
        self.passes = 0
        self.filled = 0
        self.opening_reused = 0  # positions of this prompt copied from a stored opening

    @property
    def variant(self) -> str:
        return self.rule.name

    @property
    def generated(self) -> int:
        """Answer tokens committed since the prompt."""
        return len(self.committed) - self.prompt_len

    @property
    def budget_left(self) -> int:
        """Answer tokens still allowed by the Prompt's max_new_tokens."""
        return self.max_new_tokens - self.generated

    @property
    def queued_entries(self) -> int:
        return self.queue.entries

    # -- a prompt ------------------------------------------------------------------------------
    def begin_prompt(self, ids: list[int], max_new_tokens: int, openings: PrefixStore | None = None,
                     scope: str = "") -> list[int]:
        """Check a new committed prefix and roll the cache back to what it shares with the old one
        (or copy in a longer opening other sessions' prompts stored, see cloud/prefix_cache.py);
        returns the ids still to prefill (the caller feeds them, chunk by chunk)."""
        if not ids:
            raise SessionError("bad_message", "the prompt is empty")
        if len(ids) + max_new_tokens > self.max_context:
            raise SessionError("too_large", f"prompt {len(ids)} + {max_new_tokens} new tokens exceeds "
                                            f"the context limit {self.max_context}")
        keep = min(self.engine.common_prefix_keep(self.committed, ids), len(ids) - 1)
        self.engine.rollback(keep)
        self.opening_reused = 0
        if openings is not None and self.engine.can_share_rows:
            n, opening = openings.match(ids, len(ids) - 1, scope)
            if n > keep:
                self.engine.import_rows(opening.kv)
                self.opening_reused, keep = n, n
        # nothing is committed until end_prompt: an interrupted prefill leaves nothing to reuse
        self.committed, self.prompt_len, self.pending_row = [], 0, None
        return ids[keep:]

    def end_prompt(self, ids: list[int], max_new_tokens: int, last_row: torch.Tensor,
                   fill: bool = False) -> int | None:
        """The prompt is in the cache (last_row: the logits after it). Commits the answer's first
        token, sampled from last_row, when max_new_tokens > 0 and returns it (Prefilled.token);
        the paper variant drafts its first token instead, as in the paper."""
        self.committed = list(ids)
        self.prompt_len = len(ids)
        self.max_new_tokens = max_new_tokens
        self.pending_row = last_row
        self.rule.reset()
        self.fill = BubbleFill(self.fill_timing) if fill and self.rule.allows_fill else NO_FILL
        self.epoch += 1
        self.queue.clear()
        self.branches.clear()
        return self.commit_next_token() if max_new_tokens > 0 and self.rule.first_token_from_prefill else None

    def share_opening(self, openings: PrefixStore, shared: int, scope: str = "") -> bool:
        """After a prefill: keep the prompt's first `shared` positions for other sessions of
        `scope` (a Prompt.shared the store does not hold yet). True if stored."""
        opening = self.committed[:min(shared, self.prompt_len)]
        if not opening or not self.engine.can_share_rows or openings.holds(opening, scope):
            return False
        return openings.put(opening, self.engine.export_rows(len(opening)), scope)

    # -- drafts --------------------------------------------------------------------------------
    def add_draft(self, block: Block, arrived_at: float | None = None) -> bool:
        """Queue a drafted block; False if it is stale (another epoch, or contradicted by tokens the
        cloud committed itself); SessionError if it breaks the protocol. arrived_at: when its Draft came in
        (time.monotonic), for the bubble's timing."""
        if block.epoch != self.epoch:
            return False
        if not self.prompt_len:
            raise SessionError("bad_message", "a draft arrived before any prompt")
        if block.root is not None:
            return self.add_branch(block)
        if not self.queue:
            stripped = strip_committed(block, self.committed)
            if stripped is None:
                self.correct()
                return False
            if not stripped.ids and block.ids:
                return True  # every id was filled already, and matched
            block = stripped
        self.fill.close_bubble(arrived_at)
        self.rule.check(block, queue_empty=not self.queue)
        self.queue.push(block, len(self.committed), self.max_context)
        return True

    def take_block(self, max_block: int) -> Block | None:
        return self.queue.take(max_block)

    # -- branches: drafts for the likeliest recovered token, verified without a round trip -------
    def add_branch(self, block: Block) -> bool:
        """Keep a branch (a Draft with a root) of the current epoch aside; False if its root's
        position is committed already (it came too late). Checked like a queued block, and held
        in a bounded number: the newest MAX_BRANCHES, one per (position, root)."""
        root_pos = block.pos - 1
        if root_pos < len(self.committed):
            return False
        if block.end > self.max_context:
            raise SessionError("too_large", "the branch runs past the context limit")
        if self.variant != "exact":  # the paper variant recovers on the edge: nothing to take
            raise SessionError("bad_message", "branches need the exact variant")
        self.rule.check(block, queue_empty=False)
        if block.entries > self.queue.max_entries // (2 * MAX_BRANCHES):
            raise SessionError("overloaded", "the branch holds too many drafted tokens")
        self.branches.pop((root_pos, block.root), None)
        self.branches[(root_pos, block.root)] = block
        while len(self.branches) > MAX_BRANCHES:
            self.branches.pop(next(iter(self.branches)))
        return True

    def pop_branch(self, pos: int, token: int) -> Block | None:
        """The branch drafted after `token` at `pos`, if the edge sent one (before a correction
        that commits `token` there makes the epoch move on)."""
        return self.branches.pop((pos, token), None)

    def queue_branch(self, branch: Block) -> int:
        """After the correction: the branch becomes the next pass's block, in the new epoch;
        returns its seq (Verdict.branch)."""
        branch.root, branch.epoch = None, self.epoch
        self.queue.push(branch, len(self.committed), self.max_context)
        self.fill.close_bubble()  # no turnaround of the edge's to time
        self.branches_taken += 1
        return branch.seq

    def correct(self) -> None:
        """The committed prefix no longer follows the edge's drafts: they are all stale."""
        self.epoch += 1
        self.queue.clear()
        self.branches.clear()
        self.fill.open_bubble()

    # -- target tokens of the cloud's own: Prefilled, filled and cloud-only tokens ---------------
    def prepare_next_token(self) -> None:
        """The forward pass the next own token needs (worker thread), unless a row is pending.
        The row stays pending: if a draft arrives meanwhile, it verifies that draft's first id."""
        feed = self.next_token_feed()
        if feed:
            self.keep_row(self.engine.forward(feed))

    def next_token_feed(self) -> list[int]:
        """What prepare_next_token feeds: the unfed committed id, or nothing when a row is pending."""
        return [] if self.pending_row is not None else self.committed[self.engine.cache_len:]

    def keep_row(self, rows: torch.Tensor) -> None:
        """rows: [n, V] from feeding next_token_feed() (on the target's device, kept there); the
        last predicts the next position."""
        self.pending_row = rows[-1]

    def commit_next_token(self) -> int:
        """Sample the next token from the pending row (argmax when greedy) and commit it."""
        token = self.rule.sample(self.pending_row, self.rng)
        self.committed.append(token)
        self.pending_row = None
        return token

    def wants_fill(self) -> bool:
        return self.fill.wants_token(self)

    def commit_fill(self) -> int:
        self.filled += 1
        return self.commit_next_token()

    def generate_limit(self, max_new_tokens: int) -> int:
        """How many cloud-only tokens a Generate may add: its own count, capped by the Prompt's
        budget and the context; 0 once the answer has ended with eos."""
        if not self.prompt_len:
            raise SessionError("bad_message", "generate before any prompt")
        if self.generated and self.committed[-1] == self.eos_id:
            return 0
        return max(0, min(max_new_tokens, self.budget_left, self.max_context - len(self.committed)))
