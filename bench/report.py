"""The benchmark's numbers: pure functions from per-prompt records to rows, bounds and break-even.

A *record* is one prompt answered in one mode at one RTT (a dict, see `bench.runner.record_from`):
    mode, rtt_ms (None where the link is not used), prompt, token_ids, new_tokens, wall_s, ttft_s,
    accepted, rejected, rounds, bytes_up, bytes_down, tpot_s [per-token latencies, s],
    draft_s, draft_steps, verify_s [per verdict, s], block_sizes [per block sent]
A *run* is every record of one (mode, rtt); `run_info[(mode, rtt_ms)]` holds what was measured for
the run as a whole (energy, the client's round-trip estimate, wire bytes).
Nothing here does I/O, so tests check it on synthetic records.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass
from statistics import mean

from edge_app.energy import joules_per_token
from edge_app.meters import percentile
from edge_app.policy import pipeline_rate, sync_rate
from edge_app.stats import acceptance_rate

SPECULATIVE = ("sync", "pipeline", "auto", "branch", "uncut", "hf-assisted")  # must reproduce cloud-only's greedy ids
LINK_FREE = ("edge", "hf-assisted")  # measured once, reported on every rtt row
MODE_ORDER = ("cloud", "sync", "uncut", "pipeline", "branch", "auto", "hf-assisted", "edge")
BREAK_EVEN_MAX_S = 60.0  # beyond a minute of RTT nobody runs interactive decoding


@dataclass(frozen=True)
class ModelParams:
    """The performance model's inputs (seconds), as measured in one run."""

    a: float  # per-token acceptance
    g: int  # block length (mean drafted tokens per block, rounded)
    t_draft: float  # one draft step
    t_rtt: float  # configured RTT + measured overhead
    t_verify: float  # one verify pass
    rtt_overhead: float  # the part of t_rtt the link config does not explain
    t_verify_source: str

    def to_json(self) -> dict:
        d = asdict(self)
        return {"a": d["a"], "g": d["g"], "t_draft_ms": d["t_draft"] * 1e3, "t_rtt_ms": d["t_rtt"] * 1e3,
                "t_verify_ms": d["t_verify"] * 1e3, "rtt_overhead_ms": d["rtt_overhead"] * 1e3,
                "t_verify_source": d["t_verify_source"]}


# -- per-token latency ---------------------------------------------------------------------------
def tpot_samples(commits: list[tuple[float, int]]) -> list[float]:
    """Per-token latencies from (time, tokens committed) events, as EdgeMeters defines them: the gap
    since the previous commit is shared equally by its tokens; the first commit is TTFT, not TPOT."""
    out: list[float] = []
    last = None
    for t, n in commits:
        if n <= 0:
            continue
        if last is not None:
            out += [(t - last) / n] * n
        last = t
    return out


def _pct(values: list[float], q: float) -> float | None:
    return percentile(sorted(values), q)


# -- pooling one run -----------------------------------------------------------------------------
def pool(records: list[dict]) -> dict:
    """Totals and pooled samples over the prompts of one run (rates come from totals, not means)."""
    def total(key: str) -> int | float:
        return sum(r.get(key) or 0 for r in records)

    out = {k: total(k) for k in ("new_tokens", "wall_s", "accepted", "rejected", "rounds", "bonus",
                                 "bytes_up", "bytes_down", "draft_s", "draft_steps", "reconnects",
                                 "edge_only_tokens", "branches", "branch_hits")}
    out["prompts"] = len(records)
    out["ttft_s"] = [r["ttft_s"] for r in records if r.get("ttft_s") is not None]
    out["tpot_s"] = [x for r in records for x in r.get("tpot_s") or []]
    out["verify_s"] = [x for r in records for x in r.get("verify_s") or []]
    out["block_sizes"] = [x for r in records for x in r.get("block_sizes") or []]
    # decode rate: tokens after the first over the time after it (prefill and TTFT excluded)
    decode_s = sum(r["wall_s"] - r["ttft_s"] for r in records if r.get("ttft_s") is not None)
    decode_tokens = sum(max(0, r["new_tokens"] - 1) for r in records if r.get("ttft_s") is not None)
    out["decode_tokens_per_s"] = decode_tokens / decode_s if decode_s > 0 else None
    return out


