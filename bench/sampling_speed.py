"""Milliseconds per row of the sampling math on a 151,936-token vocabulary: the implementation
before the fast rows (kept as the reference in tests/test_sampling.py) against today's.

    python -m bench.sampling_speed [--repeats 15] [--rows 4] [--torch]

--torch adds the cloud's batched rule (sampling.torch_rule.verify_blocks, CPU, float32 logits as
the target gives them) for one block of 8 drafted tokens (9 rows) against the greedy argmax.

Each cell is the minimum over `repeats` timed calls per row, averaged over `rows` rows (the
minimum because other jobs share the CPU: it is the least disturbed measurement). Row shapes:
  confident  a language-model-like row: Gaussian bulk (std 2.5) and a few tokens far above it;
  spread     the same with the head only a little above the bulk (nucleus of hundreds of tokens);
  flat       a plain Gaussian row (std 2.5): a nucleus of tens of thousands of tokens.
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


def make_row(shape: str, rng: np.random.Generator) -> np.ndarray:
    x = rng.normal(size=VOCAB) * 2.5
    if shape != "flat":
        top = rng.choice(VOCAB, size=20, replace=False)
        x[top] += (16.0 if shape == "confident" else 7.0) * rng.random(20)
    return x.astype(np.float32)  # llama.cpp hands the edge float32 logits


def ms_per_row(fn, rows, params, repeats: int) -> float:
    total = 0.0
    for row in rows:
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            fn(row, params)
            best = min(best, time.perf_counter() - start)
        total += best
    return 1e3 * total / len(rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--rows", type=int, default=4)
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
    return 0


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
