"""The replay edge of `picospec load`: realistic draft blocks without a draft model.

Sixteen real drafters would not fit on the 2-core machines the load test runs on, and the verifier
is what is under test. So each session's drafter replays the target's own greedy answer (from a
cloud-only run), with a token replaced now and then, as a real draft would guess wrong: the
verifier sees blocks that are partly accepted, rejections, recoveries, rollbacks and stale
drafts, exactly as with a model. Whatever it proposes, greedy output must be the target's.

No torch here: this is the edge's side.
"""
from __future__ import annotations

import hashlib
import time
from typing import Callable

import numpy as np

from edge_app.client import EdgeClient
from edge_app.draft_model import TokenListDrafter
from edge_app.link import newest_epoch

MISS_BUCKETS = 10_000


class ReplayDrafter(TokenListDrafter):
    """The Drafter interface over a script. At position p it proposes reference[p - len(prompt)],
    or another token with probability miss_rate; the choice is a hash of (seed, p, previous
    token), so a run is reproducible and a retry at the same place guesses the same."""

    def __init__(self, prompt: list[int], reference: list[int], vocab_size: int, miss_rate: float = 0.2,
                 seed: int = 0, nap_at: int | None = None, nap_s: float = 0.0,
                 quiet: Callable[[], bool] = lambda: True):
        super().__init__()
        self.prompt_len = len(prompt)
        self.reference = list(reference)
        self.n_vocab = vocab_size
        self.miss_rate, self.seed = miss_rate, seed
        # the nap starts once nothing is in flight (`quiet`): a session whose drafts wait behind
        # other sessions' passes is busy, not idle, and the verifier rightly keeps it
        self.nap_at, self.nap_s, self.napped, self.quiet = nap_at, nap_s, False, quiet
        self._logits = np.zeros(vocab_size, dtype=np.float32)
        self._peak: int | None = None

    # -- the Drafter interface (bookkeeping from TokenListDrafter) --------------------------
    def feed(self, ids: list[int]) -> None:
        super().feed(ids)
        if self.nap_at is not None and not self.napped and self.length >= self.nap_at:
            self.napped = True  # the edge goes quiet mid-answer (a phone in a pocket)
            deadline = time.monotonic() + 600
            while not self.quiet() and time.monotonic() < deadline:
                time.sleep(0.02)
            time.sleep(self.nap_s)

    def logits(self) -> np.ndarray:
        """A one-hot score vector on the proposal (the pipeline takes its argmax when greedy)."""
        if self._peak is not None:
            self._logits[self._peak] = 0.0
        self._peak = self.propose(self.length, self._tokens[-1] if self._tokens else -1)
        self._logits[self._peak] = 1.0
        return self._logits

    def close(self) -> None:
        pass

    def detokenize(self, ids: list[int]) -> bytes:
        return " ".join(str(t) for t in ids).encode()

    # -- the script ------------------------------------------------------------------------
    def propose(self, pos: int, previous: int) -> int:
        j = pos - self.prompt_len
        right = self.reference[j] if 0 <= j < len(self.reference) else 0
        h = int.from_bytes(hashlib.blake2b(f"{self.seed}/{pos}/{previous}".encode(), digest_size=8).digest(), "big")
        if (h % MISS_BUCKETS) >= self.miss_rate * MISS_BUCKETS:
            return right
        return (right + 1 + (h >> 16) % (self.n_vocab - 1)) % self.n_vocab  # never the right one


class TimedClient(EdgeClient):
    """An EdgeClient that times each verdict: from its draft's send to its arrival (queueing
    behind other sessions' passes included: what an edge waits)."""

    def __init__(self, config, drafter, fingerprint: dict, stop_ids: tuple[int, ...]):
        super().__init__(config)
        self.drafter, self.fingerprint, self.stop_ids = drafter, fingerprint, stop_ids
        self.notices: list[str] = []
        self.on_notice = self.notices.append
        self.round_trips: list[float] = []
        self._sent: dict[int, float] = {}
        self._prefilling = False

    async def _session(self, options, fresh: bool = False, connect_timeout_s: float | None = None):
        link = await super()._session(options, fresh, connect_timeout_s)
        link.observer = self._observe
        self._sent.clear()  # a new session: its seq numbers are its own
        self._prefilling = False
        return link

    def quiet(self) -> bool:
        """Nothing of this session waits on the verifier: no prompt being prefilled, no draft
        waiting for its verdict (read from the drafter's thread)."""
        return not self._sent and not self._prefilling

    def _observe(self, direction: str, msg) -> None:
        now = time.perf_counter()
        kind = type(msg).__name__
        if kind in ("Prompt", "Prefilled"):
            self._prefilling = direction == "up"
        if direction == "up":
            if kind == "Draft":
                self._sent[msg.seq] = (now, msg.epoch, msg.pos + len(msg.ids))
            return
        if kind == "Verdict":
            sent = self._sent.pop(msg.seq, None)
            if sent is not None:
                self.round_trips.append(now - sent[0])
            for seq in [s for s in self._sent if s < msg.seq]:  # merged into this pass
                self._sent.pop(seq)
        # no verdict comes for drafts of an older epoch (stale), nor for one whose every id the
        # cloud committed itself (the Prefilled token, filled tokens)
        epoch = newest_epoch(msg)
        end = msg.committed_len if kind == "Prefilled" else msg.pos + len(msg.ids) if kind == "Tokens" else -1
        for seq in [s for s, (_, e, stop) in self._sent.items() if e < epoch or stop <= end]:
            self._sent.pop(seq)
