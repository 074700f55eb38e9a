"""Measure the verifier's T(k) curve over the protocol: the seconds of one verify pass of k tokens.

The edge cannot run the target, but a Verdict says how long its pass took (`verify_s`) and how many
tokens it fed (`fed`). So the probe opens the answer with a random context, sends greedy Drafts of
k random ids (almost surely rejected at once; the pass still feeds all k) and keeps the fastest of a
few passes per k. Used by `picospec bench` (before its runs, on an idle verifier) and by
`picospec doctor --cloud URL`.
"""
from __future__ import annotations

import numpy as np

import codec
from edge_app.link import CloudLink

KS = (1, 2, 4, 8, 16)


async def measure_verify_curve(link: CloudLink, vocab_size: int, ks: tuple[int, ...] = KS, context: int = 200,
                               repeats: int = 3, seed: int = 0) -> dict[int, float]:
    """{k: seconds} for a verify pass of k drafted tokens after a `context`-token prefix (the
    minimum over `repeats` passes). The session must be greedy (no distributions travel)."""
    rng = np.random.default_rng(seed)
    # ids from the lower middle of the vocabulary: ordinary tokens, none of the special ones at the end
    lo = min(100, vocab_size // 4)
    hi = max(lo + 1, vocab_size // 2)
    ids = rng.integers(lo, hi, size=context).tolist()
    budget = sum(ks) * repeats * 2 + 8
    await link.send(codec.Prompt(ids=ids, max_new_tokens=budget))
    prefilled = await _next(link, codec.Prefilled)
    epoch, committed = prefilled.epoch, prefilled.committed_len
    best: dict[int, float] = {}
    seq = 0
    for k in ks:
        for _ in range(repeats):
            seq += 1
            draft = rng.integers(lo, hi, size=k).tolist()
            await link.send(codec.Draft(epoch=epoch, pos=committed, ids=draft, wait=True, seq=seq))
            verdict = await _next(link, codec.Verdict)
            best[k] = min(best.get(k, float("inf")), verdict.verify_s)
            committed += verdict.accepted + (verdict.token is not None)
            epoch = verdict.new_epoch
    return best


async def _next(link: CloudLink, kind: type):
    """The next message of `kind` (filled tokens and the like in between are skipped)."""
    while True:
        msg = await link.recv()
        if isinstance(msg, kind):
            return msg
