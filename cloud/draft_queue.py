"""Drafted blocks waiting for a verify pass: checked on arrival, merged when taken.

A Block is a Draft as the cloud keeps it. `pos` is the absolute position of ids[0], always, a
forced id included (the paper variant's recovered token, which the edge has already decided and
sends first). Blocks that arrive while a pass runs are merged into the next pass, up to
`max_block` drafted ids; a longer run is verified in pieces.
"""
from __future__ import annotations

import collections
from dataclasses import dataclass, replace

import codec
from cloud.errors import SessionError
from sampling import SparseDist


@dataclass
class Block:
    """Ids to verify in one pass.

    pos: absolute position of ids[0]; forced: how many leading ids are already decided (0 or 1),
    committed without a test; dists / q_scalar: [len(ids)] what each id was sampled from (exact
    variant) or q(id) (paper variant), forced ids included, or None (greedy).
    wait: the edge has stopped drafting (a block accepted whole earns a bonus token).
    """

    epoch: int
    pos: int
    ids: list[int]
    forced: int = 0
    dists: list[SparseDist] | None = None
    q_scalar: list[float] | None = None
    wait: bool = False
    seq: int = 0
    root: int | None = None  # a branch (codec.Draft.root): verified only if root is recovered at pos - 1

    @classmethod
    def from_draft(cls, msg: codec.Draft) -> "Block":
        return cls(msg.epoch, msg.pos, list(msg.ids), msg.forced,
                   list(msg.dists) if msg.dists is not None else None,
                   list(msg.q_scalar) if msg.q_scalar is not None else None, msg.wait, msg.seq, msg.root)

    @property
    def drafted(self) -> list[int]:
        """The ids the pass tests (the forced ones are not)."""
        return self.ids[self.forced:]

    @property
    def end(self) -> int:
        """The position after the block's last id."""
        return self.pos + len(self.ids)

    @property
    def entries(self) -> int:
        """Memory the block holds, in ids: its tokens and their distributions' supports."""
        return len(self.ids) + sum(len(d.ids) for d in self.dists or ())

    def slice(self, start: int, stop: int | None = None) -> "Block":
        """ids[start:stop] with their distributions, as a block of its own (forced ids kept only
        when start is 0)."""
        cut = lambda xs: xs[start:stop] if xs is not None else None  # noqa: E731
        return replace(self, pos=self.pos + start, ids=self.ids[start:stop],
                       forced=max(0, self.forced - start), dists=cut(self.dists), q_scalar=cut(self.q_scalar))

    def append(self, other: "Block") -> None:
        """Merge the next block (no forced ids) onto this one."""
        self.ids += other.ids
        if self.dists is not None and other.dists is not None:
            self.dists += other.dists
        if self.q_scalar is not None and other.q_scalar is not None:
            self.q_scalar += other.q_scalar
        self.wait, self.seq = other.wait, other.seq


def strip_committed(block: Block, committed: list[int]) -> Block | None:
    """The block without the ids at positions the cloud has committed itself (the Prefilled token,
    which an edge that sent its first block during the prefill drafted too; filled tokens), or None
    if it contradicts them (stale: drafted after something else)."""
    if block.pos >= len(committed) or block.forced:
        return block
    n = min(len(block.ids), len(committed) - block.pos)
    if block.ids[:n] != committed[block.pos:block.pos + n]:
        return None
    return block.slice(n)


class DraftQueue:
    """Blocks in arrival order, with the memory they hold bounded (`max_entries` ids and
    distribution entries: what a hostile edge could make a session hold beyond its KV cache)."""

    def __init__(self, max_entries: int):
        self.blocks: collections.deque[Block] = collections.deque()
        self.entries = 0
        self.max_entries = max_entries

    def __bool__(self) -> bool:
        return bool(self.blocks)

    def next_pos(self, committed_len: int) -> int:
        """Where the next block must start: after the committed prefix and every queued id."""
        return committed_len + sum(len(b.ids) for b in self.blocks)

    def push(self, block: Block, committed_len: int, max_context: int) -> None:
        """Queue a block that the variant has already checked; SessionError if it cannot be."""
        expected = self.next_pos(committed_len)
        if block.pos != expected:
            raise SessionError("bad_message", f"draft for position {block.pos}, expected {expected}")
        if not block.ids:
            raise SessionError("bad_message", "an empty draft")
        if block.end > max_context:
            raise SessionError("too_large", "the draft runs past the context limit")
        if self.entries + block.entries > self.max_entries:
            raise SessionError("overloaded", "too many drafted tokens waiting for verification")
        self.entries += block.entries
        self.blocks.append(block)

    def take(self, max_block: int) -> Block | None:
        """The next pass's block: queued blocks merged in order, at most max_block drafted ids
        (a block with a forced id only ever starts a pass)."""
        if not self.blocks:
            return None
        merged = self._pop().slice(0)
        while (self.blocks and not self.blocks[0].forced
               and len(merged.drafted) + len(self.blocks[0].ids) <= max_block):
            merged.append(self._pop())
        if len(merged.drafted) > max_block:  # verified in pieces: the tail goes back first
            cut = merged.forced + max_block
            tail, merged = merged.slice(cut), merged.slice(0, cut)
            merged.wait = False
            self.blocks.appendleft(tail)
            self.entries += tail.entries
        return merged

    def clear(self) -> None:
        self.blocks.clear()
        self.entries = 0

    def _pop(self) -> Block:
        block = self.blocks.popleft()
        self.entries -= block.entries
        return block
