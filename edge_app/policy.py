"""The performance model of speculative decoding over a link, and the block size it recommends.

Pure functions of measured numbers: per-token acceptance a, draft step time, round-trip time,
verify time (seconds). Used by the pipeline to adapt its block size and by the benchmark for its
"bound" column.
"""
from __future__ import annotations

from dataclasses import dataclass


def expected_accepted(a: float, g: int) -> float:
    """E[accepted drafted tokens] in a block of g when each is accepted with probability a."""
    if a >= 1.0:
        return float(g)
    return a * (1.0 - a ** g) / (1.0 - a)


def sync_rate(a: float, g: int, t_draft: float, t_rtt: float, t_verify: float) -> float:
    """Tokens/s of vanilla speculative decoding over a link: draft g, send, wait, apply.

    Every round commits the accepted tokens plus one (recovered or bonus).
    """
    return (expected_accepted(a, g) + 1.0) / (g * t_draft + t_rtt + t_verify)


def pipeline_rate(a: float, g: int, t_draft: float, t_rtt: float, t_verify: float) -> float:
    """Tokens/s of the block pipeline: the edge drafts block r+1 while block r is verified.

    A block accepted whole costs max(drafting, round trip + verify) and commits g tokens (its last
    row verifies the next block: no bonus); a rejected block commits the accepted prefix plus the
    recovered token and costs a full bubble (DESIGN.md's E[T]).
    """
    whole = a ** g
    tokens = g * whole + sum((a ** j) * (1.0 - a) * (j + 1) for j in range(g))
    step = whole * max(g * t_draft, t_rtt + t_verify) + (1.0 - whole) * (g * t_draft + t_rtt + t_verify)
    return tokens / step


def cloud_rate(t_rtt: float, t_verify_one: float) -> float:
    """Cloud-only decoding streams tokens: one target forward pass each (the link is overlapped)."""
    return 1.0 / t_verify_one


@dataclass(frozen=True)
class Plan:
    mode: str  # "pipeline" or "sync"
    block: int
    run_ahead: int
    rate: float  # modelled tokens/s


def choose_plan(a: float, t_draft: float, t_rtt: float, t_verify: float,
                max_block: int = 12, allow_sync: bool = True) -> Plan:
    """The block size (and mode) that the model says is fastest for the measured numbers.

    a is clamped to [0.05, 0.98] so that one lucky or unlucky round cannot push the block size to
    an extreme.
    """
    a = min(max(a, 0.05), 0.98)
    best = Plan("pipeline", 1, 2, 0.0)
    for g in range(1, max_block + 1):
        rate = pipeline_rate(a, g, t_draft, t_rtt, t_verify)
        if rate > best.rate:
            best = Plan("pipeline", g, 2 * g, rate)
        if allow_sync:
            rate = sync_rate(a, g, t_draft, t_rtt, t_verify)
            if rate > best.rate:
                best = Plan("sync", g, g, rate)
    return best


def ema(previous: float | None, x: float, alpha: float) -> float:
    """Exponential moving average that starts at its first sample."""
    return x if previous is None else (1 - alpha) * previous + alpha * x
