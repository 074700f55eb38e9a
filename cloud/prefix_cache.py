"""Keys and values of prompt openings that many conversations share, kept across sessions.

Every chat prompt a device sends opens with the same template header and system turn (24 ids for
the default Qwen template: ~0.9 s of a one-core prefill here, a fifth of a short prompt's first-token
time). The
edge says how long that opening is (Prompt.shared); the verifier keeps its keys and values after
the first prefill and copies them into the next session whose prompt starts the same way, so that
session prefills only the rest.

Exactness: row i's keys and values depend only on ids[:i + 1] (causal attention), and with the
row-streaming kernel (cloud/kernels.py) they come out bit for bit the same whether the rows were
computed in a prefill of a longer prompt, in chunks, or alone; a prompt prefilled after copied rows
gives bit for bit the logits of a fresh prefill (tests/test_prefix_cache.py checks the real model).
With torch's stock kernels (a GPU, bf16) the two agree to rounding, as a conversation's later turns
over its own cache do. A hit needs the stored ids to equal the prompt's: nothing is guessed.

Bounded: least recently used openings go first once the stored tensors pass `max_bytes`.
Scoped: on a verifier with access tokens, sessions of one token (one fleet) share openings with
each other only, so no tenant can tell from its own first-token time what another's prompts open with.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch

# [(keys, values)] per layer, each [1, kv_heads, positions, head_dim]
LayerKV = list[tuple[torch.Tensor, torch.Tensor]]


@dataclass
class Opening:
    scope: str
    ids: tuple[int, ...]
    kv: LayerKV
    nbytes: int

    @property
    def key(self) -> tuple[str, tuple[int, ...]]:
        return self.scope, self.ids


def kv_nbytes(kv: LayerKV) -> int:
    return sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in kv)


class PrefixStore:
    """Shared prompt openings -> their keys and values (LRU, bounded by bytes). One per model;
    used from the server's event loop only."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.nbytes = 0
        self._openings: OrderedDict[tuple[str, tuple[int, ...]], Opening] = OrderedDict()

    def __len__(self) -> int:
        return len(self._openings)

    def match(self, ids: list[int], limit: int, scope: str = "") -> tuple[int, Opening | None]:
        """The longest opening of `scope` that ids start with, as (positions usable, opening): at
        most `limit` positions (a prefill needs at least its last id fed); (0, None) when none."""
        # only whole openings: what the edge declared shared
        fits = [o for o in self._openings.values()
                if o.scope == scope and len(o.ids) <= limit and tuple(ids[:len(o.ids)]) == o.ids]
        if not fits:
            return 0, None
        found = max(fits, key=lambda o: len(o.ids))
        self._openings.move_to_end(found.key)
        return len(found.ids), found

    def holds(self, ids: list[int], scope: str = "") -> bool:
        return (scope, tuple(ids)) in self._openings

    def put(self, ids: list[int], kv: LayerKV, scope: str = "") -> bool:
        """Keep an opening (kv: its rows only, owned by the store); False if it cannot fit."""
        opening = Opening(scope, tuple(ids), kv, kv_nbytes(kv))
        if not ids or opening.key in self._openings or opening.nbytes > self.max_bytes:
            return False
        while self.nbytes + opening.nbytes > self.max_bytes:
            _, old = self._openings.popitem(last=False)
            self.nbytes -= old.nbytes
        self._openings[opening.key] = opening
        self.nbytes += opening.nbytes
        return True
