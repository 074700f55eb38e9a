"""What the verifier spends around its forward passes: a verify pass, greedy and sampled (the rule
in numpy on the host and in torch on the target's device), a cloud-only decode step and a prompt
prefill, each against the bare forward pass it wraps.

    taskset -c 0 python -m bench.pass_cost --layers 4          # CPU, a shallow model
    taskset -c 0 python -m bench.pass_cost                     # CPU, the full 28-layer geometry
    python -m bench.pass_cost --device cuda --dtype bfloat16   # a GPU

The model is randomly initialised with the default target's geometry (bench.verify_curve.
random_target; --layers N keeps the first N layers): timings do not depend on the weights, except
the sampling math, which depends on how peaked the rows are, so the output layer is scaled
(--logit-scale, default 6: tens to a few hundred tokens in a T 0.8, top-p 0.95 nucleus, as a
language model's rows often have; 1 leaves the random init's nearly flat rows, ~100k tokens in the
nucleus, the worst case for top-p). The table prints the nucleus of one row.

Each step is what the server runs (cloud/verify.py, cloud/session.py, cloud/scheduler.Work):
  forward(k)      the engine's forward pass of k ids after a --context-token cache, all rows
  verify greedy   verify_pass over [last committed id] + k - 1 drafted ids (the state after a
                  correction), the edge waiting: accept while argmax, then a bonus token
  verify sampled  the same with sampled params; drafts are sampled from q = the target's own p,
                  quantised, so nearly every block is accepted whole and its bonus drawn: every
                  row goes through the rule (the most work the rule can do)
  forward(1)      one id, the bare pass a decode step wraps
  decode step     Work("decode") (forward, last row only, kept pending) + commit_next_token
  prefill         engine.prefill of --prefill ids (the output layer on the last row only)
The steps take turns repeat by repeat and a cell is the minimum over --repeats (the machine may be
shared; --clock cpu counts the thread's CPU time only). On CUDA every timed call ends with
torch.cuda.synchronize(). Results go to bench/results/pass_cost_<device>_<layers>l.json.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from bench.verify_curve import load_average, random_target
from cloud.draft_queue import Block
from cloud.engine import DTYPES, TargetEngine, auto_dtype
from cloud.rule_impl import host_row, resolve_rule
from cloud.scheduler import Work
from cloud.session import VerifySession
from cloud.verify import verify_pass
from sampling import SamplingParams, draft_dist, sample_sparse, target_probs


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device: str, clock) -> float:
    synchronize(device)
    t0 = clock()
    fn()
    synchronize(device)
    return clock() - t0


def start_session(engine: TargetEngine, params: SamplingParams, impl: str, prompt: list[int]) -> VerifySession:
    """A session after a prompt: the cache holds the prompt, the Prefilled token is committed and
    not fed yet (the state after every correction too)."""
    s = VerifySession(engine.fork(), params, rule_impl=impl, max_context=len(prompt) + 4096)
    rest = s.begin_prompt(prompt, 4096)
    s.end_prompt(prompt, 4096, s.engine.prefill(rest))
    return s


def drafted_block(s: VerifySession, n: int, rng: np.random.Generator) -> Block:
    """n drafted ids the target itself would write (greedy: its argmax; sampled: drawn from q, its
    own p quantised), with their q, the edge waiting; the session's cache is left as it was."""
    ids, dists, row = [], [], None
    feed = s.committed[-1:]
    for _ in range(n):
        row = s.engine.forward(feed)[-1]
        if s.params.greedy:
            ids.append(int(torch.argmax(row)))
        else:
            q = draft_dist(host_row(row).astype(np.float64), s.params)
            ids.append(sample_sparse(q, rng))
            dists.append(q)
        feed = ids[-1:]
    s.engine.rollback(len(s.committed) - 1)
    return Block(s.epoch, len(s.committed), ids, dists=dists or None, wait=True)


