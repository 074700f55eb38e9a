"""The benchmark's figure: speedup over cloud-only against RTT, and per-token latency per mode.

matplotlib is imported here only (the `bench` extra), with the Agg backend: no display needed.
"""
from __future__ import annotations

from pathlib import Path

from bench.report import MODE_ORDER

STYLE = {  # mode -> (colour, line style, label suffix)
    "cloud": ("#555555", "-", " (target alone)"),
    "sync": ("#1f77b4", "-", " (vanilla speculative)"),
    "pipeline": ("#d62728", "-", " (PicoSpec, fixed)"),
    "auto": ("#ff7f0e", "-", " (PicoSpec default)"),
    "branch": ("#8c564b", "-.", " (pipeline + branch pre-drafting)"),
    "uncut": ("#7f7f7f", ":", " (pipeline, blocks never cut early)"),
    "hf-assisted": ("#2ca02c", "--", " (co-located, no network)"),
    "edge": ("#9467bd", ":", " (draft alone, NOT target quality)"),
}


def speedup_series(rows: list[dict]) -> dict[str, list[tuple[float, float]]]:
    """mode -> [(rtt_ms, speedup vs cloud)], sorted by rtt (rows without a ratio are skipped)."""
    out: dict[str, list[tuple[float, float]]] = {}
    for r in rows:
        if r["speedup_vs_cloud"] is not None:
            out.setdefault(r["mode"], []).append((r["rtt_ms"], r["speedup_vs_cloud"]))
    return {m: sorted(v) for m, v in out.items()}


def bound_series(rows: list[dict]) -> dict[str, list[tuple[float, float]]]:
    """mode -> [(rtt_ms, modelled bound / cloud-only's measured decode rate)] for sync and pipeline
    (the model has no prefill, so it is set against cloud-only without its prefill)."""
    cloud = {r["rtt_ms"]: r.get("decode_tokens_per_s") or r["tokens_per_s"] for r in rows if r["mode"] == "cloud"}
    out: dict[str, list[tuple[float, float]]] = {}
    for r in rows:
        if r["bound_tokens_per_s"] and cloud.get(r["rtt_ms"]):
            out.setdefault(r["mode"], []).append((r["rtt_ms"], r["bound_tokens_per_s"] / cloud[r["rtt_ms"]]))
    return {m: sorted(v) for m, v in out.items()}


def off_scale_modes(series: dict[str, list[tuple[float, float]]], bounds: dict[str, list[tuple[float, float]]],
                    factor: float = 2.0) -> set[str]:
    """Modes that are not target quality (edge) and would stretch the axis `factor`-fold beyond the
    rest: they are named in the legend with their values instead of drawn."""
    rest = [y for m, pts in list(series.items()) + list(bounds.items()) if m != "edge" for _, y in pts]
    if not rest:
        return set()
    return {m for m in series if m == "edge" and max(y for _, y in series[m]) > factor * max(rest)}


def latency_groups(records: list[dict], modes: list[str]) -> list[tuple[str, list[float]]]:
    """(label, per-token latencies in ms) per mode and RTT, in MODE_ORDER."""
    groups: dict[tuple[str, float | None], list[float]] = {}
    for r in records:
        groups.setdefault((r["mode"], r.get("rtt_ms")), []).extend(x * 1e3 for x in r.get("tpot_s") or [])
    order = {m: i for i, m in enumerate(MODE_ORDER)}
    keys = sorted((k for k in groups if k[0] in modes and groups[k]),
                  key=lambda k: (order.get(k[0], 99), k[1] if k[1] is not None else -1))
    return [(f"{m}\n{'no link' if rtt is None else f'{rtt:g} ms'}", groups[(m, rtt)]) for m, rtt in keys]


def plot(rows: list[dict], records: list[dict], out: Path, title: str = "") -> Path:
    """Write a two-panel PNG: speedup vs RTT (measured, and the model's bound dotted) and latency."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import LogLocator, NullFormatter, ScalarFormatter

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 5.2), gridspec_kw={"width_ratios": [1, 1.15]})
    series = speedup_series(rows)
    off_scale = off_scale_modes(series, bound_series(rows))
    for mode, points in series.items():
        colour, ls, suffix = STYLE.get(mode, ("black", "-", ""))
        xs, ys = zip(*points)
        if mode in off_scale:  # a draft-only line far above would flatten every target-quality line
            ax1.plot([], [], ls, marker="o", color=colour,
                     label=f"{mode}{suffix}: {min(ys):.1f}-{max(ys):.1f}x, off the axis")
            continue
        ax1.plot(xs, ys, ls, marker="o", color=colour, label=mode + suffix)
    for mode, points in bound_series(rows).items():
        colour = STYLE.get(mode, ("black",))[0]
        xs, ys = zip(*points)
        ax1.plot(xs, ys, ":", marker="x", color=colour, alpha=0.7, label=f"{mode}: modelled bound (decode, vs cloud decode)")
    ax1.axhline(1.0, color="#999999", lw=0.8)
    ax1.set_xlabel("round-trip time (ms)")
    ax1.set_ylabel("speedup over cloud-only (tokens/s ratio)")
    ax1.set_title("Throughput vs network RTT")
    ax1.grid(alpha=0.3)
    ax1.legend(fontsize=8, loc="best")

    groups = latency_groups(records, [r["mode"] for r in rows])
    if groups:
        labels, data = zip(*groups)
        box = ax2.boxplot(data, whis=(5, 95), showfliers=False, patch_artist=True)
        ax2.set_xticks(range(1, len(labels) + 1), labels, fontsize=8)
        for patch, label in zip(box["boxes"], labels):
            patch.set_facecolor(STYLE.get(label.split("\n")[0], ("#cccccc",))[0])
            patch.set_alpha(0.45)
        ax2.set_yscale("log")
        ax2.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
        ax2.yaxis.set_major_formatter(ScalarFormatter())
        ax2.yaxis.set_minor_formatter(NullFormatter())
    else:
        ax2.text(0.5, 0.5, "no per-token timings recorded", ha="center", va="center", transform=ax2.transAxes)
    ax2.set_ylabel("per-token latency (ms, log scale)")
    ax2.set_title("Per-token latency (box: p25-p75, whiskers: p5-p95)")
    ax2.grid(alpha=0.3, axis="y")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