def _ratio(num: float | None, den: float | None) -> float | None:
    return num / den if num is not None and den else None


def model_params(pooled: dict, rtt_ms: float, overhead_s: float | None,
                 t_verify_fallback: float | None = None) -> ModelParams | None:
    """The model's inputs from a speculative run; None when the run lacks one of them."""
    verified = pooled["accepted"] + pooled["rejected"]
    if not verified or not pooled["draft_steps"] or not pooled["block_sizes"]:
        return None
    if pooled["verify_s"]:
        t_verify, source = mean(pooled["verify_s"]), "mean verify_s of the run's verdicts"
    elif t_verify_fallback is not None:
        t_verify, source = t_verify_fallback, "client's moving average (stats carried no verify_s)"
    else:
        return None
    overhead = overhead_s or 0.0
    return ModelParams(a=acceptance_rate(pooled["accepted"], pooled["rejected"]), g=max(1, round(mean(pooled["block_sizes"]))),
                       t_draft=pooled["draft_s"] / pooled["draft_steps"], t_rtt=rtt_ms / 1e3 + overhead,
                       t_verify=t_verify, rtt_overhead=overhead, t_verify_source=source)


def bound_rate(mode: str, p: ModelParams | None) -> float | None:
    """The performance model's tokens/s for the mode (policy.py's formulas), or None."""
    if p is None:
        return None
    if mode == "pipeline":
        return pipeline_rate(p.a, p.g, p.t_draft, p.t_rtt, p.t_verify)
    if mode == "sync":
        return sync_rate(p.a, p.g, p.t_draft, p.t_rtt, p.t_verify)
    return None


def rtt_overhead_s(run_info: dict, rtt_ms: float) -> float | None:
    """What a round trip costs beyond the configured RTT: an idle HTTP round trip through the proxy,
    measured before the runs at that RTT, minus the configured RTT (proxy, sockets, event loops)."""
    measured = run_info.get(("link", rtt_ms), {}).get("measured_rtt_s")
    return None if measured is None else max(0.0, measured - rtt_ms / 1e3)


# -- exactness -----------------------------------------------------------------------------------
def first_difference(a: list[int], b: list[int]) -> int | None:
    """Index of the first differing token (or the shorter length), None when equal."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def exactness(records: list[dict], reference: dict[str, list[int]]) -> tuple[int, int, list[dict]]:
    """(matches, compared, mismatches) of records' token ids against cloud-only's, prompt by prompt."""
    matches, compared, mismatches = 0, 0, []
    for r in records:
        ref = reference.get(r["prompt"])
        if ref is None:
            continue
        compared += 1
        pos = first_difference(r["token_ids"], ref)
        if pos is None:
            matches += 1
        else:
            mismatches.append({"mode": r["mode"], "rtt_ms": r.get("rtt_ms"), "prompt": r["prompt"],
                               "position": pos, "got": r["token_ids"][pos:pos + 4], "cloud": ref[pos:pos + 4]})
    return matches, compared, mismatches


def reference_ids(records: list[dict], rtt_ms: float | None) -> dict[str, list[int]]:
    """Cloud-only's ids per prompt at this RTT, else at any RTT (greedy output does not depend on it)."""
    clouds = [r for r in records if r["mode"] == "cloud"]
    ref = {r["prompt"]: r["token_ids"] for r in clouds}
    ref.update({r["prompt"]: r["token_ids"] for r in clouds if r.get("rtt_ms") == rtt_ms})
    return ref


