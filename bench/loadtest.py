"""`picospec load`: concurrent edge sessions against one verifier, on this machine.

The command sweeps session counts (`--sessions 1,4,16,64`, `run_sweep`): the target's own greedy
answer for each prompt once (cloud mode), then for each count N all N sessions at once; every answer
must equal its solo run, which for greedy decoding is the target's own answer (the N = 1 sweep is the
solo run itself). Per sweep: throughput together, per-session tokens/s, verdict round trip p50/p99,
and the verifier's own sessions and tokens per forward pass (its /metrics histograms). A table on
stdout, the report as JSON and a plot. Then the idle phase below, once.

`run_load` (one N, used by the tiny test) has four phases over the same prompts (one per session):
  1. reference   each prompt alone in cloud mode: the target's own greedy answer
  2. solo        each session alone, pipeline mode, with a replay edge (bench/replay.py)
  3. concurrent  all sessions at once
  4. idle        a few sessions at once nap mid-answer past the verifier's idle timeout, are
                 evicted, and resume (reconnect, re-send the committed prefix)
Every answer of phases 3 and 4 must equal its solo one. Reported: per-session verdict round trips
(p50/p99), throughput, the verifier's resident memory before and after (from its /metrics),
evictions and reconnects.

Loopback only and bounded: the verifier is started here (or given as a 127.0.0.1 URL), at most
MAX_SESSIONS sessions.
"""
from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace
from urllib.parse import urlparse

import aiohttp
import numpy as np

from sampling import common_prefix_len

MAX_SESSIONS = 64
SWEEP = (1, 4, 16, 64)
LOOPBACK = ("127.0.0.1", "localhost", "::1")
EDGE_NOTE = ("replay edge: each session proposes the target's own greedy tokens (from a cloud-only "
             "run), each replaced with probability {miss:g} by a hash of (position, previous token); "
             "no draft model runs")


@dataclass(frozen=True)
class LoadConfig:
    sessions: int = 16
    max_new_tokens: int = 32
    miss_rate: float = 0.2
    idle_sessions: int = 2  # sessions that nap past the idle timeout mid-answer (concurrent phase)
    idle_timeout_s: float = 3.0  # the verifier's --idle-timeout (naps last 2x this + 0.5 s)
    seed: int = 0
    reply_timeout_s: float = 300.0  # 16 sessions on 2 cores: a verdict can wait behind many passes
    distinct_prompts: int = 0  # sweep: session i answers prompt i % this (0: one prompt per session)