def measure(args) -> dict:
    device = args.device
    dtype = args.dtype if args.dtype != "auto" else auto_dtype(device)
    t0 = time.perf_counter()
    # as TargetEngine.load: the server's CPU kernel
    engine = random_target(seed=0, layers=args.layers, device=device, dtype=DTYPES[dtype], fast_linear=None)
    with torch.no_grad():
        engine.model.lm_head.weight.mul_(args.logit_scale)
    kernels = engine.kernels
    layers = engine.model.config.num_hidden_layers
    print(f"target: random init, {layers} layers, vocab {engine.vocab_size}, {device} {dtype}, {kernels}; "
          f"built in {time.perf_counter() - t0:.1f} s; {torch.get_num_threads()} thread(s), "
          f"load average {load_average()}", flush=True)

    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, engine.vocab_size, (args.context,), generator=g).tolist()
    greedy = SamplingParams()
    sampled = SamplingParams(args.temperature, args.top_p, args.top_k, seed=1)
    rng = np.random.default_rng(0)
    k, R = args.k, args.repeats
    clock = time.thread_time if args.clock == "cpu" else time.perf_counter
    steps: dict[str, tuple] = {}  # name -> (run, undo): undo puts the state back, untimed
    info: dict = {}

    def back_to_prompt(s: VerifySession):
        return lambda: s.engine.rollback(len(s.committed) - 1)

    # 1. the bare forward passes, from the same state as the steps that wrap them
    bare = start_session(engine, greedy, "numpy", prompt)
    ids = bare.committed[-1:] + torch.randint(0, engine.vocab_size, (k - 1,), generator=g).tolist()
    steps["forward_k"] = (lambda: bare.engine.forward(ids), back_to_prompt(bare))
    steps["forward_1"] = (lambda: bare.engine.forward(ids[:1]), back_to_prompt(bare))

    # 2. verify passes: greedy, then sampled with each rule implementation
    accepted: dict[str, list[int]] = {}
    for name, params, impl in (("verify_greedy", greedy, "numpy"), ("verify_sampled_numpy", sampled, "numpy"),
                               ("verify_sampled_torch", sampled, "torch")):
        s = start_session(engine, params, impl, prompt)
        block = drafted_block(s, k - 1, rng)
        accepted[name] = []
        steps[name] = (lambda s=s, block=block, name=name: accepted[name].append(verify_pass(s, block).accepted),
                       back_to_prompt(s))

    # 3. cloud-only decode steps, as the work loop runs them
    def decode_step(s: VerifySession):
        def run():
            Work("decode", s, s.next_token_feed(), s.keep_row).run()
            s.commit_next_token()

        def undo():
            s.committed.pop()
            s.engine.rollback(len(s.committed) - 1)
        return run, undo

    for name, params, impl in (("decode_greedy", greedy, "numpy"), ("decode_sampled_numpy", sampled, "numpy"),
                               ("decode_sampled_torch", sampled, "torch")):
        steps[name] = decode_step(start_session(engine, params, impl, prompt))

    # the steps take turns, repeat by repeat, so that all see the same machine; the first round
    # warms up and is not counted
    t = {name: float("inf") for name in steps}
    for r in range(R + 1):
        for name, (run, undo) in steps.items():
            sec = timed(run, device, clock)
            undo()
            if r:
                t[name] = min(t[name], sec)
        if r:
            print(f"  repeat {r}/{R}: " + ", ".join(f"{n} {v * 1e3:.1f}" for n, v in t.items())
                  + f" ms (load {load_average()})", flush=True)
    for name, acc in accepted.items():
        info[name] = {"mean_accepted": float(np.mean(acc)), "drafted": k - 1}

    # the sampled rows' shape: how many tokens the nucleus keeps
    row = start_session(engine, sampled, "numpy", prompt).engine.forward(prompt[-1:])[-1]
    info["nucleus_tokens"] = int(np.count_nonzero(target_probs(host_row(row).astype(np.float64), sampled)))

    # 4. a prompt's prefill (the output layer on its last row only)
    p_ids = torch.randint(0, engine.vocab_size, (args.prefill,), generator=g).tolist()
    probe = engine.fork()
    t["prefill"] = float("inf")
    for _ in range(max(1, args.prefill_repeats)):
        t["prefill"] = min(t["prefill"], timed(lambda: probe.prefill(p_ids), device, clock))
        probe.reset()
    print(f"  prefill({args.prefill}) {t['prefill'] * 1e3:.0f} ms", flush=True)

    default_impl = resolve_rule("auto", device)
    ratios = {
        "verify_greedy/forward_k": t["verify_greedy"] / t["forward_k"],
        "verify_sampled_numpy/verify_greedy": t["verify_sampled_numpy"] / t["verify_greedy"],
        "verify_sampled_torch/verify_greedy": t["verify_sampled_torch"] / t["verify_greedy"],
        "decode_greedy/forward_1": t["decode_greedy"] / t["forward_1"],
        "decode_sampled_numpy/forward_1": t["decode_sampled_numpy"] / t["forward_1"],
        "decode_sampled_torch/forward_1": t["decode_sampled_torch"] / t["forward_1"],
    }
    return {"device": device, "dtype": dtype, "layers": layers, "vocab": engine.vocab_size, "kernels": kernels,
            "threads": torch.get_num_threads(), "k": k, "context": args.context, "prefill_tokens": args.prefill,
            "repeats": R, "clock": args.clock, "logit_scale": args.logit_scale,
            "sampling": {"temperature": args.temperature, "top_p": args.top_p, "top_k": args.top_k},
            "default_rule": default_impl, "seconds": t, "ratios": ratios, "info": info,
            "load_average": load_average(), "torch": torch.__version__}