# -- rows ----------------------------------------------------------------------------------------
def summarise_run(mode: str, rtt_ms: float, records: list[dict], info: dict, overhead_s: float | None) -> dict:
    """One table row (ratios to other modes are added by `add_ratios`)."""
    p = pool(records)
    params = model_params(p, rtt_ms, overhead_s, info.get("t_verify_est_s")) if mode in ("sync", "pipeline") else None
    bound = bound_rate(mode, params)
    rate = _ratio(p["new_tokens"], p["wall_s"])
    energy = info.get("energy") or {}
    row = {
        "mode": mode, "rtt_ms": rtt_ms, "link_used": mode not in LINK_FREE,
        "target_quality": mode != "edge", "prompts": p["prompts"], "new_tokens": p["new_tokens"],
        "wall_s": p["wall_s"], "tokens_per_s": rate, "decode_tokens_per_s": p["decode_tokens_per_s"],
        "speedup_vs_cloud": None, "speedup_vs_sync": None,
        # transformers does not say how many tokens its assistant drafted: no acceptance rate there
        "acceptance_rate": acceptance_rate(p["accepted"], p["rejected"]) if mode != "hf-assisted" else None,
        "mean_accepted": _ratio(p["accepted"], p["rounds"]) if p["rounds"] else None,
        "tokens_per_pass": tokens_per_pass(p),
        "branch_hit_rate": _ratio(p["branch_hits"], p["branches"]) if p["branches"] else None,
        "rounds": p["rounds"],
        "bytes_up_per_token": _ratio(p["bytes_up"], p["new_tokens"]) if mode not in LINK_FREE else None,
        "bytes_down_per_token": _ratio(p["bytes_down"], p["new_tokens"]) if mode not in LINK_FREE else None,
        "wire_bytes_up_per_token": _ratio(info.get("wire_bytes_up"), p["new_tokens"]),
        "wire_bytes_down_per_token": _ratio(info.get("wire_bytes_down"), p["new_tokens"]),
        "ttft_s_p50": _pct(p["ttft_s"], 50),
        "tpot_ms_p50": None, "tpot_ms_p95": None, "tpot_source": None,
        "bound_tokens_per_s": bound, "bound_block": params.g if params else None,
        "fraction_of_bound": _ratio(rate, bound),
        # the model has no prefill: the decode rate (after the first token) is the like-for-like one
        "fraction_of_bound_decode": _ratio(p["decode_tokens_per_s"], bound),
        "model_params": params.to_json() if params else None,
        "joules_per_token": joules_per_token(energy, p["new_tokens"]),
        "energy_source": energy.get("source", "not measured"), "energy_formula": energy.get("formula"),
        "exact_matches": None, "exact_compared": None,
        # a lost verifier: answers that reconnected, or fell back to draft-only tokens, are not clean runs
        "reconnects": p["reconnects"], "edge_only_tokens": p["edge_only_tokens"],
    }
    if p["tpot_s"]:
        row.update(tpot_ms_p50=_pct(p["tpot_s"], 50) * 1e3, tpot_ms_p95=_pct(p["tpot_s"], 95) * 1e3,
                   tpot_source="commit timestamps (EdgeMeters' definition), pooled over prompts")
    elif p["new_tokens"]:
        row.update(tpot_ms_p50=p["wall_s"] / p["new_tokens"] * 1e3, tpot_source="wall / tokens (no per-token times)")
    return row


def tokens_per_pass(pooled: dict) -> float | None:
    """Spec-Bench's mean accepted tokens: tokens committed per verify pass, the recovered or bonus
    token of the pass included (accepted + rejected + bonus over rounds)."""
    if not pooled["rounds"]:
        return None
    return (pooled["accepted"] + pooled["rejected"] + pooled.get("bonus", 0)) / pooled["rounds"]


def mean_of_ratios(records: list[dict], reference: list[dict]) -> float | None:
    """Spec-Bench's speedup: the mean over prompts of (tokens/s of the mode) / (tokens/s of the
    reference mode) for the same prompt."""
    ref = {r["prompt"]: r["new_tokens"] / r["wall_s"] for r in reference if r["wall_s"]}
    ratios = [(r["new_tokens"] / r["wall_s"]) / ref[r["prompt"]] for r in records
              if r["wall_s"] and ref.get(r["prompt"])]
    return mean(ratios) if ratios else None


