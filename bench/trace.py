"""Where a speculative answer's time goes, message by message (the benchmark's setup, one mode).

    python -m bench.trace --prompts gsm8k,mt-bench --limit 2 --rtt-ms 100 --mode pipeline --json trace.json

Each answer runs as in `picospec bench` (edge on the edge cores, the verifier on the cloud cores,
the emulated link, a fresh session); every message up and down is time-stamped on the edge. The
summary per answer: the decode's wall time, how much of it the verifier spent in verify passes
(`busy`), the corrections (verdicts that moved the epoch) and the edge's turnaround after each (the
verdict received -> the first Draft of the new epoch sent: drafting the next block while the
verifier has nothing to do) with the size of that block.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from statistics import median

FIELDS = ("pos", "epoch", "accepted", "kind", "new_epoch", "verify_s", "seq")


@dataclass(frozen=True)
class Event:
    t: float  # seconds since the answer started
    direction: str  # "up" (edge -> cloud) or "down"
    kind: str  # the message type
    fields: dict
    ids: int  # len(ids) where the message carries ids


def event_of(t: float, direction: str, msg) -> Event:
    return Event(t, direction, type(msg).__name__, {k: getattr(msg, k) for k in FIELDS if hasattr(msg, k)},
                 len(getattr(msg, "ids", None) or []))


def summarize(events: list[Event]) -> dict:
    """What one answer's timeline says (see the module docstring)."""
    first = next((e.t for e in events if e.kind in ("Prefilled", "Tokens") and e.direction == "down"), None)
    verdicts, turnarounds, blocks = [], [], []
    for i, e in enumerate(events):
        if e.direction != "down" or e.kind != "Verdict":
            continue
        verdicts.append(e)
        if e.fields.get("new_epoch") != e.fields.get("epoch"):  # a correction: the edge drafts anew
            nxt = next((d for d in events[i + 1:] if d.direction == "up" and d.kind == "Draft"
                        and d.fields.get("epoch") == e.fields.get("new_epoch")), None)
            if nxt is not None:
                turnarounds.append(nxt.t - e.t)
                blocks.append(nxt.ids)
    decode = (events[-1].t - first) if events and first is not None else 0.0
    verify = sum(e.fields.get("verify_s") or 0.0 for e in verdicts)
    return {"decode_s": decode, "verify_s": verify, "busy": verify / decode if decode > 0 else None,
            "verdicts": dict(Counter(str(e.fields.get("kind")) for e in verdicts)),
            "corrections": len(turnarounds),
            "turnaround_ms_median": 1000 * median(turnarounds) if turnarounds else None,
            "turnaround_ms": [round(1000 * t) for t in turnarounds], "block_after_correction": blocks}


async def trace(args) -> list[dict]:
    """Each prompt answered as `picospec bench` answers it (same verifier, link, options, warm-up),
    with an observer on the link."""
    from bench.prompt_sets import load_prompts
    from bench.runner import (REPLY_TIMEOUT_S, BenchConfig, BenchResult, _fresh_state, _options,
                              _start_cloud_side, _warm_up, link_config)
    from edge_app.client import EdgeClient, EdgeConfig
    from edge_app.embedded import split_cores

    cfg = BenchConfig(prompts=load_prompts(args.prompts, args.limit), modes=[args.mode], rtts_ms=[args.rtt_ms],
                      max_new_tokens=args.max_new_tokens)
    split = split_cores()
    if split:
        os.sched_setaffinity(0, split[0])
    verifier, proxy = await _start_cloud_side(cfg, split, BenchResult(), lambda *a: None)
    proxy.update(link_config(cfg, args.rtt_ms))
    client = EdgeClient(EdgeConfig(cloud=proxy.url_for("/ws", "ws"), pin_cores=False, edge_fallback=False,
                                   reply_timeout_s=REPLY_TIMEOUT_S))
    out = []
    try:
        await client.start()
        options = _options(cfg, args.mode, args.max_new_tokens)
        await _warm_up(client, cfg, [args.mode])
        for prompt in cfg.prompts:
            ids = client.encode_prompt(prompt.text)
            await _fresh_state(client)
            await client._session(options)  # the session first, so that the observer sees the Prompt
            events: list[Event] = []
            t0 = time.perf_counter()
            client.link.observer = lambda direction, msg: events.append(event_of(time.perf_counter() - t0, direction, msg))
            answer = await client.generate_ids(ids, options)
            summary = summarize(events)
            out.append({"prompt": prompt.label, "ttft_s": answer.stats.ttft_s, "wall_s": answer.stats.wall_s,
                        **summary, "events": [asdict(e) for e in events]})
            print(f"{prompt.label:24s} ttft {answer.stats.ttft_s:5.2f} s  decode {summary['decode_s']:5.2f} s  "
                  f"busy {summary['busy'] or 0:4.2f}  corrections {summary['corrections']:2d}  turnaround "
                  f"p50 {summary['turnaround_ms_median'] or 0:4.0f} ms  blocks after {summary['block_after_correction']}",
                  flush=True)
    finally:
        await client.close()
        proxy.close()
        if verifier is not None:
            verifier.stop()
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.trace", description=__doc__.split("\n\n")[0])
    p.add_argument("--prompts", default="gsm8k,mt-bench")
    p.add_argument("--limit", type=int, default=2)
    p.add_argument("--rtt-ms", type=float, default=100.0)
    p.add_argument("--mode", default="pipeline", choices=["pipeline", "sync", "auto"])
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    out = asyncio.run(trace(args))
    if args.json:
        args.json.write_text(json.dumps(out, default=str, indent=1))
        print(f"wrote {args.json}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
