"""One answer on the edge: its options, its committed prefix, its statistics.

Every generation loop (speculative, cloud-only, edge-only) grows the same `AnswerState`: tokens
are committed in one place, so stop tokens, length limits, the user's streaming callback and the
first-token time are handled once.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

import codec
from edge_app.meters import EdgeMeters
from edge_app.stats import derived
from sampling import SamplingParams

MODES = ("auto", "pipeline", "sync", "cloud", "edge")

# on_commit(new_committed_ids, speculative_ids): called whenever the committed text grows
CommitCallback = Callable[[list[int], list[int]], None]


@dataclass
class GenerateOptions:
    max_new_tokens: int = 128
    params: SamplingParams = field(default_factory=SamplingParams)
    mode: str = "auto"  # "auto" chooses cloud, sync or pipeline from measured numbers
    variant: str = "exact"  # "exact" (sparse q up, cloud recovers) or "paper" (scalar q up, top-K down)
    paper_top_k: int = 8
    block: int | None = None  # fixed block size; None adapts to measurements
    fill: bool = True  # pipeline: let the cloud fill its idle bubbles with target tokens
    run_ahead: int | None = None  # max unverified drafted tokens; None = 2 x block
    stop_ids: tuple[int, ...] = ()
    branch: bool = False  # while waiting, pre-draft after the likeliest rejection (edge_app/branches.py)
    branch_len: int = 3  # tokens drafted on a branch
    # pipeline: a block goes up right after a drafted token the draft model gave less than this
    # probability (where a rejection is likely), without waiting to fill the block; 0 turns it off
    cut_below: float = 0.5

    def __post_init__(self) -> None:
        if not 0.0 <= self.cut_below <= 1.0:
            raise ValueError(f"cut_below is a probability in [0, 1], got {self.cut_below}")


@dataclass
class GenerationStats:
    mode: str
    drafted: int = 0
    accepted: int = 0
    rejected: int = 0
    recovered: int = 0
    bonus: int = 0
    rounds: int = 0
    stale_drafts: int = 0
    bytes_up: int = 0
    bytes_down: int = 0
    wall_s: float = 0.0
    ttft_s: float | None = None
    new_tokens: int = 0
    reconnects: int = 0  # the verifier was lost and a new session resumed the answer
    migrations: int = 0  # a draining replica handed the answer to another one (not a failure)
    edge_only_tokens: int = 0
    filled: int = 0
    branches: int = 0  # branches pre-drafted while waiting
    branch_tokens: int = 0
    branch_hits: int = 0  # branches that became the main line
    branches_sent: int = 0  # branches sent up for the verifier to hold
    branches_taken: int = 0  # ... that the verifier took and verified with no round trip
    mode_switches: list[str] = field(default_factory=list)
    block_sizes: list[int] = field(default_factory=list)
    cut_blocks: int = 0  # blocks sent early after an unsure draft token (GenerateOptions.cut_below)
    verify_s: list[float] = field(default_factory=list)
    edge: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        counts = {
            "mode": self.mode,
            "drafted": self.drafted,
            "accepted": self.accepted,
            "rejected": self.rejected,
            "recovered": self.recovered,
            "bonus": self.bonus,
            "rounds": self.rounds,
            "stale_drafts": self.stale_drafts,
            "reconnects": self.reconnects,
            "migrations": self.migrations,
            "filled": self.filled,
            "branches": self.branches,
            "branch_tokens": self.branch_tokens,
            "branch_hits": self.branch_hits,
            "branches_sent": self.branches_sent,
            "branches_taken": self.branches_taken,
            "cut_blocks": self.cut_blocks,
            "mode_switches": list(self.mode_switches),
            "edge_only_tokens": self.edge_only_tokens,
            "bytes_up": self.bytes_up,
            "bytes_down": self.bytes_down,
            "wall_s": self.wall_s,
            "ttft_s": self.ttft_s,
            "new_tokens": self.new_tokens,
            "mean_block": float(np.mean(self.block_sizes)) if self.block_sizes else None,
            "mean_verify_s": float(np.mean(self.verify_s)) if self.verify_s else None,
            "edge": self.edge,
        }
        return {**counts, **derived(counts)}


@dataclass
class Answer:
    token_ids: list[int]
    stats: GenerationStats
    finish_reason: str  # "stop" (end of sequence) or "length"
    edge_only_spans: list[tuple[int, int]] = field(default_factory=list)  # draft-only token ranges


def finish(tokens: list[int], max_new: int, stop_ids: tuple[int, ...]) -> tuple[list[int], str | None]:
    """Cut generated tokens at the first stop token (kept) or at max_new; the reason, if finished."""
    for i, t in enumerate(tokens[:max_new]):
        if t in stop_ids:
            return tokens[: i + 1], "stop"
    if len(tokens) >= max_new:
        return tokens[:max_new], "length"
    return tokens, None


class AnswerState:
    """The committed prefix of one answer (prompt + committed output) and who watches it grow.

    Positions are absolute token indices: committed[prompt_len:] is the answer so far.
    """

    def __init__(self, prompt_ids: list[int], options: GenerateOptions, stats: GenerationStats,
                 meters: EdgeMeters, on_commit: CommitCallback | None = None, shared: int = 0):
        self.committed: list[int] = list(prompt_ids)
        self.prompt_len = len(prompt_ids)
        self.shared = min(shared, len(prompt_ids))  # ids[:shared] open many conversations (Prompt.shared)
        self.options = options
        self.stats = stats
        self.meters = meters
        self.on_commit = on_commit or (lambda new, speculative: None)
        self.done_reason: str | None = None
        self.t0 = time.perf_counter()
        self.edge_spans: list[tuple[int, int]] = []  # [start, end) of draft-only tokens

    @property
    def generated(self) -> int:
        return len(self.committed) - self.prompt_len

    def remaining(self) -> int:
        return self.options.max_new_tokens - self.generated

    def prompt_message(self, fill: bool = False) -> codec.Prompt:
        """The Prompt that (re)sets the cloud's context to this answer's committed prefix."""
        return codec.Prompt(ids=self.committed, max_new_tokens=self.remaining(), fill=fill, shared=self.shared)

    def commit(self, new: list[int], speculative: list[int] = (), edge_only: bool = False) -> None:
        """Append agreed tokens; tell the user; notice a stop token or the length limit."""
        if not new:
            return
        before = self.generated
        self.committed += new
        if edge_only:
            self.edge_spans.append((before, before + len(new)))
        if self.stats.ttft_s is None:
            self.stats.ttft_s = time.perf_counter() - self.t0
            self.meters.mark_first_token()
        generated, reason = finish(self.committed[self.prompt_len:], self.options.max_new_tokens,
                                   self.options.stop_ids)
        visible = generated[before:]
        self.meters.tokens_committed(len(visible))
        self.on_commit(visible, list(speculative))
        if reason:
            self.done_reason = reason

    def result(self) -> tuple[list[int], str]:
        generated, reason = finish(self.committed[self.prompt_len:], self.options.max_new_tokens,
                                   self.options.stop_ids)
        return generated, reason or "length"

    def merged_edge_spans(self, n: int) -> list[tuple[int, int]]:
        """Merged [start, end) ranges among the first n generated tokens that only the draft produced."""
        merged: list[tuple[int, int]] = []
        for a, b in self.edge_spans:
            if a >= n:
                break
            if merged and merged[-1][1] == a:
                merged[-1] = (merged[-1][0], min(b, n))
            else:
                merged.append((a, min(b, n)))
        return merged