def add_ratios(rows: list[dict], records: list[dict] | None = None) -> None:
    """Speedup vs cloud-only and vs sync at the same RTT (ratio of pooled rates; and, with the
    records, Spec-Bench's mean of per-prompt ratios vs cloud-only), in place."""
    by_key = {(r["mode"], r["rtt_ms"]): r for r in rows}
    for r in rows:
        cloud, sync = by_key.get(("cloud", r["rtt_ms"])), by_key.get(("sync", r["rtt_ms"]))
        r["speedup_vs_cloud"] = _ratio(r["tokens_per_s"], cloud["tokens_per_s"]) if cloud else None
        r["speedup_vs_sync"] = _ratio(r["tokens_per_s"], sync["tokens_per_s"]) if sync else None
        r["speedup_vs_cloud_per_prompt"] = None
        if records is not None and cloud:
            key_rtt = None if r["mode"] in LINK_FREE else r["rtt_ms"]
            mine = [x for x in records if x["mode"] == r["mode"] and x.get("rtt_ms") == key_rtt]
            ref = [x for x in records if x["mode"] == "cloud" and x.get("rtt_ms") == r["rtt_ms"]]
            r["speedup_vs_cloud_per_prompt"] = mean_of_ratios(mine, ref)
        r["ttft_vs_cloud"] = _ratio(r["ttft_s_p50"], cloud["ttft_s_p50"]) if cloud else None
        best = max((x["tokens_per_s"] or 0.0 for x in rows
                    if x["rtt_ms"] == r["rtt_ms"] and x["mode"] in ("cloud", "sync", "pipeline")), default=0.0)
        r["vs_best_fixed_mode"] = _ratio(r["tokens_per_s"], best) if best else None


def category_rows(records: list[dict], rtts: list[float], modes: list[str]) -> list[dict]:
    """Per prompt category, mode and RTT: Spec-Bench's two numbers (tokens per verify pass, mean of
    per-prompt speedups vs cloud-only) and the pooled tokens/s."""
    out = []
    categories = sorted({r.get("category") or "all" for r in records})
    for rtt in rtts:
        for cat in categories:
            in_cat = [r for r in records if (r.get("category") or "all") == cat]
            ref = [r for r in in_cat if r["mode"] == "cloud" and r.get("rtt_ms") == rtt]
            for mode in [m for m in MODE_ORDER if m in modes and m not in LINK_FREE]:
                run = [r for r in in_cat if r["mode"] == mode and r.get("rtt_ms") == rtt]
                if not run:
                    continue
                p = pool(run)
                out.append({"category": cat, "mode": mode, "rtt_ms": rtt, "prompts": len(run),
                            "tokens_per_s": _ratio(p["new_tokens"], p["wall_s"]),
                            "tokens_per_pass": tokens_per_pass(p),
                            "branch_hit_rate": _ratio(p["branch_hits"], p["branches"]) if p["branches"] else None,
                            "speedup_vs_cloud_per_prompt": mean_of_ratios(run, ref) if mode != "cloud" else 1.0})
    return out


