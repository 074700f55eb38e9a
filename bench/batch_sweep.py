"""Capacity of the batched verifier without a server: N sessions' verify passes per scheduler round,
on a randomly initialised target (issue 12, item 5: "64 sessions >= 20x the throughput of one").

    taskset -c 0 python -m bench.batch_sweep --preset tiny --device cpu           # CPU, seconds
    taskset -c 0 python -m bench.batch_sweep --preset 1.5b --layers 2 --sessions 1,4,16
    python3 -m bench.batch_sweep --preset 7b --device cuda                        # a GPU machine

What travels to a GPU machine: the repository only (no weights, no tokenizer; the target is built
from a config and random weights, whose values do not change the timings). Its image has torch,
transformers, numpy and msgpack; `zstandard` (imported by codec/) must travel as a wheel, see
"On a GPU machine" at the end of this docstring.

The target: a Qwen2 of the preset's geometry (PRESETS: tiny, 1.5b = Qwen2.5 1.5B, 7b = Qwen2.5 7B;
--layers N keeps N decoder layers), built on --device in --dtype (auto: bfloat16 on CUDA, float32
on the CPU, where it gets the server's row-streaming kernel as TargetEngine.load does).

Per session count N in --sessions:
  1. N sessions (cloud/session.VerifySession, greedy, each on its own fork of the engine: its own
     KV cache) hold a random prompt of --context ids, prefilled before any timing, and the
     Prefilled token committed (not fed yet: the state after every correction);
  2. a round: every session submits one verify work item, exactly as the server's work loop does
     (cloud/work_loop.verify_queued: Work("verify", pass_feed, decide_pass)), of --block random
     drafted ids, so each feeds block + 1 ids (the unfed committed id first). The real
     cloud/scheduler.Scheduler pulls them, oldest first, up to --tokens-per-tick fed ids a tick (the
     server's batch_max_tokens, 256), and runs each tick as one batched forward pass
     (cloud/batch_forward.py; a tick of one item is the engine's own pass), then the greedy rule
     (decide_pass) per session. N x (block + 1) ids above the budget split into several ticks:
     with the defaults, 28 sessions a tick, so 64 sessions take 3 ticks a round;
  3. apply_pass commits each verdict (random drafts are rejected at their first id: the target's
     argmax is recovered), then the session is put back to its state after the prompt (committed
     ids and cache cropped back), so every round feeds the same ids at the same positions;
  4. one warm-up round, then --passes timed rounds (torch.cuda.synchronize before the clock stops
     on CUDA). A round is the verdict round trip every session sees when all N keep the verifier
     busy (the link excluded); the table gives its median.

Reported per N: ticks a round, rows a tick (fed ids per tick: each is a logit row), ms a tick
(round / ticks), ticks/s, rows/s together (N x (block + 1) per round) and its multiple of N = 1
(the throughput goal), the round trip and its multiple of N = 1. JSON: --json (default bench/results/batch_sweep_<device>_<preset>
[_<layers>l].json); a PNG beside it when matplotlib is importable.

On a GPU machine (the device tool: `run` copies the working tree; nothing can be fetched there):
    here, once:  echo /.whl/ >> .git/info/exclude
                 python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \\
                   --implementation cp --platform manylinux_2_17_x86_64 -d .whl zstandard==0.25.0
    run, carry [".whl"]:
                 python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl \\
                   && export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 \\
                   && python3 -m bench.batch_sweep --preset 7b --device cuda --json $OUT/batch_sweep_cuda_7b.json
    (timeout_s ~420: the 7B target, ~15 GB in bfloat16, is initialised on the GPU; the JSON and the
    PNG come back from $OUT; copy the JSON to bench/results/ to commit it)
"""
from __future__ import annotations

import argparse
import asyncio
import functools
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from bench.pass_cost import start_session, synchronize
from bench.verify_curve import QWEN25_15B, load_average, random_target
from cloud.draft_queue import Block
from cloud.engine import DTYPES, TargetEngine, auto_dtype
from cloud.rule_impl import resolve_rule
from cloud.scheduler import Scheduler, Work, batchable
from cloud.server import ServerConfig
from cloud.session import VerifySession
from cloud.verify import apply_pass, decide_pass, pass_feed
from sampling import SamplingParams

SERVER_TOKENS_PER_TICK = ServerConfig.batch_max_tokens  # the server's fed-id budget per tick

