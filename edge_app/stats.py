"""The edge's statistics as pure functions: one definition of each rate, and totals over answers.

Vocabulary: a drafted token that reached a verdict was either *accepted* or *rejected*; the
acceptance rate is accepted / (accepted + rejected). Drafts thrown away unverified (stale after a
rejection, or never sent) count as neither.
"""
from __future__ import annotations

# counters that add up over answers (every stats dict has them)
SUMMED = ("drafted", "accepted", "rejected", "recovered", "bonus", "rounds", "stale_drafts",
          "bytes_up", "bytes_down", "wall_s", "new_tokens", "reconnects", "migrations", "edge_only_tokens",
          "filled")


def acceptance_rate(accepted: int, rejected: int) -> float | None:
    """Share of verified drafted tokens the target accepted; None when nothing was verified."""
    verified = accepted + rejected
    return accepted / verified if verified else None


def ratio(numerator: float, denominator: float) -> float | None:
    """numerator / denominator, None when the denominator is not positive (nothing measured)."""
    return numerator / denominator if denominator > 0 else None


def derived(counts: dict) -> dict:
    """The rates every report shows, from the counters of one answer or of many."""
    return {
        "acceptance_rate": acceptance_rate(counts["accepted"], counts["rejected"]),
        "mean_accepted_per_round": ratio(counts["accepted"], counts["rounds"]),
        "tokens_per_s": ratio(counts["new_tokens"], counts["wall_s"]),
        "bytes_up_per_token": ratio(counts["bytes_up"], counts["new_tokens"]),
        "bytes_down_per_token": ratio(counts["bytes_down"], counts["new_tokens"]),
    }


def merge_stats(stats: list[dict]) -> dict:
    """Totals over answers' stats dicts, rates recomputed from the totals; TTFT is the mean."""
    out = {k: sum(s.get(k, 0) for s in stats) for k in SUMMED}
    out.update(derived(out))
    ttfts = [s["ttft_s"] for s in stats if s.get("ttft_s") is not None]
    out["ttft_s"] = sum(ttfts) / len(ttfts) if ttfts else None
    out["mode"] = stats[0]["mode"] if stats else None
    return out
