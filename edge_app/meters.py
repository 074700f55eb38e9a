"""Edge-side meters: where the time goes, how fast tokens arrive, what the process costs.

`EdgeMeters` is called from the decoding loop, once per phase and once per commit, so every
method is a few arithmetic operations and list appends: no I/O except in `snapshot()`.

Vocabulary: a *phase* is what the edge is doing right now (prefill, draft, network_wait,
rollback, idle); a *commit* is the moment tokens join the committed prefix (the user sees them).
"""
from __future__ import annotations

import math
import resource
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

PHASES = ("prefill", "draft", "network_wait", "rollback", "idle")

Clock = Callable[[], float]


def percentile(sorted_values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (0..100) of already sorted values, by linear interpolation between
    closest ranks (numpy's default method). None for an empty sequence."""
    if not sorted_values:
        return None
    if not 0.0 <= q <= 100.0:
        raise ValueError(f"percentile q must be within [0, 100], got {q}")
    rank = (len(sorted_values) - 1) * q / 100.0
    lo = math.floor(rank)
    hi = min(lo + 1, len(sorted_values) - 1)
    frac = rank - lo
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * frac


def latency_summary_ms(samples_s: Sequence[float]) -> dict[str, float | None]:
    """p50/p95/p99/mean of latencies given in seconds, reported in milliseconds."""
    ordered = sorted(samples_s)
    summary: dict[str, float | None] = {}
    for name, q in (("p50", 50.0), ("p95", 95.0), ("p99", 99.0)):
        value = percentile(ordered, q)
        summary[name] = None if value is None else value * 1e3
    summary["mean"] = (sum(ordered) / len(ordered) * 1e3) if ordered else None
    return summary


def peak_rss_mib(rusage_maxrss: int | None = None, platform: str = sys.platform) -> float:
    """Peak resident set size of this process in MiB. `ru_maxrss` is KiB on Linux and bytes on
    macOS; it is the lifetime peak (the kernel cannot reset it), which is what matters for
    "will the draft fit on this Pi"."""
    if rusage_maxrss is None:
        rusage_maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    divisor = 1024.0 * 1024.0 if platform == "darwin" else 1024.0
    return rusage_maxrss / divisor


class EdgeMeters:
    """Time per phase, TTFT, per-output-token latency, CPU time and peak RSS of the edge.

    Phases are *exclusive*: entering a phase inside another pauses the outer one, so nested use
    never counts the same second twice and the phases add up to at most the wall time.
    Not thread-safe: use it from the thread that runs the decoding loop.
    """

    def __init__(
        self,
        clock: Clock = time.perf_counter,
        cpu_clock: Clock = time.process_time,
        rss_mib: Callable[[], float] = peak_rss_mib,
    ) -> None:
        self._clock = clock
        self._cpu_clock = cpu_clock
        self._rss_mib = rss_mib
        self.start()

    # 1. lifecycle ------------------------------------------------------------------------
    def start(self) -> None:
        """(Re)start the meters: wall and CPU time, TTFT and TPOT are measured from here."""
        now = self._clock()
        self._t0 = now
        self._cpu0 = self._cpu_clock()
        self._phase_s: dict[str, float] = {name: 0.0 for name in PHASES}
        self._phase_n: dict[str, int] = {name: 0 for name in PHASES}
        # stack of [phase name, time it (re)started running]; only the top one is running
        self._stack: list[list] = []
        self._ttft_s: float | None = None
        self._last_commit: float | None = None
        self._tokens = 0
        self._tpot_s: list[float] = []

    # 2. phases ---------------------------------------------------------------------------
    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """`with meters.phase("draft"): ...` adds the time spent inside to that phase."""
        self.enter(name)
        try:
            yield
        finally:
            self.exit(name)

    def enter(self, name: str) -> None:
        """Start a phase (prefer `phase()`; this is for callbacks that cannot use `with`)."""
        now = self._clock()
        if self._stack:  # pause the outer phase so its clock does not run under ours
            outer = self._stack[-1]
            self._phase_s[outer[0]] += now - outer[1]
        self._phase_s.setdefault(name, 0.0)
        self._phase_n[name] = self._phase_n.get(name, 0) + 1
        self._stack.append([name, now])

    def exit(self, name: str) -> None:
        """End the innermost phase, which must be `name`, and resume the one outside it."""
        if not self._stack or self._stack[-1][0] != name:
            open_names = [entry[0] for entry in self._stack]
            raise RuntimeError(f"exit({name!r}) does not match the open phases {open_names}")
        now = self._clock()
        inner = self._stack.pop()
        self._phase_s[name] += now - inner[1]
        if self._stack:
            self._stack[-1][1] = now

    # 3. tokens ---------------------------------------------------------------------------
    def mark_first_token(self) -> None:
        """Time to first token, from `start()`. Only the first call counts; the first
        `tokens_committed()` also sets it when this was never called."""
        if self._ttft_s is None:
            self._ttft_s = self._clock() - self._t0

    def tokens_committed(self, n: int) -> None:
        """`n` tokens just joined the committed prefix.

        The gap since the previous commit is shared equally by the `n` tokens (a verdict that
        commits 4 tokens after 200 ms gives four 50 ms samples). The first commit's gap is the
        time to first token, not a per-token latency, so it yields no sample; that keeps the
        mean equal to the usual TPOT, (t_last - t_first) / (tokens after the first commit).
        """
        if n <= 0:
            return
        now = self._clock()
        if self._last_commit is None:
            if self._ttft_s is None:
                self._ttft_s = now - self._t0
        else:
            per_token = (now - self._last_commit) / n
            self._tpot_s.extend([per_token] * n)
        self._last_commit = now
        self._tokens += n

    # 4. report ---------------------------------------------------------------------------
    def phase_seconds(self) -> dict[str, float]:
        """Seconds per phase, including the running part of a phase that is still open."""
        totals = dict(self._phase_s)
        if self._stack:
            name, since = self._stack[-1]
            totals[name] += self._clock() - since
        return totals

    def snapshot(self) -> dict:
        """A JSON-ready summary. Keys: phases_s, phase_counts, ttft_s, tpot_ms {p50,p95,p99,mean},
        cpu_s, peak_rss_mib, wall_s, tokens."""
        return {
            "phases_s": self.phase_seconds(),
            "phase_counts": dict(self._phase_n),
            "ttft_s": self._ttft_s,
            "tpot_ms": latency_summary_ms(self._tpot_s),
            "cpu_s": self._cpu_clock() - self._cpu0,
            "peak_rss_mib": self._rss_mib(),
            "wall_s": self._clock() - self._t0,
            "tokens": self._tokens,
        }