def format_category_table(rows: list[dict]) -> str:
    head = ["category", "mode", "rtt ms", "tok/s", "tok/pass", "x cloud (mean/prompt)"]
    cells = [head] + [[r["category"], r["mode"], _fmt(r["rtt_ms"], "g"), _fmt(r["tokens_per_s"]),
                       _fmt(r["tokens_per_pass"]), _fmt(r["speedup_vs_cloud_per_prompt"])] for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(head))]
    lines = []
    for n, line in enumerate(cells):
        lines.append("  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths))).rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def format_verify_curve(curve: dict) -> str:
    """T(k) as one line: 'T(k) ms: 1: 367  2: 380  ...  T(8)/T(1) 1.31'."""
    if not curve:
        return "T(k): not measured"
    ks = sorted(int(k) for k in curve)
    parts = "  ".join(f"{k}: {float(curve[k] if k in curve else curve[str(k)]) * 1e3:.0f}" for k in ks)
    t = {k: float(curve[k] if k in curve else curve[str(k)]) for k in ks}
    ratio = f"  T(8)/T(1) {t[8] / t[1]:.2f}" if 1 in t and 8 in t else ""
    return f"T(k) ms, k drafted tokens in one verify pass: {parts}{ratio}"


def build_rows(records: list[dict], run_info: dict, rtts: list[float], modes: list[str],
               greedy: bool = True) -> tuple[list[dict], list[dict]]:
    """Every (mode, rtt) row, in MODE_ORDER per rtt, and the list of greedy mismatches. Sampled
    answers (greedy False) are draws from the target's distribution, not cloud-only's tokens: they
    are not compared."""
    rows, mismatches = [], []
    for rtt in rtts:
        ref = reference_ids(records, rtt) if greedy else {}
        for mode in [m for m in MODE_ORDER if m in modes]:
            key_rtt = None if mode in LINK_FREE else rtt
            run = [r for r in records if r["mode"] == mode and r.get("rtt_ms") == key_rtt]
            if not run:
                continue
            row = summarise_run(mode, rtt, run, run_info.get((mode, key_rtt), {}), rtt_overhead_s(run_info, rtt))
            if mode != "cloud" and ref:
                matched, compared, bad = exactness(run, ref)
                row["exact_matches"], row["exact_compared"] = matched, compared
                if mode in SPECULATIVE and (mode not in LINK_FREE or rtt == rtts[0]):
                    mismatches += bad  # a link-free mode's mismatches are listed once
            rows.append(row)
    add_ratios(rows, records)
    return rows, mismatches


# -- break-even RTT ------------------------------------------------------------------------------
def solve_break_even(rate_at, target_rate: float, hi_s: float = BREAK_EVEN_MAX_S) -> float | None:
    """The RTT (s) where a non-increasing rate_at(rtt_s) falls to target_rate; None if it never
    exceeds it (even at 0) or still exceeds it at hi_s."""
    if rate_at(0.0) <= target_rate or rate_at(hi_s) > target_rate:
        return None
    lo, hi = 0.0, hi_s
    for _ in range(80):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if rate_at(mid) > target_rate else (lo, mid)
    return (lo + hi) / 2


def crossing_measured(points: list[tuple[float, float]], target_rate: float) -> float | None:
    """The RTT where measured rates (rtt_ms, tokens/s) cross target_rate, by linear interpolation
    between neighbouring measured RTTs; None when the crossing is outside the measured range."""
    pts = sorted(points)
    for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
        if (y0 - target_rate) * (y1 - target_rate) <= 0 and y0 != y1:
            return x0 + (target_rate - y0) * (x1 - x0) / (y1 - y0)
    return None


def break_even(records: list[dict], run_info: dict, rows: list[dict]) -> dict:
    """Per speculative mode over the link, the RTT below which it beats co-located hf-assisted.

    modelled: its model rate (a, g, t_draft, t_verify measured over all its runs, plus the mean
    measured RTT overhead) against hf-assisted's decode rate: the model has no prefill, so the peer
    is taken without its prefill too. measured: where the measured tokens/s (prefill included) of
    the mode, interpolated between the swept RTTs, crosses hf-assisted's measured tokens/s."""
    hf = next((r for r in rows if r["mode"] == "hf-assisted" and r["tokens_per_s"]), None)
    out: dict = {"hf_assisted_tokens_per_s": hf and hf["tokens_per_s"],
                 "hf_assisted_decode_tokens_per_s": hf and hf["decode_tokens_per_s"],
                 "basis": "rtt_ms: RTT where the edge_app/policy.py model (a, g, t_draft, t_verify measured over "
                          "all RTTs, plus the measured RTT overhead) equals hf-assisted's decode tokens/s (both "
                          "without prefill); measured_crossing_rtt_ms: where measured tokens/s, interpolated "
                          "between swept RTTs, equal hf-assisted's measured tokens/s (prefill included)"}
    if hf is None:
        out["note"] = "hf-assisted was not run: no break-even"
        return out
    target = hf["decode_tokens_per_s"] or hf["tokens_per_s"]
    overheads = [o for rtt in sorted({r["rtt_ms"] for r in rows}) if (o := rtt_overhead_s(run_info, rtt)) is not None]
    overhead = mean(overheads) if overheads else 0.0
    for mode, fn in (("pipeline", pipeline_rate), ("sync", sync_rate)):
        runs = [r for r in records if r["mode"] == mode]
        ema = [i["t_verify_est_s"] for (m, _), i in run_info.items() if m == mode and i.get("t_verify_est_s")]
        params = model_params(pool(runs), 0.0, overhead, mean(ema) if ema else None) if runs else None
        if params is None:
            continue

        def rate_at(rtt_s: float, p: ModelParams = params, fn=fn) -> float:
            return fn(p.a, p.g, p.t_draft, rtt_s + p.rtt_overhead, p.t_verify)

        rtt_s = solve_break_even(rate_at, target)
        at_zero = rate_at(0.0)
        out[mode] = {
            "rtt_ms": None if rtt_s is None else rtt_s * 1e3,
            "modelled_tokens_per_s_at_0ms": at_zero,
            "measured_crossing_rtt_ms": crossing_measured(
                [(r["rtt_ms"], r["tokens_per_s"]) for r in rows if r["mode"] == mode and r["tokens_per_s"]],
                hf["tokens_per_s"]),
            "params": params.to_json(),
            "meaning": ("never: the model is below hf-assisted even at 0 ms" if rtt_s is None and at_zero <= target
                        else f"beyond {BREAK_EVEN_MAX_S:g} s" if rtt_s is None
                        else f"{mode} beats co-located assisted generation below this RTT"),
        }
    return out


# -- output --------------------------------------------------------------------------------------
def _fmt(v, spec: str = ".2f", none: str = "-") -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return none
    return format(v, spec)


TABLE_COLUMNS = ("mode", "rtt ms", "tok/s", "x cloud", "x sync", "x best", "accept", "tok/pass", "B up/tok",
                 "B dn/tok", "TTFT p50 s", "TPOT p50 ms", "TPOT p95 ms", "bound tok/s", "of bound",
                 "J/tok", "exact")


def table_cells(row: dict) -> list[str]:
    exact = ("ref" if row["mode"] == "cloud" else
             f"{row['exact_matches']}/{row['exact_compared']}" if row["exact_compared"] else "-")
    mode = row["mode"] + ("*" if not row["target_quality"] else "") + ("^" if not row["link_used"] else "")
    return [mode, _fmt(row["rtt_ms"], "g"), _fmt(row["tokens_per_s"]), _fmt(row["speedup_vs_cloud"]),
            _fmt(row["speedup_vs_sync"]), _fmt(row.get("vs_best_fixed_mode")), _fmt(row["acceptance_rate"]),
            _fmt(row.get("tokens_per_pass")),
            _fmt(row["bytes_up_per_token"], ".1f"), _fmt(row["bytes_down_per_token"], ".1f"),
            _fmt(row["ttft_s_p50"]), _fmt(row["tpot_ms_p50"], ".0f"), _fmt(row["tpot_ms_p95"], ".0f"),
            _fmt(row["bound_tokens_per_s"]), _fmt(row["fraction_of_bound"], ".0%"),
            _fmt(row["joules_per_token"], ".3f"), exact]


def format_table(rows: list[dict]) -> str:
    """A plain-text table: text columns left-aligned, numbers right-aligned, one line per row."""
    cells = [list(TABLE_COLUMNS)] + [table_cells(r) for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(TABLE_COLUMNS))]
    lines = []
    for n, line in enumerate(cells):
        parts = [c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths))]
        lines.append("  ".join(parts).rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def table_notes(rows: list[dict], mismatches: list[dict], breakeven: dict, sampled: str | None = None) -> list[str]:
    """The lines under the table that say what the columns cannot. sampled: the sampling
    parameters of a sampled run (None: greedy)."""
    notes = []
    if any(not r["target_quality"] for r in rows):
        notes.append("* edge: the draft model alone, NOT target quality (run once, shown on every rtt row)")
    if any(r["mode"] == "hf-assisted" for r in rows):
        notes.append("^ hf-assisted: draft and target co-located on the cloud cores, no network (run once, "
                     "shown on every rtt row)")
    measured = sorted({r["energy_source"] for r in rows if r["joules_per_token"] is not None})
    formulas = sorted({r["energy_formula"].split(" = ")[0] for r in rows if r.get("energy_formula")})
    if measured:
        notes.append(f"energy (edge device): {', '.join(measured)}" + (f", {formulas[0]}" if formulas else ""))
    else:
        notes.append("energy: not measured (no sensor here; --idle-watts/--busy-watts give a labelled estimate)")
    tp = sorted({r["tpot_source"] for r in rows if r["tpot_source"]})
    if tp:
        notes.append(f"TPOT from {'; '.join(tp)}")
    notes.append("bound: edge_app/policy.py at the run's acceptance, block, draft step, verify time and RTT "
                 "(no prefill in the model: 'of bound' uses the whole wall, JSON fraction_of_bound_decode "
                 "the time after the first token)")
    for mode in ("pipeline", "sync"):
        be = breakeven.get(mode)
        if be:
            where = f"{be['rtt_ms']:.0f} ms" if be["rtt_ms"] is not None else be["meaning"]
            measured = be["measured_crossing_rtt_ms"]
            notes.append(f"break-even RTT {mode} vs hf-assisted: modelled {where} (vs its decode rate "
                         f"{_fmt(breakeven['hf_assisted_decode_tokens_per_s'])} tok/s); measured crossing "
                         + (f"{measured:.0f} ms" if measured is not None else "not within the swept RTTs"))
    for r in rows:
        if r.get("branch_hit_rate") is not None:
            notes.append(f"branch@{_fmt(r['rtt_ms'], 'g')}: pre-drafted branches became the main line "
                         f"{r['branch_hit_rate']:.0%} of the time")
    for r in rows:
        if r["reconnects"] or (r["edge_only_tokens"] and r["mode"] != "edge"):
            notes.append(f"{r['mode']}@{_fmt(r['rtt_ms'], 'g')}: {r['reconnects']} reconnects, "
                         f"{r['edge_only_tokens']} draft-only tokens: not a clean run")
    if sampled:
        notes.append(f"sampled ({sampled}): each answer is a draw from the target's distribution, so it "
                     "is not compared with cloud-only's tokens (the sampling tests check the distribution)")
    elif mismatches:
        notes.append(f"greedy mismatches vs cloud-only: {len(mismatches)} (" + "; ".join(
            f"{m['mode']}@{_fmt(m['rtt_ms'], 'g')} {m['prompt']} pos {m['position']}" for m in mismatches[:6]) + ")")
    else:
        notes.append("greedy exactness: every speculative answer equals cloud-only's token ids")
    return notes


def build_json(rows: list[dict], setup: dict, breakeven: dict, mismatches: list[dict],
               records: list[dict], run_info: dict | None = None, categories: list[dict] | None = None) -> dict:
    """The --json document: runs (one per mode and rtt), per-category rows, setup, break-even, and
    the raw material (every record and per-run measurement), so the numbers can be recomputed."""
    info = [{"mode": mode, "rtt_ms": rtt, **values} for (mode, rtt), values in (run_info or {}).items()]
    return {"runs": rows, "categories": categories or [], "setup": setup, "break_even_rtt_ms": breakeven,
            "mismatches": mismatches, "per_prompt": records, "run_info": info}


_NUMBER_LIST = re.compile(r"\[\s*(-?[\d.eE+-]+(?:,\s*-?[\d.eE+-]+)*)\s*\]")


def dumps(doc: dict) -> str:
    """Indented JSON with lists of numbers (token ids, latencies) kept on one line each."""
    text = json.dumps(doc, indent=1, default=str)
    return _NUMBER_LIST.sub(lambda m: "[" + ", ".join(x.strip() for x in m.group(1).split(",")) + "]", text)