def percentiles(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p99": None}
    return {"p50": float(np.percentile(values, 50)), "p99": float(np.percentile(values, 99))}


def http_base(ws_url: str) -> str:
    u = urlparse(ws_url)
    return f"{'https' if u.scheme == 'wss' else 'http'}://{u.netloc}"


async def fetch(url: str, as_json: bool = False):
    async with aiohttp.ClientSession() as http:
        async with http.get(url) as r:
            return await (r.json() if as_json else r.text())


def parse_metrics(text: str) -> dict[str, float]:
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


async def reference(url: str, fingerprint: dict, prompt: list[int], n: int) -> list[int]:
    """The target alone (cloud mode: Prompt + Generate), greedy."""
    import codec
    from edge_app.link import CloudLink

    link = CloudLink(url, reply_timeout_s=600)
    await link.connect(codec.Hello(fingerprint=fingerprint, sampling={
        "temperature": 0.0, "top_p": 1.0, "top_k": 0, "seed": None}, client="picospec-load"))
    try:
        await link.send(codec.Prompt(ids=prompt, max_new_tokens=n))
        await link.send(codec.Generate(max_new_tokens=n))
        out: list[int] = []
        while True:
            msg = await link.recv()
            if isinstance(msg, codec.Prefilled) and msg.token is not None:
                out.append(msg.token)  # the answer's first token comes with the prefill
            elif isinstance(msg, codec.Tokens):
                out += msg.ids
                if msg.done:
                    return out
    finally:
        await link.close()


async def one_session(url: str, fingerprint: dict, prompt: list[int], ref: list[int], cfg: LoadConfig,
                      index: int, nap: bool) -> dict:
    from bench.replay import ReplayDrafter, TimedClient
    from edge_app.client import EdgeConfig
    from edge_app.pipeline import GenerateOptions

    stops = (fingerprint["eos_id"],) if fingerprint.get("eos_id") is not None else ()
    drafter = ReplayDrafter(prompt, ref, fingerprint["vocab_size"], cfg.miss_rate, seed=cfg.seed * 1000 + index,
                            nap_at=len(prompt) + 1 if nap else None,  # after its first token
                            nap_s=2 * cfg.idle_timeout_s + 0.5)
    client = TimedClient(EdgeConfig(cloud=url, reply_timeout_s=cfg.reply_timeout_s, reconnect_s=60,
                                    edge_fallback=False), drafter, fingerprint, stops)
    drafter.quiet = client.quiet
    options = GenerateOptions(max_new_tokens=cfg.max_new_tokens, stop_ids=stops, mode="pipeline")
    if nap and hasattr(options, "fill"):
        # a napping edge must find its session gone: no bubble filling to finish its answer meanwhile
        options = replace(options, fill=False)
    t0 = time.perf_counter()
    try:
        ans = await client.generate_ids(prompt, options)
    finally:
        await client.close()
    s = ans.stats
    return {"tokens": ans.token_ids, "wall_s": time.perf_counter() - t0, "round_trips": client.round_trips,
            "reconnects": s.reconnects, "accepted": s.accepted, "drafted": s.drafted, "rounds": s.rounds,
            "napped": drafter.napped}


async def run_load(url: str, prompts: list[list[int]], cfg: LoadConfig, log=print) -> dict:
    """The three phases against the verifier at url (ws://127.0.0.1:PORT/ws); the report."""
    loop = asyncio.get_running_loop()
    # the pipeline runs drafter steps on the default executor; a napping session holds a thread
    loop.set_default_executor(ThreadPoolExecutor(max_workers=cfg.sessions + 8, thread_name_prefix="edge"))
    base = http_base(url)
    health = await fetch(f"{base}/healthz", as_json=True)
    fp = health["fingerprint"]
    prompts = [prompts[i % len(prompts)] for i in range(cfg.sessions)]
    before = parse_metrics(await fetch(f"{base}/metrics"))

    t0 = time.perf_counter()
    refs = [await reference(url, fp, p, cfg.max_new_tokens) for p in prompts]
    log(f"reference: {len(refs)} cloud-only answers in {time.perf_counter() - t0:.1f} s")
    t0 = time.perf_counter()
    solo = [await one_session(url, fp, p, r, cfg, i, nap=False) for i, (p, r) in enumerate(zip(prompts, refs))]
    solo_wall = time.perf_counter() - t0
    log(f"solo: {len(solo)} sessions one after another in {solo_wall:.1f} s")
    mid = parse_metrics(await fetch(f"{base}/metrics"))

    t0 = time.perf_counter()
    conc = await asyncio.gather(*[one_session(url, fp, p, r, cfg, i, nap=False)
                                  for i, (p, r) in enumerate(zip(prompts, refs))])
    wall = time.perf_counter() - t0
    log(f"concurrent: {len(conc)} sessions at once in {wall:.1f} s")
    await asyncio.sleep(0.5)  # let the verifier close the sessions and free their caches
    after = parse_metrics(await fetch(f"{base}/metrics"))

    # 4. idle: a few sessions at once nap past the idle timeout mid-answer, are evicted, resume
    r = report(cfg, refs, solo, conc, wall, solo_wall, before, mid, after, health)
    r["idle"] = await idle_phase(url, fp, prompts, [s["tokens"] for s in solo], cfg, after, log)
    return r


async def idle_phase(url: str, fp: dict, prompts: list[list[int]], expected: list[list[int]], cfg: LoadConfig,
                     after: dict, log=print) -> dict:
    """A few sessions at once nap past the idle timeout mid-answer, are evicted, and resume; each
    answer must equal expected[i]."""
    t0 = time.perf_counter()
    idle = await asyncio.gather(*[one_session(url, fp, prompts[i], expected[i], cfg, i, nap=True)
                                  for i in range(cfg.idle_sessions)])
    log(f"idle: {len(idle)} sessions napping {2 * cfg.idle_timeout_s + 0.5:g} s mid-answer, "
        f"done in {time.perf_counter() - t0:.1f} s")
    await asyncio.sleep(0.5)
    end = parse_metrics(await fetch(f"{http_base(url)}/metrics"))
    return {"sessions": len(idle), "identical_to_solo": all(c["tokens"] == expected[i]
                                                            for i, c in enumerate(idle)),
            "napped": sum(c["napped"] for c in idle), "reconnects": sum(c["reconnects"] for c in idle),
            "evicted": end.get("picospec_evictions_total", 0) - after.get("picospec_evictions_total", 0),
            "kv_cache_tokens_after": end.get("picospec_kv_cache_tokens"),
            "rss_mib_after": end.get("picospec_process_resident_bytes", 0) / 2**20}


def first_difference(a: list[int], b: list[int]) -> int | None:
    """The first position where two answers differ (one ending early counts), None if equal."""
    return None if a == b else common_prefix_len(a, b)


def histogram_mean(before: dict, after: dict, name: str) -> float | None:
    """Mean of a /metrics histogram's observations between two scrapes."""
    n = after.get(f"{name}_count", 0) - before.get(f"{name}_count", 0)
    return (after.get(f"{name}_sum", 0) - before.get(f"{name}_sum", 0)) / n if n else None


async def run_sweep(url: str, prompts: list[list[int]], counts: list[int], cfg: LoadConfig, log=print) -> dict:
    """For each N in counts, N sessions at once (session i answers prompts[i % len(prompts)]); every
    answer checked against the target's own greedy answer, which a solo session must equal. Then
    the idle phase (cfg.idle_sessions) once. The report: one entry per N, plus "idle"."""
    loop = asyncio.get_running_loop()
    top = max(counts)
    loop.set_default_executor(ThreadPoolExecutor(max_workers=top + 8, thread_name_prefix="edge"))
    base = http_base(url)
    health = await fetch(f"{base}/healthz", as_json=True)
    fp = health["fingerprint"]
    distinct = list(dict.fromkeys(tuple(p) for p in prompts))[:cfg.distinct_prompts or top]
    t0 = time.perf_counter()
    refs = {p: await reference(url, fp, list(p), cfg.max_new_tokens) for p in distinct}
    log(f"reference: {len(refs)} cloud-only answers in {time.perf_counter() - t0:.1f} s")
    chosen = [list(distinct[i % len(distinct)]) for i in range(top)]
    expected = [refs[tuple(p)] for p in chosen]
    sweeps = []
    for n in counts:
        before = parse_metrics(await fetch(f"{base}/metrics"))
        t0 = time.perf_counter()
        runs = await asyncio.gather(*[one_session(url, fp, chosen[i], expected[i], cfg, i, nap=False)
                                      for i in range(n)])
        wall = time.perf_counter() - t0
        await asyncio.sleep(0.3)
        after = parse_metrics(await fetch(f"{base}/metrics"))
        diffs = [first_difference(r["tokens"], expected[i]) for i, r in enumerate(runs)]
        tokens = sum(len(r["tokens"]) for r in runs)
        trips = [t for r in runs for t in r["round_trips"]]
        sweeps.append({
            "sessions": n, "wall_s": wall, "new_tokens": tokens,
            "throughput_tok_s": tokens / wall if wall > 0 else None,
            "per_session_tok_s": float(np.mean([len(r["tokens"]) / r["wall_s"] for r in runs])),
            "round_trip_s": percentiles(trips), "round_trips": len(trips),
            "identical_to_solo": all(d is None for d in diffs),
            "differences": [{"session": i, "position": d} for i, d in enumerate(diffs) if d is not None],
            "sessions_per_pass": histogram_mean(before, after, "picospec_batch_sessions"),
            "tokens_per_pass": histogram_mean(before, after, "picospec_batch_tokens"),
            "forward_passes": after.get("picospec_batch_sessions_count", 0) - before.get("picospec_batch_sessions_count", 0),
            "reconnects": sum(r["reconnects"] for r in runs),
        })
        s = sweeps[-1]
        log(f"{n} sessions: {s['throughput_tok_s']:.2f} tok/s together in {wall:.1f} s, "
            f"identical to solo: {s['identical_to_solo']}")
    solo = sweeps[0]
    for s in sweeps:
        s["x_throughput"] = (s["throughput_tok_s"] / solo["throughput_tok_s"]) if solo["throughput_tok_s"] else None
        p99, p99_solo = s["round_trip_s"]["p99"], solo["round_trip_s"]["p99"]
        s["x_p99"] = p99 / p99_solo if p99 and p99_solo else None
    after = parse_metrics(await fetch(f"{base}/metrics"))
    idle = await idle_phase(url, fp, chosen, expected, cfg, after, log) if cfg.idle_sessions else None
    return {"edge": EDGE_NOTE.format(miss=cfg.miss_rate), "config": {**asdict(cfg), "sessions": counts},
            "model": health.get("model"), "device": health.get("device"), "sweeps": sweeps, "idle": idle,
            "identical_to_solo": all(s["identical_to_solo"] for s in sweeps)}


def sweep_table(r: dict) -> str:
    ms = lambda v: "-" if v is None else f"{1000 * v:.0f}"  # noqa: E731
    x = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
    lines = [f"edge: {r['edge']}", f"verifier: {r['model']} on {r['device']}; "
             f"{r['config']['max_new_tokens']} new tokens per session; baseline: the 1st row",
             "",
             "sessions  tok/s together  x base  tok/s/session  rt p50 ms  rt p99 ms  p99 x base  "
             "sessions/pass  tokens/pass  identical"]
    for s in r["sweeps"]:
        lines.append(f"{s['sessions']:>8}  {s['throughput_tok_s']:>14.2f}  {x(s['x_throughput']):>6}  "
                     f"{s['per_session_tok_s']:>13.2f}  {ms(s['round_trip_s']['p50']):>9}  "
                     f"{ms(s['round_trip_s']['p99']):>9}  {x(s['x_p99']):>10}  {x(s['sessions_per_pass']):>13}  "
                     f"{x(s['tokens_per_pass']):>11}  {str(s['identical_to_solo']):>9}")
    if r.get("idle"):
        i = r["idle"]
        lines.append(f"idle sessions: {i['napped']} napped past the idle timeout, {i['evicted']:.0f} evicted, "
                     f"{i['reconnects']} reconnected and resumed; identical to solo: {i['identical_to_solo']}")
    return "\n".join(lines)


def save_plot(r: dict, path: str) -> None:
    """Throughput and verdict round trip p99 against sessions (matplotlib, headless)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = [s["sessions"] for s in r["sweeps"]]
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.5))
    a.plot(n, [s["throughput_tok_s"] for s in r["sweeps"]], "o-", label="together")
    a.plot(n, [s["per_session_tok_s"] for s in r["sweeps"]], "s--", label="per session")
    a.set(xscale="log", xlabel="sessions", ylabel="tokens/s", title="throughput")
    a.legend()
    b.plot(n, [1000 * (s["round_trip_s"]["p50"] or 0) for s in r["sweeps"]], "o-", label="p50")
    b.plot(n, [1000 * (s["round_trip_s"]["p99"] or 0) for s in r["sweeps"]], "s-", label="p99")
    b.set(xscale="log", xlabel="sessions", ylabel="ms", title="verdict round trip")
    b.legend()
    fig.suptitle(f"picospec load: {r['model']} on {r['device']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def report(cfg, refs, solo, conc, wall, solo_wall, before, mid, after, health) -> dict:
    rss = "picospec_process_resident_bytes"
    new_tokens = sum(len(c["tokens"]) for c in conc)
    all_trips = [t for c in conc for t in c["round_trips"]]
    grown = after.get(rss, 0) - mid.get(rss, 0)
    return {
        "edge": EDGE_NOTE.format(miss=cfg.miss_rate),
        "config": asdict(cfg),
        "model": health.get("model"),
        "device": health.get("device"),
        "identical_to_solo": all(c["tokens"] == s["tokens"] for c, s in zip(conc, solo)),
        "solo_equal_to_target_alone": sum(s["tokens"] == r[:len(s["tokens"])] for s, r in zip(solo, refs)),
        "sessions": [{"index": i, "new_tokens": len(c["tokens"]), "wall_s": c["wall_s"], "rounds": c["rounds"],
                      "accepted": c["accepted"], "reconnects": c["reconnects"],
                      "same_as_solo": c["tokens"] == s["tokens"], **percentiles(c["round_trips"])}
                     for i, (c, s) in enumerate(zip(conc, solo))],
        "round_trip_s": percentiles(all_trips),
        "throughput_tok_s": new_tokens / wall if wall > 0 else None,
        "solo_throughput_tok_s": sum(len(s["tokens"]) for s in solo) / solo_wall if solo_wall > 0 else None,
        "new_tokens": new_tokens,
        "wall_s": wall,
        "server_verify_s": {"p50": after.get('picospec_verify_seconds{quantile="0.5"}'),
                            "p99": after.get('picospec_verify_seconds{quantile="0.99"}')},
        "server_wait_s": {"p50": after.get('picospec_verify_wait_seconds{quantile="0.5"}'),
                          "p99": after.get('picospec_verify_wait_seconds{quantile="0.99"}')},
        # "before" is before any session: a memory-mapped target is not paged in yet; compare
        # after_solo (every weight touched) with after (16 sessions more)
        "rss_mib": {"before": before.get(rss, 0) / 2**20, "after_solo": mid.get(rss, 0) / 2**20,
                    "after": after.get(rss, 0) / 2**20,
                    "peak": after.get("picospec_process_peak_resident_bytes", 0) / 2**20},
        # the concurrent phase may not leave memory behind: its sessions' caches are freed
        "rss_bounded": grown < 256 * 2**20,
        "kv_cache_tokens_after": after.get("picospec_kv_cache_tokens"),
        "reconnects": sum(c["reconnects"] for c in conc),
        "verify_passes": after.get("picospec_verify_passes_total", 0) - mid.get("picospec_verify_passes_total", 0),
    }


def summary(r: dict) -> str:
    ms = lambda v: "-" if v is None else f"{1000 * v:.0f}"  # noqa: E731
    lines = [f"edge: {r['edge']}",
             f"verifier: {r['model']} on {r['device']}",
             f"{r['config']['sessions']} sessions x {r['config']['max_new_tokens']} new tokens: "
             f"identical to solo runs: {r['identical_to_solo']}; solo equal to the target alone: "
             f"{r['solo_equal_to_target_alone']}/{r['config']['sessions']}",
             f"throughput {r['throughput_tok_s']:.1f} tok/s concurrent ({r['new_tokens']} tokens in "
             f"{r['wall_s']:.1f} s) vs {r['solo_throughput_tok_s']:.1f} tok/s one session at a time",
             f"verdict round trip (edge): p50 {ms(r['round_trip_s']['p50'])} ms, p99 {ms(r['round_trip_s']['p99'])} ms; "
             f"server pass p50 {ms(r['server_verify_s']['p50'])} ms, queue wait p99 {ms(r['server_wait_s']['p99'])} ms",
             f"verifier RSS: {r['rss_mib']['before']:.0f} MiB before any session, {r['rss_mib']['after_solo']:.0f} "
             f"after solo, {r['rss_mib']['after']:.0f} after concurrent (peak {r['rss_mib']['peak']:.0f}); "
             f"bounded: {r['rss_bounded']}; "
             f"KV tokens held after: {r['kv_cache_tokens_after']:.0f}",
             f"reconnects in the concurrent phase: {r['reconnects']}"]
    if "idle" in r:
        i = r["idle"]
        lines.append(f"idle sessions: {i['napped']} napped past the idle timeout, {i['evicted']:.0f} evicted, "
                     f"{i['reconnects']} reconnected and resumed; identical to solo: {i['identical_to_solo']}; "
                     f"KV tokens held after: {i['kv_cache_tokens_after']:.0f}")
    lines += ["", "session  tokens  rounds  accepted  reconnects  same  rt p50 ms  rt p99 ms"]
    for s in r["sessions"]:
        lines.append(f"{s['index']:>7}  {s['new_tokens']:>6}  {s['rounds']:>6}  {s['accepted']:>8}  "
                     f"{s['reconnects']:>10}  {str(s['same_as_solo']):>4}  {ms(s['p50']):>9}  {ms(s['p99']):>9}")
    return "\n".join(lines)


# -- the command -----------------------------------------------------------------------------
def register(sub) -> None:
    p = sub.add_parser("load", help="N concurrent edge sessions against one local verifier (replay edge)")
    add_load_arguments(p)
    p.set_defaults(func=run)


def add_load_arguments(p: argparse.ArgumentParser) -> None:
    d = LoadConfig()
    p.add_argument("--sessions", default=",".join(map(str, SWEEP)),
                   help=f"session counts to sweep, comma-separated (default {','.join(map(str, SWEEP))}; "
                   f"each at most {MAX_SESSIONS}); the first is the baseline")
    p.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens)
    p.add_argument("--prompts", default="humaneval,gsm8k,mt-bench", help="prompt sets (as picospec bench)")
    p.add_argument("--miss-rate", type=float, default=d.miss_rate, help="share of replayed draft tokens made wrong")
    p.add_argument("--idle-sessions", type=int, default=d.idle_sessions,
                   help="sessions that nap past the idle timeout mid-answer and must resume")
    p.add_argument("--idle-timeout", type=float, default=d.idle_timeout_s, help="the verifier's idle timeout (s)")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--distinct-prompts", type=int, default=d.distinct_prompts,
                   help="sweep: session i answers prompt i mod this many (0: one prompt per session); "
                   "fewer distinct prompts shorten the reference phase")
    p.add_argument("--cloud", default=None, help="use this running verifier (ws://127.0.0.1:PORT only) "
                   "instead of starting one; its idle timeout must match --idle-timeout")
    p.add_argument("--target", default=None, help="target for the verifier started here")
    p.add_argument("--draft", default=None, help="draft GGUF: only its tokenizer is used, for the prompts")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                   help="verifier dtype (default float32: solo and concurrent passes then agree exactly)")
    p.add_argument("--threads", type=int, default=None, help="the verifier's torch threads")
    p.add_argument("--json", default="picospec-load.json", help="write the report here ('' for none)")
    p.add_argument("--plot", default="picospec-load.png", help="write the plot here ('' for none)")


def tokenized_prompts(spec: str, n: int, draft: str | None) -> list[list[int]]:
    """n chat-templated prompts as ids, with the draft GGUF's tokenizer (no weights loaded)."""
    import llama_cpp

    from bench.prompt_sets import load_prompts
    from edge_app.template import render_chat
    from models.resolve import ensure_ready, resolve_draft

    sets = [s.strip() for s in spec.split(",") if s.strip()]
    per_set = [[p.text for p in load_prompts(name, limit=-(-n // max(1, len(sets))))] for name in sets]
    # interleaved (one of each set in turn): the first few prompts already span every set
    texts = [t for group in itertools.zip_longest(*per_set) for t in group if t is not None]
    path = ensure_ready(resolve_draft(draft))
    vocab = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    template = vocab.metadata.get("tokenizer.chat_template")
    return [list(vocab.tokenize(render_chat([{"role": "user", "content": t}], template).encode(),
                                add_bos=False, special=True)) for t in texts[:n]]


def parse_counts(text: str) -> list[int]:
    counts = [int(x) for x in str(text).split(",") if x.strip()]
    if not counts or not all(1 <= n <= MAX_SESSIONS for n in counts):
        raise ValueError(f"--sessions: comma-separated counts in 1..{MAX_SESSIONS}")
    return counts


def run(args) -> int:
    try:
        counts = parse_counts(args.sessions)
    except ValueError as err:
        print(f"picospec load: {err}", file=sys.stderr)
        return 2
    top = max(counts)
    cfg = LoadConfig(sessions=top, max_new_tokens=args.max_new_tokens, miss_rate=args.miss_rate,
                     idle_sessions=min(args.idle_sessions, top), idle_timeout_s=args.idle_timeout,
                     seed=args.seed, distinct_prompts=max(0, args.distinct_prompts))
    if args.cloud and urlparse(args.cloud).hostname not in LOOPBACK:
        print("picospec load: loopback verifiers only (ws://127.0.0.1:PORT)", file=sys.stderr)
        return 2
    prompts = tokenized_prompts(args.prompts, top, args.draft)
    verifier = None
    url = args.cloud
    if url is None:
        from edge_app.embedded import EmbeddedVerifier

        verifier = EmbeddedVerifier(args.target, args.dtype, args.threads, extra_args=[
            "--idle-timeout", str(cfg.idle_timeout_s), "--max-sessions", str(max(64, top)),
            "--max-sessions-per-token", str(top)])
        print("picospec load: starting the verifier ...", file=sys.stderr, flush=True)
        url = verifier.start().url
    try:
        result = asyncio.run(run_sweep(url, prompts, counts, cfg, log=lambda m: print(m, file=sys.stderr, flush=True)))
    finally:
        if verifier is not None:
            verifier.stop()
    print(sweep_table(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    if args.plot:
        save_plot(result, args.plot)
    idle = result["idle"]
    ok = result["identical_to_solo"] and (idle is None or (
        idle["identical_to_solo"] and idle["evicted"] >= idle["napped"] and idle["reconnects"] >= idle["napped"]))
    return 0 if ok else 1