# Qwen2 geometries; timings do not depend on the weights' values
PRESETS = {
    "tiny": {"vocab_size": 1024, "hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 4,
             "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 4096,
             "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "tie_word_embeddings": False},
    "1.5b": QWEN25_15B,
    "7b": {"vocab_size": 152064, "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
           "num_attention_heads": 28, "num_key_value_heads": 4, "max_position_embeddings": 32768,
           "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "tie_word_embeddings": False},
}


def open_sessions(engine: TargetEngine, count: int, context: int, seed: int = 0) -> list[VerifySession]:
    """`count` greedy sessions, each with its own cache holding a random `context`-id prompt."""
    g = torch.Generator().manual_seed(seed)
    impl = resolve_rule("auto", engine.device)  # as the server's default --rule auto
    return [start_session(engine, SamplingParams(), impl,
                          torch.randint(0, engine.vocab_size, (context,), generator=g).tolist())
            for _ in range(count)]


class TickLog:
    """Stands in for cloud/metrics.Metrics: the scheduler reports each tick's sessions and fed ids."""

    def __init__(self) -> None:
        self.ticks: list[tuple[int, int]] = []  # (sessions, fed ids) per tick
        self._sessions = 0

    def histogram(self, name: str, value: float, bounds) -> None:
        if name == "picospec_batch_sessions":
            self._sessions = int(value)
        elif name == "picospec_batch_tokens":
            self.ticks.append((self._sessions, int(value)))


def random_blocks(sessions: list[VerifySession], block: int, vocab: int, g: torch.Generator) -> list[Block]:
    """One block of `block` random drafted ids per session, at the session's next position."""
    return [Block(s.epoch, len(s.committed), torch.randint(0, vocab, (block,), generator=g).tolist())
            for s in sessions]


async def verify_round(scheduler: Scheduler, sessions: list[VerifySession], blocks: list[Block],
                       device: str) -> tuple[float, int]:
    """Every session's verify pass through the scheduler, as the work loop submits it; returns the
    seconds until the last verdict is decided, and the drafted ids accepted. Then each verdict is
    applied and the session put back to its state after the prompt (untimed)."""
    works = [Work("verify", s, pass_feed(s, b), functools.partial(decide_pass, s, b))
             for s, b in zip(sessions, blocks)]
    t0 = time.perf_counter()
    results = await asyncio.gather(*(scheduler.submit(w) for w in works))
    synchronize(device)
    seconds = time.perf_counter() - t0
    for s, b, r in zip(sessions, blocks, results):
        prompt_state = len(s.committed)
        apply_pass(s, b, r)
        del s.committed[prompt_state:]
        s.engine.rollback(prompt_state - 1)
        s.pending_row = None
    return seconds, sum(r.accepted for r in results)


async def sweep_one(sessions: list[VerifySession], block: int, passes: int, tokens_per_tick: int,
                    device: str, seed: int) -> dict:
    """Warm-up round, then `passes` timed rounds of every session's verify pass."""
    log = TickLog()
    scheduler = Scheduler(batch=True, max_tokens=tokens_per_tick, metrics=log)
    g = torch.Generator().manual_seed(seed)
    vocab = sessions[0].engine.vocab_size
    rounds, accepted = [], 0
    try:
        for r in range(passes + 1):
            seconds, acc = await verify_round(scheduler, sessions, random_blocks(sessions, block, vocab, g), device)
            if r == 0:
                log.ticks.clear()  # the warm-up's ticks are not counted
            else:
                rounds.append(seconds)
                accepted += acc
    finally:
        scheduler.close()
    return {"round_s": rounds, "ticks": log.ticks, "accepted": accepted}


def summarise(n: int, block: int, run: dict) -> dict:
    """One row of the table: rounds -> rates."""
    round_s = statistics.median(run["round_s"])
    ticks = len(run["ticks"]) / len(run["round_s"])
    rows = sum(t[1] for t in run["ticks"]) / len(run["round_s"])  # fed ids per round
    return {"sessions": n, "fed_per_session": block + 1, "ticks_per_round": ticks,
            "rows_per_tick": rows / ticks, "sessions_per_tick": n / ticks,
            "round_s": round_s, "round_s_min": min(run["round_s"]), "round_s_all": run["round_s"],
            "tick_s": round_s / ticks, "ticks_per_s": ticks / round_s,
            "rows_per_s": rows / round_s, "rows_per_s_per_session": rows / round_s / n,
            "tick_sizes": sorted(set(run["ticks"])),
            "accepted_per_pass": run["accepted"] / (n * len(run["round_s"]))}  # random drafts: ~0


def add_multiples(rows: list[dict]) -> None:
    """Rows/s and round trip as multiples of N = 1 (when N = 1 was swept)."""
    one = next((r for r in rows if r["sessions"] == 1), None)
    for r in rows:
        r["rows_per_s_x1"] = r["rows_per_s"] / one["rows_per_s"] if one else None
        r["round_s_x1"] = r["round_s"] / one["round_s"] if one else None


def sweep(args) -> dict:
    device = args.device
    dtype = args.dtype if args.dtype != "auto" else auto_dtype(device)
    t0 = time.perf_counter()
    engine = random_target(0, args.layers, device, DTYPES[dtype], config=PRESETS[args.preset], fast_linear=None)
    layers = engine.model.config.num_hidden_layers
    counts = sorted({int(n) for n in args.sessions.split(",")})
    sessions = open_sessions(engine, max(counts), args.context)
    synchronize(device)
    batched = batchable(Work("verify", sessions[0], [0], lambda rows: rows))
    print(f"target: random {args.preset}, {layers} layers, vocab {engine.vocab_size}, {device} {dtype}, "
          f"{engine.kernels}; batched pass: {'yes' if batched else 'NO (every item runs alone)'}; "
          f"{max(counts)} sessions of {args.context} ids ready in {time.perf_counter() - t0:.1f} s; "
          f"load average {load_average()}", flush=True)
    rows = []
    for n in counts:
        run = asyncio.run(sweep_one(sessions[:n], args.block, args.passes, args.tokens_per_tick, device, seed=n))
        rows.append(summarise(n, args.block, run))
        print(f"  {n} sessions: round {rows[-1]['round_s'] * 1e3:.1f} ms, {rows[-1]['ticks_per_round']:.0f} tick(s)",
              flush=True)
    add_multiples(rows)
    return {"preset": args.preset, "layers": layers, "device": device, "dtype": dtype, "kernels": engine.kernels,
            "batched": batched, "vocab": engine.vocab_size, "hidden": engine.model.config.hidden_size,
            "context": args.context, "block": args.block, "passes": args.passes,
            "tokens_per_tick": args.tokens_per_tick, "threads": torch.get_num_threads(),
            "gpu": torch.cuda.get_device_name() if device.startswith("cuda") else None,
            "load_average": load_average(), "torch": torch.__version__, "sweeps": rows}


def multiple(v: float | None) -> str:
    return f"{v:6.2f}" if v is not None else f"{'-':>6}"


def table(r: dict) -> str:
    head = (f"\n{r['preset']} ({r['layers']} layers, hidden {r['hidden']}), {r['device']} {r['dtype']}, "
            f"context {r['context']}, block {r['block']} drafted (+1 unfed = {r['block'] + 1} rows a session), "
            f"{r['tokens_per_tick']} ids a tick; median of {r['passes']} rounds")
    columns = (f"{'sessions':>8} {'ticks/rd':>8} {'rows/tick':>9} {'tick ms':>8} {'ticks/s':>8} {'rows/s':>9} "
               f"{'x N=1':>6} {'round ms':>9} {'x N=1':>6}")
    lines = [head, columns]
    for s in r["sweeps"]:
        lines.append(f"{s['sessions']:>8} {s['ticks_per_round']:>8.0f} {s['rows_per_tick']:>9.1f} "
                     f"{s['tick_s'] * 1e3:>8.1f} {s['ticks_per_s']:>8.1f} {s['rows_per_s']:>9.0f} "
                     f"{multiple(s['rows_per_s_x1'])} {s['round_s'] * 1e3:>9.1f} {multiple(s['round_s_x1'])}")
    goal = next((s for s in r["sweeps"] if s["sessions"] == 64), None)
    if goal and goal["rows_per_s_x1"] is not None:
        lines.append(f"goal, 64 sessions >= 20x the throughput of one: {goal['rows_per_s_x1']:.1f}x "
                     f"({'met' if goal['rows_per_s_x1'] >= 20 else 'not met'})")
    return "\n".join(lines)


def save_plot(r: dict, path: Path) -> bool:
    """Rows/s and round trip against sessions (matplotlib, headless); False when it is missing."""
    try:
        import matplotlib
    except ImportError:
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = [s["sessions"] for s in r["sweeps"]]
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.5))
    a.plot(n, [s["rows_per_s"] for s in r["sweeps"]], "o-", label="together")
    a.plot(n, [s["rows_per_s_per_session"] for s in r["sweeps"]], "s--", label="per session")
    a.set(xscale="log", yscale="log", xlabel="sessions", ylabel="verified rows/s", title="throughput")
    a.legend()
    b.plot(n, [s["round_s"] * 1e3 for s in r["sweeps"]], "o-")
    b.set(xscale="log", xlabel="sessions", ylabel="ms", title="verdict round trip (no link)")
    fig.suptitle(f"batch_sweep: random {r['preset']} ({r['layers']} layers) on {r['gpu'] or r['device']} "
                 f"{r['dtype']}, block {r['block']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.batch_sweep", description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    ap.add_argument("--layers", type=int, default=None, help="decoder layers kept (default: the preset's)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    ap.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                    help="default auto: as the server chooses (bfloat16 on CUDA)")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    ap.add_argument("--sessions", default="1,4,16,64", help="session counts, comma-separated")
    ap.add_argument("--context", type=int, default=256, help="prompt ids in each session's cache")
    ap.add_argument("--block", type=int, default=8, help="drafted ids per verify pass (fed: block + 1)")
    ap.add_argument("--passes", type=int, default=5, help="timed rounds per session count, after 1 warm-up")
    ap.add_argument("--tokens-per-tick", type=int, default=SERVER_TOKENS_PER_TICK,
                    help="the scheduler's fed-id budget per tick (the server's batch_max_tokens)")
    ap.add_argument("--json", default=None, help="default bench/results/batch_sweep_<device>_<preset>.json")
    ap.add_argument("--no-plot", action="store_true")
    args = ap.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here")
    torch.set_num_threads(args.threads)
    result = sweep(args)
    print(table(result))
    depth = f"_{args.layers}l" if args.layers else ""
    path = Path(args.json or f"bench/results/batch_sweep_{args.device.replace(':', '')}_{args.preset}{depth}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"saved {path}")
    if not args.no_plot and save_plot(result, path.with_suffix(".png")):
        print(f"saved {path.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
