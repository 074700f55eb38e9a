"""The performance model of speculative decoding over a link, and the plan it recommends.

Pure functions of measured numbers: per-token acceptance a, draft step time, round-trip time,
verify time (seconds; a verify pass of k tokens costs T(k), the verify curve). Used by the
speculative loop to choose mode, block size and run-ahead (`--mode auto`), by the benchmark for
its "bound" column and by the doctor. The model is explained in docs/DESIGN.md.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable


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
    recovered token and costs a full bubble: E[T] = a^g max(g T_d, T_rtt + T_v) + (1 - a^g)
    (g T_d + T_rtt + T_v).
    """
    whole = a ** g
    tokens = g * whole + sum((a ** j) * (1.0 - a) * (j + 1) for j in range(g))
    step = whole * max(g * t_draft, t_rtt + t_verify) + (1.0 - whole) * (g * t_draft + t_rtt + t_verify)
    return tokens / step


def cuts_block(confidence: float, cut_below: float) -> bool:
    """Whether a block should go up right after a token the draft model gave this probability
    (sampling.token_prob; on the default pair the target keeps a greedy draft token about as often
    as it says: python -m bench.calibration, 0.3-0.5 kept 55% of the time, 0.8-0.9 95%): drafting on
    past a likely rejection delays the pass that finds it, while the tokens after it still go up in
    the next block (the pipeline keeps drafting) if it is kept after all."""
    return confidence < cut_below


def cloud_rate(t_rtt: float, t_verify_one: float) -> float:
    """Cloud-only decoding streams tokens: one target forward pass each (the link is overlapped)."""
    return 1.0 / t_verify_one


@dataclass(frozen=True)
class Plan:
    mode: str  # "pipeline", "sync" or "cloud"
    block: int
    run_ahead: int
    rate: float  # modelled tokens/s


def choose_plan(a: float, t_draft: float, t_rtt: float, t_verify: float | Callable[[int], float],
                max_block: int = 12, allow_sync: bool = True, t_cloud: float | None = None) -> Plan:
    """The mode and block size that the model says is fastest for the measured numbers.

    t_verify: one verify pass's seconds, or T(k) as a function of the block size k. t_cloud: the
    seconds per token of cloud-only streaming; given, cloud-only competes too. a is clamped to
    [0.05, 0.98] so that one lucky or unlucky round cannot push the block size to an extreme.
    """
    cost = t_verify if callable(t_verify) else (lambda k, t=t_verify: t)
    a = min(max(a, 0.05), 0.98)
    best = Plan("pipeline", 1, 2, 0.0)
    for g in range(1, max_block + 1):
        rate = pipeline_rate(a, g, t_draft, t_rtt, cost(g))
        if rate > best.rate:
            best = Plan("pipeline", g, 2 * g, rate)
        if allow_sync:
            rate = sync_rate(a, g, t_draft, t_rtt, cost(g))
            if rate > best.rate:
                best = Plan("sync", g, g, rate)
    if t_cloud and 1.0 / t_cloud > best.rate:
        best = Plan("cloud", 1, 1, 1.0 / t_cloud)
    return best


@dataclass
class VerifyCurve:
    """T(k): seconds of one verify pass of k drafted tokens, learned from verdicts.

    Each block size keeps a moving average; a size never seen is read off the least-squares line
    through the sizes seen (or, with one size seen, a flat line: the optimistic guess that lets the
    loop try other sizes and measure them).
    """

    points: dict[int, float] = field(default_factory=dict)

    def observe(self, k: int, seconds: float, alpha: float = 0.3) -> None:
        self.points[k] = ema(self.points.get(k), seconds, alpha)

    def __bool__(self) -> bool:
        return bool(self.points)

    def __call__(self, k: int) -> float:
        if k in self.points:
            return self.points[k]
        ks = sorted(self.points)
        if len(ks) == 1:
            return self.points[ks[0]]
        n = len(ks)
        mean_k = sum(ks) / n
        mean_t = sum(self.points[x] for x in ks) / n
        var = sum((x - mean_k) ** 2 for x in ks)
        slope = max(0.0, sum((x - mean_k) * (self.points[x] - mean_t) for x in ks) / var)
        return max(1e-4, mean_t + slope * (k - mean_k))


@dataclass
class Estimates:
    """What the edge has measured, carried across answers (seconds): the inputs of choose_plan."""

    t_draft: float | None = None  # one draft step
    t_rtt: float | None = None  # a round trip less the verify pass
    acceptance: float | None = None  # per-token, over the last answers' verdicts
    verify: VerifyCurve = field(default_factory=VerifyCurve)
    t_cloud: float | None = None  # seconds per token of cloud-only streaming
    sync_block: int = 4  # sync's block when nothing has been measured yet
    cloud_answers: int = 0  # answers in a row that auto gave to cloud-only (the link may change)

    def complete(self) -> bool:
        return None not in (self.t_draft, self.t_rtt, self.acceptance) and bool(self.verify)

    def cloud_step(self) -> float | None:
        """Seconds per cloud-only token: measured when streamed, else a one-token verify pass."""
        return self.t_cloud or (self.verify(1) if self.verify else None)

    def plan(self, allow_sync: bool = True, allow_cloud: bool = False, max_block: int = 12) -> Plan | None:
        if not self.complete():
            return None
        return choose_plan(self.acceptance, self.t_draft, self.t_rtt, self.verify, max_block=max_block,
                           allow_sync=allow_sync, t_cloud=self.cloud_step() if allow_cloud else None)


def ema(previous: float | None, x: float, alpha: float) -> float:
    """Exponential moving average that starts at its first sample."""
    return x if previous is None else (1 - alpha) * previous + alpha * x
