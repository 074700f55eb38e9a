"""How far the paper's separate rejection sampling (scalar q up, top-K p down) drifts from the
target distribution, computed exactly from the real models' distributions (no sampling noise).

At one position, with target distribution p and draft distribution q (the quantised one the edge
really samples from), the committed token's distribution is
    exact variant:  q(x) min(1, p(x)/q(x)) + P(reject) * norm(max(0, p - q))(x)  =  p(x)
    paper variant:  q(x) min(1, p(x)/q(x)) + P(reject) * norm(max(0, topK(p) - q))(x)
so the drift is TV(paper, p), averaged over positions along real generations.

    python -m bench.drift --prompts humaneval,mt-bench --limit 3 --positions 24 --json drift.json
"""
from __future__ import annotations

import argparse
import json
import sys

import numpy as np

from sampling import SamplingParams, SparseDist, draft_dist, target_probs, top_k_sparse


def committed_distribution(p: np.ndarray, q: SparseDist, recover: np.ndarray) -> np.ndarray:
    """P(committed token = x) when x ~ q is accepted w.p. min(1, p/q), else drawn from `recover`.

    p, recover: float64[V]; returns float64[V].
    """
    qd = q.dense(len(p))
    accepted = np.minimum(qd, p)  # q(x) * min(1, p(x)/q(x))
    return accepted + (1.0 - accepted.sum()) * recover


def paper_recover(p: np.ndarray, q: SparseDist, k: int) -> np.ndarray:
    """The paper's recovery distribution: norm(max(0, p_topK - q)) on the top-K support."""
    ids, probs = top_k_sparse(p, k)
    r = np.zeros_like(p)
    r[ids] = np.maximum(probs - q.dense(len(p))[ids], 0.0)
    if r.sum() <= 0:
        r[ids[np.argmax(probs)]] = 1.0
    return r / r.sum()


def exact_recover(p: np.ndarray, q: SparseDist) -> np.ndarray:
    r = np.maximum(p - q.dense(len(p)), 0.0)
    return r / r.sum() if r.sum() > 0 else p


def drift_at(p: np.ndarray, q: SparseDist, ks: list[int]) -> dict:
    """TV from p of the committed distribution: exact (should be ~0) and paper at each K."""
    out = {"exact": 0.5 * float(np.abs(committed_distribution(p, q, exact_recover(p, q)) - p).sum())}
    for k in ks:
        out[f"paper_k{k}"] = 0.5 * float(np.abs(committed_distribution(p, q, paper_recover(p, q, k)) - p).sum())
    out["reject_prob"] = 1.0 - float(np.minimum(q.dense(len(p)), p).sum())
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", default="humaneval,mt-bench")
    ap.add_argument("--limit", type=int, default=3)
    ap.add_argument("--positions", type=int, default=24, help="positions measured per prompt")
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--top-p", type=float, default=0.95)
    ap.add_argument("--ks", default="1,4,16,64")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    from bench.prompt_sets import load_prompts
    from cloud.engine import EngineConfig, TargetEngine
    from edge_app.client import EdgeClient, EdgeConfig
    from edge_app.drafter import Drafter, DrafterConfig
    from models.resolve import ensure_ready, resolve_draft, resolve_target

    params = SamplingParams(args.temperature, args.top_p).validate()
    ks = [int(k) for k in args.ks.split(",")]
    draft_path = ensure_ready(resolve_draft(None))
    spec = resolve_target(None)
    engine = TargetEngine.load(type(spec)(**{**spec.__dict__, "path": ensure_ready(spec)}),
                               EngineConfig(dtype=args.dtype))
    drafter = Drafter(DrafterConfig(str(draft_path)))
    client = EdgeClient(EdgeConfig())
    client.drafter = drafter
    client.chat_template = drafter.metadata().get("tokenizer.chat_template")
    rng = np.random.default_rng(0)
    rows = []
    for prompt in load_prompts(args.prompts, args.limit):
        ids = client.encode_prompt(prompt.text)
        engine.reset()
        p_logits = engine.prefill(ids)
        drafter.prefill(ids)
        for _ in range(args.positions):
            p = target_probs(p_logits.double().cpu().numpy(), params)
            q = draft_dist(drafter.logits(), params)
            rows.append(drift_at(p, q, ks))
            token = int(rng.choice(len(p), p=p))  # continue along a target-distributed text
            p_logits = engine.forward([token])[-1]
            drafter.feed([token])
    summary = {key: float(np.mean([r[key] for r in rows])) for key in rows[0]}
    print(f"{len(rows)} positions, temperature {args.temperature}, top-p {args.top_p}")
    print(f"{'variant':<12} {'mean TV from target':>20}")
    for key, value in summary.items():
        print(f"{key:<12} {value:>20.5f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"summary": summary, "positions": len(rows), "params": vars(args)}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