def print_table(r: dict) -> None:
    t, ratio = r["seconds"], r["ratios"]
    k = r["k"]
    rows = [
        (f"forward({k}), bare", t["forward_k"], ""),
        ("verify, greedy", t["verify_greedy"], f"{ratio['verify_greedy/forward_k']:.2f} x forward({k})"),
        ("verify, sampled, numpy rule", t["verify_sampled_numpy"],
         f"{ratio['verify_sampled_numpy/verify_greedy']:.2f} x greedy"),
        ("verify, sampled, torch rule", t["verify_sampled_torch"],
         f"{ratio['verify_sampled_torch/verify_greedy']:.2f} x greedy"),
        ("forward(1), bare", t["forward_1"], ""),
        ("decode step, greedy", t["decode_greedy"], f"{ratio['decode_greedy/forward_1']:.2f} x forward(1)"),
        ("decode step, sampled, numpy", t["decode_sampled_numpy"],
         f"{ratio['decode_sampled_numpy/forward_1']:.2f} x forward(1)"),
        ("decode step, sampled, torch", t["decode_sampled_torch"],
         f"{ratio['decode_sampled_torch/forward_1']:.2f} x forward(1)"),
        (f"prefill({r['prefill_tokens']}), last row only", t["prefill"],
         f"{t['prefill'] / r['prefill_tokens'] * 1e3:.2f} ms/token"),
    ]
    s = r["sampling"]
    print(f"\n{r['layers']} layers, {r['device']} {r['dtype']}, {r['threads']} thread(s), context {r['context']}, "
          f"sampled = T {s['temperature']} top-p {s['top_p']} top-k {s['top_k']} "
          f"(nucleus {r['info']['nucleus_tokens']} tokens); min of {r['repeats']} ({r['clock']} clock); default rule here: "
          f"{r['default_rule']}; load average {r['load_average']}")
    print(f"{'step':<34} {'ms':>9}  ratio")
    for name, sec, note in rows:
        print(f"{name:<34} {sec * 1e3:9.2f}  {note}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.pass_cost", description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=None, help="decoder layers kept (default: all, 28)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    ap.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                    help="default auto: as the server chooses (bfloat16 on CUDA)")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    ap.add_argument("--k", type=int, default=8, help="ids fed per verify pass: 1 unfed + k-1 drafted (default 8)")
    ap.add_argument("--context", type=int, default=200, help="tokens in the cache before each pass")
    ap.add_argument("--prefill", type=int, default=512, help="prompt tokens of the prefill measured")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--prefill-repeats", type=int, default=2)
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                    help="cpu: the calling thread's CPU time (steadier on a shared machine; CPU, one thread)")
    ap.add_argument("--temperature", type=float, default=0.8)
    ap.add_argument("--top-p", type=float, default=0.95)
    ap.add_argument("--top-k", type=int, default=0)
    ap.add_argument("--logit-scale", type=float, default=6.0, help="output layer scale (see above)")
    ap.add_argument("--json", default=None, help="default bench/results/pass_cost_<device>_<layers>l.json")
    args = ap.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here")
    torch.set_num_threads(args.threads)
    result = measure(args)
    print_table(result)
    path = Path(args.json or f"bench/results/pass_cost_{args.device.replace(':', '')}_{result['layers']}l.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"saved {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
