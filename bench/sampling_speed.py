"""Milliseconds per row of the sampling math on a 151,936-token vocabulary: the implementation
before the fast rows (kept as the reference in tests/test_sampling.py) against today's.

    python -m bench.sampling_speed [--repeats 15] [--rows 4] [--nucleus-rows 12] [--torch]

--torch adds the cloud's batched rule (sampling.torch_rule.verify_blocks, CPU, float32 logits as
the target gives them) for one block of 8 drafted tokens (9 rows) against the greedy argmax.

Each cell is the minimum over `repeats` timed calls per row, averaged over `rows` rows (the
minimum because other jobs share the CPU: it is the least disturbed measurement). Row shapes:
  confident  a language-model-like row: Gaussian bulk (std 2.5) and a few tokens far above it;
  spread     the same with the head only a little above the bulk (nucleus of hundreds of tokens);
  flat       a plain Gaussian row (std 2.5): a nucleus of tens of thousands of tokens.

A second table is the large-nucleus case on its own (top-p without top-k on spread and flat
rows, temperatures and top_p that keep 10k-90k tokens), today's implementation only (the
reference takes ~20 ms a row there): per row the minimum over `repeats` calls, then the median
(p50) and the maximum over `nucleus-rows` rows. Every row is checked bit for bit against the
reference first. --nucleus-rows 0 skips it.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

from sampling import SamplingParams, draft_dist, target_probs

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from tests.test_sampling import _reference_draft_dist, _reference_target_probs  # noqa: E402

VOCAB = 151_936
SETTINGS = [
    SamplingParams(temperature=0.7, top_p=0.9),
    SamplingParams(temperature=0.8, top_p=0.95),
    SamplingParams(temperature=1.0, top_p=0.9, top_k=50),
    SamplingParams(temperature=1.0, top_p=0.95, top_k=0),
    SamplingParams(temperature=1.0, top_p=1.0, top_k=40),
    SamplingParams(temperature=1.0, top_p=1.0),
]
NUCLEUS_SETTINGS = [
    SamplingParams(temperature=0.8, top_p=0.95),
    SamplingParams(temperature=1.0, top_p=0.9),
    SamplingParams(temperature=1.0, top_p=0.95),
    SamplingParams(temperature=1.0, top_p=0.99),
    SamplingParams(temperature=1.5, top_p=0.95),
]


def make_row(shape: str, rng: np.random.Generator) -> np.ndarray:
    x = rng.normal(size=VOCAB) * 2.5
    if shape != "flat":
        top = rng.choice(VOCAB, size=20, replace=False)
        x[top] += (16.0 if shape == "confident" else 7.0) * rng.random(20)
    return x.astype(np.float32)  # llama.cpp hands the edge float32 logits


def ms_per_row(fn, rows, params, repeats: int) -> float:
    return float(np.mean(ms_each_row(fn, rows, params, repeats)))


def ms_each_row(fn, rows, params, repeats: int) -> np.ndarray:
    """Per row, the least of `repeats` timed calls, in ms."""
    best = np.full(len(rows), np.inf)
    for i, row in enumerate(rows):
        for _ in range(repeats):
            start = time.perf_counter()
            fn(row, params)
            best[i] = min(best[i], time.perf_counter() - start)
    return 1e3 * best


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--rows", type=int, default=4)
    ap.add_argument("--nucleus-rows", type=int, default=12,
                    help="rows per setting of the large-nucleus table (0 skips it)")
    ap.add_argument("--torch", action="store_true", help="also time the torch rule (needs torch)")
    args = ap.parse_args(argv)
    if args.torch:
        torch_rule_cost(args.repeats)
    rng = np.random.default_rng(0)
    print(f"vocabulary {VOCAB}, min of {args.repeats} calls, mean over {args.rows} rows, ms/row")
    print(f"{'row':10} {'T':>4} {'top_p':>5} {'top_k':>5} {'kept':>6} "
          f"{'draft_dist ref':>14} {'new':>6} {'target_probs ref':>16} {'new':>6}")
    for shape in ("confident", "spread", "flat"):
        rows = [make_row(shape, rng) for _ in range(args.rows)]
        for params in SETTINGS:
            for row in rows:  # the fast rows are the reference's, bit for bit
                assert draft_dist(row, params) == _reference_draft_dist(row, params)
            kept = np.mean([np.count_nonzero(target_probs(r, params)) for r in rows])
            cells = [ms_per_row(fn, rows, params, args.repeats) for fn in
                     (_reference_draft_dist, draft_dist, _reference_target_probs, target_probs)]
            print(f"{shape:10} {params.temperature:4.1f} {params.top_p:5.2f} {params.top_k:5d} "
                  f"{kept:6.0f} {cells[0]:14.2f} {cells[1]:6.2f} {cells[2]:16.2f} {cells[3]:6.2f}")
    if args.nucleus_rows > 0:
        large_nucleus_cost(args.nucleus_rows, args.repeats, rng)
    return 0


def large_nucleus_cost(n_rows: int, repeats: int, rng: np.random.Generator) -> None:
    print(f"\nlarge nucleus: top-p only, min of {repeats} calls per row, p50 / max over {n_rows} "
          f"rows, ms/row")
    print(f"{'row':10} {'T':>4} {'top_p':>5} {'kept p50':>8} {'max':>6} "
          f"{'draft_dist p50':>14} {'max':>6} {'target_probs p50':>16} {'max':>6}")
    for shape in ("spread", "flat"):
        rows = [make_row(shape, rng) for _ in range(n_rows)]
        for params in NUCLEUS_SETTINGS:
            for row in rows:
                assert draft_dist(row, params) == _reference_draft_dist(row, params)
                assert np.array_equal(target_probs(row, params), _reference_target_probs(row, params))
            kept = [np.count_nonzero(target_probs(r, params)) for r in rows]
            q = ms_each_row(draft_dist, rows, params, repeats)
            p = ms_each_row(target_probs, rows, params, repeats)
            print(f"{shape:10} {params.temperature:4.1f} {params.top_p:5.2f} {np.median(kept):8.0f} "
                  f"{max(kept):6d} {np.median(q):14.2f} {q.max():6.2f} {np.median(p):16.2f} "
                  f"{p.max():6.2f}")


def torch_rule_cost(repeats: int) -> None:
    import torch

    from sampling.torch_rule import pack_sparse, verify_blocks

    rng = np.random.default_rng(1)
    k = 8
    print(f"torch rule, CPU, {torch.get_num_threads()} threads, one block of {k} (rows of {VOCAB}), "
          f"min of {repeats}, ms per pass")
    logits = torch.from_numpy(np.stack([make_row("confident", rng) for _ in range(k + 1)]))[None]
    for params in SETTINGS[:3] + [SamplingParams(temperature=0.0)]:
        dists = [[draft_dist(logits[0, j].numpy() + rng.normal(size=VOCAB).astype(np.float32),
                             params) for j in range(k)]]
        drafted = torch.tensor([[int(d.ids[np.argmax(d.weights)]) for d in dists[0]]])
        q_ids, q_weights = pack_sparse(dists, k)
        lengths = torch.tensor([k])

        def rule():
            u = torch.rand(1, k + 1, dtype=torch.float64)
            return verify_blocks(logits, drafted, lengths, q_ids, q_weights, [params], u)

        def argmax():
            return logits.argmax(-1).tolist()

        cost = [min(_timed(f) for _ in range(repeats)) for f in (rule, argmax)]
        print(f"  T {params.temperature:3.1f} top_p {params.top_p:4.2f} top_k {params.top_k:3d}: "
              f"rule {cost[0]:7.2f}   greedy argmax {cost[1]:6.2f}")


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return 1e3 * (time.perf_counter() - start)


if __name__ == "__main__":
    sys.exit(main())
