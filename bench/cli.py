"""`picospec bench`: cloud-only, sync, pipeline, edge-only and co-located assisted generation on the
same prompts, over an emulated link swept across RTTs; a table, --json and --plot.

Both sides run on this machine, on separate cores, with a user-space proxy between them that adds
half the RTT each way (this kernel has no netem). Greedy decoding by default, so every
target-quality mode must produce cloud-only's exact tokens: the benchmark checks that too.
--temperature samples instead (the speed of the modes as a sampling user sees it; answers are
then draws from the target's distribution and are not compared token by token).
"""
from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

from edge_app.args import add_edge_arguments


def _floats(text: str) -> list[float]:
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if not values or any(v < 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected one or more numbers >= 0, got {text!r}")
    return values


def _modes(text: str) -> list[str]:
    from bench.runner import ALL_MODES

    modes = [m.strip() for m in text.split(",") if m.strip()]
    bad = [m for m in modes if m not in ALL_MODES]
    if bad or not modes:
        raise argparse.ArgumentTypeError(f"unknown mode(s) {', '.join(bad) or text!r}; choose from {', '.join(ALL_MODES)}")
    return modes


def register(sub) -> None:
    from edge_app.energy import add_power_arguments

    p = sub.add_parser("bench", help="benchmark the modes on prompt sets over an emulated link",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("workload")
    g.add_argument("--prompts", default="humaneval,gsm8k,mt-bench",
                   help="comma-separated: humaneval, gsm8k, mt-bench, or JSONL files with rows that have "
                        "\"prompt\", \"turns\" (first used) or \"question\" (default: all three sets)")
    g.add_argument("--limit", type=int, default=4, help="prompts per set, the first N (default 4)")
    g.add_argument("--max-new-tokens", type=int, default=64, help="per answer (default 64)")
    g.add_argument("--modes", type=_modes, default=["edge", "cloud", "sync", "pipeline", "auto", "hf-assisted"],
                   help="comma-separated from edge, cloud, sync, pipeline, auto, branch (pipeline with branch "
                        "pre-drafting), uncut (pipeline with full blocks only), hf-assisted (default: all but "
                        "branch and uncut)")
    g.add_argument("--no-shared-openings", action="store_true",
                   help="the local verifier keeps no chat openings: every answer prefills its whole prompt "
                        "(default: the template header and system turn come from its store, as in a fleet)")
    g.add_argument("--block", type=int, default=None,
                   help="fixed drafted tokens per block (default adaptive; hf-assisted: num_assistant_tokens)")
    g.add_argument("--temperature", type=float, default=0.0,
                   help="0 = greedy (default, answers checked against cloud-only's); above 0 every answer "
                        "samples (not with hf-assisted)")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus of a sampled run (default 1.0)")
    g.add_argument("--seed", type=int, default=0, help="seed of every sampled answer (default 0)")
    g = p.add_argument_group("emulated link")
    g.add_argument("--rtt-ms", type=_floats, default=[20.0, 100.0, 400.0],
                   help="one or more, comma-separated (default 20,100,400)")
    g.add_argument("--up-kbps", type=float, default=None, help="edge -> cloud bandwidth (default unlimited)")
    g.add_argument("--down-kbps", type=float, default=None, help="cloud -> edge bandwidth (default unlimited)")
    g.add_argument("--jitter-ms", type=float, default=0.0, help="uniform +- per chunk, each way")
    g.add_argument("--loss", type=float, default=0.0, help="probability that a packet pays a TCP retransmission timeout")
    g = p.add_argument_group("output")
    g.add_argument("--json", dest="json_out", type=Path, default=None, help="write the results as JSON here")
    g.add_argument("--plot", type=Path, default=None, help="write a PNG here (speedup vs RTT, per-token latency)")
    add_power_arguments(p)
    add_edge_arguments(p)
    p.set_defaults(func=run)


def _progress_bar(total: int):
    """A tqdm bar on stderr (a plain line per step where tqdm is missing)."""
    try:
        from tqdm import tqdm
    except ImportError:
        tqdm = None
    if tqdm is not None:
        bar = tqdm(total=total, file=sys.stderr, unit="answer", dynamic_ncols=True)

        def step(label: str, answer: bool = True) -> None:
            if not answer:
                bar.write(label, file=sys.stderr)
                return
            bar.set_description(label)
            bar.update(1)
        return step, bar.close
    return (lambda label, answer=True: print(f"[bench] {label}", file=sys.stderr, flush=True)), (lambda: None)


def machine_info() -> dict:
    import os

    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "python": platform.python_version(), "cpus": os.cpu_count(),
            "loadavg_1min_at_start": os.getloadavg()[0] if hasattr(os, "getloadavg") else None}


def busy_machine_note(machine: dict) -> str | None:
    """Other work on the cores skews every timing: say so rather than let it pass for a result."""
    load, cpus = machine.get("loadavg_1min_at_start"), machine.get("cpus") or 1
    if load is not None and load > 0.5 * cpus:
        return (f"WARNING: the machine was busy when the benchmark started (load average {load:.1f} on "
                f"{cpus} CPUs): timings include other processes' work")
    return None


def sampling_params(args):
    """The run's SamplingParams (None: greedy); ValueError for bad numbers or a sampled hf-assisted
    run (its subprocess generates greedily)."""
    from sampling import SamplingParams

    params = SamplingParams(args.temperature, args.top_p, 0, args.seed).validate()
    if params.greedy:
        return None
    if "hf-assisted" in args.modes:
        raise ValueError("hf-assisted runs greedy only: leave it out of --modes to sample")
    return params


def sampling_label(params) -> str:
    return f"temperature {params.temperature:g}, top-p {params.top_p:g}, seed {params.seed}"


def decoding_label(params) -> str:
    return "greedy" if params is None else f"sampled: {sampling_label(params)}"


def run(args) -> int:
    from bench import report
    from bench.prompt_sets import PromptError, load_prompts
    from bench.runner import LINK_MODES, BenchConfig, run_benchmark
    from edge_app.energy import figures_from_args

    try:
        prompts = load_prompts(args.prompts, args.limit)
        figures = figures_from_args(args)
        params = sampling_params(args)
    except (PromptError, ValueError) as err:
        print(f"picospec bench: {err}", file=sys.stderr)
        return 2
    cfg = BenchConfig(prompts=prompts, modes=args.modes, rtts_ms=args.rtt_ms, max_new_tokens=args.max_new_tokens,
                      block=args.block, up_kbps=args.up_kbps, down_kbps=args.down_kbps, jitter_ms=args.jitter_ms,
                      loss=args.loss, draft=args.draft, target=args.target, token=args.token, dtype=args.dtype,
                      threads=args.threads, pin=not args.no_pin, cloud=args.cloud,
                      figures=figures, shared_openings=not args.no_shared_openings, params=params)
    link_runs = len([m for m in args.modes if m in LINK_MODES]) * len(args.rtt_ms)
    total = len(prompts) * (link_runs + ("edge" in args.modes) + ("hf-assisted" in args.modes))
    machine = machine_info()
    step, close = _progress_bar(total)
    t0 = time.perf_counter()
    try:
        result = run_benchmark(cfg, step)
    except Exception as err:  # a model that does not load, a verifier that does not start
        close()
        print(f"picospec bench: {type(err).__name__}: {err}", file=sys.stderr)
        return 3
    finally:
        close()
    setup = {**result.setup, "models": {"draft": result.setup.get("draft"),
                                           "target": result.setup.get("target") or args.target or "default"},
             "dtype": args.dtype, "max_new_tokens": args.max_new_tokens, "rtt_ms": args.rtt_ms,
             "modes": args.modes, "block": args.block, "prompts": [p.label for p in prompts],
             "prompt_sets": args.prompts, "limit": args.limit, "decoding": decoding_label(params),
             "link": {"up_kbps": args.up_kbps, "down_kbps": args.down_kbps, "jitter_ms": args.jitter_ms,
                      "loss": args.loss, "one_way_delay": "rtt/2 each way (user-space proxy)"},
             "machine": machine, "bench_wall_s": time.perf_counter() - t0, "errors": result.errors,
             "workdir": str(cfg.workdir)}
    rows, mismatches = report.build_rows(result.records, result.run_info, args.rtt_ms, args.modes,
                                         greedy=params is None)
    breakeven = report.break_even(result.records, result.run_info, rows)
    categories = report.category_rows(result.records, args.rtt_ms, args.modes)
    print(setup.get("cores", ""))
    print(report.format_verify_curve(result.setup.get("verify_curve_s") or {}))
    print(report.format_table(rows))
    sampled = None if params is None else sampling_label(params)
    for line in report.table_notes(rows, mismatches, breakeven, sampled):
        print("  " + line)
    print("\nper prompt category (Spec-Bench: tokens per verify pass, mean of per-prompt speedups):")
    print(report.format_category_table(categories))
    if busy_machine_note(machine):
        print("  " + busy_machine_note(machine))
    for err in result.errors:
        print(f"  ERROR {err['mode']}@{err['rtt_ms']} {err['prompt']}: {err['error']}")
    if args.json_out:
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        doc = report.build_json(rows, setup, breakeven, mismatches, result.records, result.run_info, categories)
        args.json_out.write_text(report.dumps(doc))
        print(f"  wrote {args.json_out}")
    if args.plot:
        from bench.plot import plot

        title = (f"PicoSpec bench: {len(prompts)} prompt(s) ({args.prompts}), {args.max_new_tokens} new tokens, "
                 f"{decoding_label(params)}, {args.dtype}; {setup.get('cores', '')}")
        print(f"  wrote {plot(rows, result.records, args.plot, title)}")
    return 1 if result.errors and not result.records else 0
