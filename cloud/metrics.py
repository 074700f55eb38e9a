"""Prometheus text exposition for the verifier: counters, gauges, latency summaries and histograms."""
from __future__ import annotations

import collections
import threading

import numpy as np

QUANTILES = (0.5, 0.9, 0.99)


class Metrics:
    """Thread-safe counters, gauges, summaries (a bounded window of recent observations) and
    histograms (cumulative counts per upper bound, since start).

    A histogram is exposed as a summary of the same name (quantiles of recent observations,
    _count, _sum) plus a counter family `<name>_bucket{le="..."}` of cumulative counts: Prometheus'
    histogram_quantile() reads the le-labelled buckets, and every family keeps the counter /
    gauge / summary types this verifier's scrapers accept."""

    def __init__(self, window: int = 4096):
        self._lock = threading.Lock()
        self._counters: dict[tuple[str, tuple], float] = collections.defaultdict(float)
        self._gauges: dict[str, float] = {}
        self._obs: dict[str, collections.deque] = {}
        self._sums: dict[str, tuple[int, float]] = {}
        self._window = window
        self._hists: dict[str, tuple[tuple[float, ...], list[int]]] = {}  # bounds, count per bucket

    def inc(self, name: str, value: float = 1.0, **labels: str) -> None:
        with self._lock:
            self._counters[(name, tuple(sorted(labels.items())))] += value

    def gauge(self, name: str, value: float) -> None:
        with self._lock:
            self._gauges[name] = value

    def observe(self, name: str, value: float) -> None:
        with self._lock:
            self._obs.setdefault(name, collections.deque(maxlen=self._window)).append(value)
            count, total = self._sums.get(name, (0, 0.0))
            self._sums[name] = (count + 1, total + value)

    def histogram(self, name: str, value: float, bounds: tuple[float, ...]) -> None:
        """Count value in the first bucket whose upper bound holds it (the +Inf bucket past the last),
        and observe it in the summary of the same name."""
        self.observe(name, value)
        with self._lock:
            bounds_, counts = self._hists.setdefault(name, (tuple(bounds), [0] * (len(bounds) + 1)))
            counts[next((j for j, b in enumerate(bounds_) if value <= b), len(bounds_))] += 1

    def histogram_counts(self, name: str) -> dict[str, int]:
        """{upper bound as text: count of observations in that bucket alone} ("+Inf" last)."""
        with self._lock:
            if name not in self._hists:
                return {}
            bounds, counts = self._hists[name]
            return {**{f"{b:g}": c for b, c in zip(bounds, counts)}, "+Inf": counts[-1]}

    def quantiles(self, name: str) -> dict[float, float]:
        with self._lock:
            values = list(self._obs.get(name, ()))
        if not values:
            return {}
        return {q: float(np.quantile(values, q)) for q in QUANTILES}

    def render(self) -> str:
        lines: list[str] = []
        with self._lock:
            counters = dict(self._counters)
            gauges = dict(self._gauges)
            sums = dict(self._sums)
            hists = {n: (b, list(c)) for n, (b, c) in self._hists.items()}
        for name in sorted({n for n, _ in counters}):
            lines.append(f"# TYPE {name} counter")
            for (n, labels), value in sorted(counters.items()):
                if n == name:
                    lines.append(f"{name}{_labels(labels)} {value:g}")
        for name, value in sorted(gauges.items()):
            lines += [f"# TYPE {name} gauge", f"{name} {value:g}"]
        for name, (count, total) in sorted(sums.items()):
            lines.append(f"# TYPE {name} summary")
            for q, v in self.quantiles(name).items():
                lines.append(f'{name}{{quantile="{q}"}} {v:.6f}')
            lines += [f"{name}_count {count}", f"{name}_sum {total:.6f}"]
        for name, (bounds, counts) in sorted(hists.items()):
            lines.append(f"# TYPE {name}_bucket counter")
            running = 0
            for b, c in zip(list(bounds) + ["+Inf"], counts):
                running += c
                le = b if isinstance(b, str) else f"{b:g}"
                lines.append(f'{name}_bucket{{le="{le}"}} {running}')
        return "\n".join(lines) + "\n"


def _labels(labels: tuple) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{k}="{v}"' for k, v in labels) + "}"


def process_memory(status_path: str = "/proc/self/status") -> dict[str, float]:
    """This process's resident and peak resident memory in bytes (Linux; {} elsewhere)."""
    names = {"VmRSS": "picospec_process_resident_bytes", "VmHWM": "picospec_process_peak_resident_bytes"}
    out: dict[str, float] = {}
    try:
        with open(status_path) as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in names:
                    out[names[key]] = float(value.split()[0]) * 1024  # the kernel reports kB
    except OSError:
        pass
    return out
